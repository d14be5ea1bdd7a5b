"""Input handling (#10 §4): identifiers are matched whole, bad names are refused before
anything is opened, rejected values are never echoed, long keys are shortened."""

from __future__ import annotations

import enum
import json
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import pydantic
import pytest

from cqrskit import Command, Event, Mediator, Registry
from cqrskit.errors import ConfigurationError, SerializationError, ValidationError
from cqrskit.eventlog import InMemoryEventStore, InMemoryUnitOfWork, validate_identifier
from cqrskit.idempotency import Idempotency, idempotency_key
from cqrskit.pipeline import (
    AuthorizationBehavior,
    SyncAuthorizationBehavior,
    ValidationBehavior,
    authenticated,
)
from cqrskit.projections import Projection
from cqrskit.projections.db import check_identifier
from cqrskit.serialization import ValueCodecs

NEWLINE_NAMES = ["x\n", "events\n", "a\r\n", "x\nx"]


@pytest.mark.parametrize("name", NEWLINE_NAMES)
def test_identifiers_with_a_newline_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError):
        validate_identifier(name, "schema name")
    with pytest.raises(ConfigurationError):
        check_identifier(name, "schema name")
    with pytest.raises(ConfigurationError):
        Projection(name, tables={})
    with pytest.raises(ConfigurationError):
        Projection("ok", tables={name: ()})


@pytest.mark.parametrize("name", NEWLINE_NAMES)
def test_postgres_names_with_a_newline_are_refused(name: str) -> None:
    pytest.importorskip("asyncpg")
    from cqrskit.postgres import PostgresReadDatabase, postgres_ddl, postgres_idempotency_ddl

    with pytest.raises(ConfigurationError):
        postgres_ddl(schema=name)
    with pytest.raises(ConfigurationError):
        postgres_ddl(table=name)
    with pytest.raises(ConfigurationError):
        postgres_idempotency_ddl(schema=name)
    with pytest.raises(ConfigurationError):
        PostgresReadDatabase("postgresql://127.0.0.1:1/none", schema=name)


@pytest.mark.parametrize("field", ["schema", "table"])
async def test_postgres_open_refuses_a_bad_name_before_creating_a_pool(
    field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    from cqrskit.postgres import PostgresEventStore

    pools: list[Any] = []

    async def create_pool(*args: Any, **kwargs: Any) -> Any:
        pools.append((args, kwargs))
        raise AssertionError("a pool must not be created for an invalid name")

    monkeypatch.setattr(asyncpg, "create_pool", create_pool)
    with pytest.raises(ConfigurationError, match=f"{field} name"):
        await PostgresEventStore.open("postgresql://127.0.0.1:1/none", **{field: "x\n"})
    assert pools == []


def test_sqlite_names_with_a_newline_are_refused(tmp_path: Any) -> None:
    from cqrskit.sqlite import SqliteEventStore, sqlite_ddl

    with pytest.raises(ConfigurationError):
        sqlite_ddl("x\n")
    with pytest.raises(ConfigurationError):
        SqliteEventStore(tmp_path / "a.db", table="x\n")
    assert not (tmp_path / "a.db").exists()


# -- rejected values are never echoed; long keys are shortened ------------------------------

SECRET = "hunter2-SECRET"


class Color(enum.Enum):
    RED = "red"


class Tagged1(msgspec.Struct, tag="one"):
    pass


class Tagged2(msgspec.Struct, tag="two"):
    pass


class Paint(msgspec.Struct):
    color: Color
    mode: Literal["matte", "gloss"] = "matte"
    shape: Tagged1 | Tagged2 | None = None


def _all_text(exc: BaseException) -> str:
    parts = [str(exc)]
    for e in getattr(exc, "errors", ()):
        parts.extend([e.field, e.message])
    return " ".join(parts)


@pytest.mark.parametrize(
    "paint",
    [
        Paint(color=SECRET),  # type: ignore[arg-type]
        Paint(color=Color.RED, mode=SECRET),  # type: ignore[arg-type]
        Paint(color=Color.RED, shape={"type": SECRET}),  # type: ignore[arg-type]
    ],
    ids=["enum", "literal", "tag"],
)
def test_msgspec_validation_never_echoes_the_rejected_value(paint: Paint) -> None:
    with pytest.raises(ValidationError) as info:
        ValidationBehavior().check(paint)
    assert SECRET not in _all_text(info.value)
    assert "hunter2" not in _all_text(info.value)
    assert info.value.errors  # still names the failing field
    assert info.value.errors[0].field in ("color", "mode", "shape", "shape.type")


@pytest.mark.parametrize("field", ["color", "mode"])
def test_msgspec_decoding_never_echoes_the_rejected_value(field: str) -> None:
    codec = ValueCodecs().codec(Paint, where="test")
    data = {"color": "red", field: SECRET}
    with pytest.raises(SerializationError) as info:
        codec.loads(json.dumps(data))
    assert "hunter2" not in str(info.value)
    assert field in str(info.value)


@dataclass(frozen=True, slots=True)
class Plain:
    a: int


class PydanticPlain(pydantic.BaseModel):
    a: int


class StructPlain(msgspec.Struct):
    a: int


@pytest.mark.parametrize("cls", [Plain, PydanticPlain, StructPlain])
def test_unknown_field_errors_shorten_long_keys(cls: type) -> None:
    codec = ValueCodecs().codec(cls, where="test")
    long_key = "k" * 100_000
    extra = {f"x{i}-" + "y" * 5_000: i for i in range(50)}
    for data in ({"a": 1, long_key: 1}, {"a": 1, **extra}):
        with pytest.raises(SerializationError, match="unknown field") as info:
            codec.loads(json.dumps(data))
        assert len(str(info.value)) < 1_000


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    a: int = 0


class Holder(msgspec.Struct):
    inner: Strict


def test_msgspec_unknown_field_in_validation_is_shortened() -> None:
    with pytest.raises(ValidationError) as info:
        ValidationBehavior().check(Holder(inner={"k" * 100_000: 1}))  # type: ignore[arg-type]
    assert len(_all_text(info.value)) < 1_000


# -- idempotency keys: a lone surrogate is a ValidationError, not a driver error ------------


@dataclass(frozen=True, slots=True)
class KeyedNote(Command[str]):
    text: str
    idempotency_key: str | None = None


@pytest.mark.parametrize("key", ["a\ud800", "\udfffz", "ok\ud83d"])
async def test_a_lone_surrogate_in_an_idempotency_key_is_a_validation_error(key: str) -> None:
    registry = Registry()
    ran: list[str] = []

    @registry.handler
    async def note(cmd: KeyedNote, uow: InMemoryUnitOfWork) -> str:
        ran.append(cmd.text)
        return cmd.text

    store = InMemoryEventStore()
    idem = Idempotency(store)
    mediator = Mediator(registry, behaviors=[idem.transaction()], resolver=store.resolver())
    with pytest.raises(ValidationError, match="idempotency_key") as info, idempotency_key(key):
        await mediator.send(KeyedNote("x"))
    assert info.value.errors[0].field == "idempotency_key"
    with pytest.raises(ValidationError, match="idempotency_key"):
        await mediator.send(KeyedNote("y", idempotency_key=key))
    with pytest.raises(ValidationError, match="idempotency_key"):
        await idem.lookup(key)
    assert ran == []
    # a valid non-ASCII key (a proper surrogate pair in UTF-16 terms) is fine
    with idempotency_key("ключ-🙂"):
        assert await mediator.send(KeyedNote("z")) == "z"
    assert ran == ["z"]


# -- an authorization policy for an event type is refused when the behavior is built --------


@dataclass(frozen=True, slots=True)
class NoteTaken(Event):
    text: str


def test_a_policy_for_an_event_type_is_refused_at_build_time() -> None:
    principal: ContextVar[str | None] = ContextVar("principal", default=None)
    for build in (
        lambda: AuthorizationBehavior({NoteTaken: authenticated}, principal=principal),
        lambda: SyncAuthorizationBehavior({NoteTaken: authenticated}, principal=principal),
        lambda: AuthorizationBehavior.resolving(str, {NoteTaken: authenticated}),
        lambda: SyncAuthorizationBehavior.resolving(str, {NoteTaken: authenticated}),
    ):
        with pytest.raises(ConfigurationError, match="NoteTaken") as info:
            build()
        assert info.value.hint is not None
        assert "command" in info.value.hint
    # command and query policies are still accepted beside it
    AuthorizationBehavior({KeyedNote: authenticated}, principal=principal)
