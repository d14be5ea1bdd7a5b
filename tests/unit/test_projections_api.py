"""Projection API, SQL rewriting and small pieces, without a database server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from cqrskit import Event
from cqrskit.errors import ConfigurationError, RegistrationError
from cqrskit.projections import (
    InlineProjections,
    Projection,
    ProjectionContext,
    Signal,
    physical_table,
    reads,
)
from cqrskit.projections.db import check_identifier, to_dollar
from cqrskit.sqlite import SqliteReadDatabase


@dataclass(frozen=True, slots=True)
class Base(Event):
    key: str


@dataclass(frozen=True, slots=True)
class Child(Base):
    pass


@dataclass(frozen=True, slots=True)
class Other(Event):
    pass


def make() -> Projection:
    return Projection("things", tables={"things": ("CREATE TABLE {things} (k TEXT)",)})


def test_handlers_by_annotation_explicit_type_and_base_class() -> None:
    p = make()

    @p.on
    async def on_base(e: Base, ctx: ProjectionContext) -> None: ...

    @p.on(Other)
    async def on_other(e: object, ctx: ProjectionContext) -> None: ...

    assert p.handler_for(Base) is on_base
    assert p.handler_for(Child) is on_base
    assert p.handler_for(Other) is on_other
    assert p.handler_for(Event) is None
    assert set(p.event_types) == {Base, Other}


def test_registration_errors_name_the_problem() -> None:
    p = make()
    with pytest.raises(RegistrationError, match="Event subclass"):

        @p.on
        async def no_annotation(e, ctx) -> None:  # type: ignore[no-untyped-def]
            ...

    with pytest.raises(RegistrationError, match="async def"):

        @p.on
        def not_async(e: Base, ctx: ProjectionContext) -> None: ...

    @p.on
    async def first(e: Base, ctx: ProjectionContext) -> None: ...

    with pytest.raises(RegistrationError, match="already has a handler"):

        @p.on
        async def second(e: Base, ctx: ProjectionContext) -> None: ...


@pytest.mark.parametrize("name", ["Upper", "1abc", "a-b", 'x"; drop', "", "a" * 64, "balances\n"])
def test_identifiers_are_validated(name: str) -> None:
    with pytest.raises(ConfigurationError):
        check_identifier(name)
    with pytest.raises(ConfigurationError):
        Projection(name, tables={})
    with pytest.raises(ConfigurationError):
        Projection("ok", tables={name: ()})


def test_generations_have_their_own_tables() -> None:
    p = make()
    assert physical_table("things", 3) == "things__g3"
    assert p.ddl(2) == ['CREATE TABLE "things__g2" (k TEXT)']
    ctx = ProjectionContext(object(), 2, p.physical_tables(2))  # type: ignore[arg-type]
    assert ctx.table("things") == '"things__g2"'
    with pytest.raises(RegistrationError, match="no table 'nope'"):
        ctx.table("nope")


def test_placeholders_rewritten_outside_quotes() -> None:
    sql = "SELECT '?', \"a?\" FROM t WHERE a = ? AND b = 'it''s ?' AND c = ?"
    assert to_dollar(sql) == ("SELECT '?', \"a?\" FROM t WHERE a = $1 AND b = 'it''s ?' AND c = $2")


def test_postgres_session_qualifies_bookkeeping_names() -> None:
    pytest.importorskip("asyncpg")
    from cqrskit.postgres import PostgresSession

    s = PostgresSession(object(), "rm", {})
    assert s._sql(
        "UPDATE cqrskit_checkpoints SET position = ? WHERE x = 'cqrskit_projections'"
    ) == ("UPDATE \"rm\".cqrskit_checkpoints SET position = $1 WHERE x = 'cqrskit_projections'")
    assert s.qualify("accounts__g1") == '"rm"."accounts__g1"'


def test_reads_rejects_unknown_policy() -> None:
    with pytest.raises(ConfigurationError, match="policy"):
        reads("x", policy="sometimes")  # type: ignore[arg-type]


async def test_signal_wakes_every_waiter() -> None:
    signal = Signal()
    waiters = [asyncio.create_task(signal.wait(5.0)) for _ in range(3)]
    await asyncio.sleep(0)
    signal.notify()
    assert await asyncio.gather(*waiters) == [True, True, True]
    assert await signal.wait(0.01) is False
    assert await signal.wait(0) is False


async def test_inline_hook_before_setup_is_an_error(tmp_path: object) -> None:
    db = SqliteReadDatabase(":memory:")
    inline = InlineProjections(db, [make()], lambda s: Other())
    with pytest.raises(ConfigurationError, match="setup"):
        await inline.hook(object(), [])
    await db.close()
