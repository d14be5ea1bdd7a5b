"""ValidationBehavior / SyncValidationBehavior."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import pydantic
import pytest

from cqrskit import Command, Event, FieldError, Mediator, Query, Registry, ValidationError
from cqrskit.pipeline import SyncValidationBehavior, ValidationBehavior, field_path


class Line(pydantic.BaseModel):
    sku: str = pydantic.Field(min_length=1)
    qty: int = pydantic.Field(gt=0)


class PlaceOrder(pydantic.BaseModel, Command[str]):
    model_config = pydantic.ConfigDict(frozen=True)

    customer: str = pydantic.Field(max_length=5, alias="Customer")
    total: int = pydantic.Field(ge=0)
    lines: list[Line]


class SLine(msgspec.Struct, frozen=True):
    sku: Annotated[str, msgspec.Meta(min_length=1)]
    qty: Annotated[int, msgspec.Meta(gt=0)]


class Ship(msgspec.Struct, Command[None], frozen=True):
    address: Annotated[str, msgspec.Meta(max_length=10)]
    weight: float
    lines: list[SLine]
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Rename(Command[None]):
    name: str
    nickname: str


@dataclass(frozen=True, slots=True)
class RenameVip(Rename):
    pass


@dataclass(frozen=True, slots=True)
class Plain(Query[int]):
    n: int


async def _ok(message: Any) -> str:
    return "handled"


def test_field_path() -> None:
    assert field_path(("lines", 0, "qty")) == "lines[0].qty"
    assert field_path(()) == ""
    assert field_path((2, "a")) == "[2].a"


async def test_pydantic_lists_every_failing_field_with_paths() -> None:
    bad = PlaceOrder.model_construct(
        customer="toolongname", total=-3, lines=[Line.model_construct(sku="", qty=0)]
    )
    behavior = ValidationBehavior()
    with pytest.raises(ValidationError) as info:
        await behavior(bad, _ok)
    fields = [e.field for e in info.value.errors]
    assert fields == ["customer", "total", "lines[0].sku", "lines[0].qty"]
    assert info.value.message_type is PlaceOrder
    assert "toolongname" not in str(info.value)  # values are never echoed


async def test_pydantic_valid_model_passes_through() -> None:
    good = PlaceOrder(Customer="ada", total=3, lines=[Line(sku="a", qty=1)])
    assert await ValidationBehavior()(good, _ok) == "handled"


async def test_msgspec_lists_every_failing_leaf() -> None:
    bad = Ship(
        address="far too long an address",
        weight="heavy",  # type: ignore[arg-type]
        lines=[SLine(sku="", qty=1), SLine(sku="b", qty=-1)],
        note=3,  # type: ignore[arg-type]
    )
    with pytest.raises(ValidationError) as info:
        await ValidationBehavior()(bad, _ok)
    fields = [e.field for e in info.value.errors]
    assert fields == ["address", "weight", "lines[0].sku", "lines[1].qty", "note"]
    by_field = {e.field: e.message for e in info.value.errors}
    assert by_field["weight"] == "Expected `float`, got `str`"
    assert "far too long" not in str(info.value)


async def test_msgspec_valid_struct_passes() -> None:
    good = Ship(address="here", weight=1.5, lines=[SLine(sku="a", qty=1)])
    assert await ValidationBehavior()(good, _ok) == "handled"


async def test_callable_validators_all_run_and_inherit() -> None:
    def name_rules(cmd: Rename) -> list[FieldError]:
        errors = []
        if not cmd.name:
            errors.append(FieldError("name", "must not be empty"))
        if cmd.nickname == cmd.name:
            errors.append(FieldError("nickname", "must differ from name"))
        return errors

    def vip_rule(cmd: RenameVip) -> None:
        raise ValidationError([FieldError("name", "VIP names need approval")])

    def fine(cmd: Rename) -> None:
        return None

    behavior = ValidationBehavior({Rename: [name_rules, fine], RenameVip: vip_rule})
    with pytest.raises(ValidationError) as info:
        await behavior(RenameVip("", ""), _ok)
    assert info.value.errors == [
        FieldError("name", "must not be empty"),
        FieldError("nickname", "must differ from name"),
        FieldError("name", "VIP names need approval"),
    ]
    assert info.value.message_type is RenameVip
    assert await behavior(Rename("a", "b"), _ok) == "handled"


async def test_callables_run_only_when_the_model_is_well_formed() -> None:
    calls: list[object] = []

    def rule(cmd: Any) -> None:
        calls.append(cmd)

    behavior = ValidationBehavior({PlaceOrder: rule})
    bad = PlaceOrder.model_construct(customer="x", total=-1, lines=[])
    with pytest.raises(ValidationError):
        await behavior(bad, _ok)
    assert calls == []
    await behavior(PlaceOrder(Customer="x", total=1, lines=[]), _ok)
    assert len(calls) == 1


async def test_unrelated_validator_errors_propagate() -> None:
    def broken(cmd: Rename) -> None:
        raise RuntimeError("bug in validator")

    with pytest.raises(RuntimeError, match="bug in validator"):
        await ValidationBehavior({Rename: broken})(Rename("a", "b"), _ok)


async def test_type_without_checks_returns_next_awaitable_itself() -> None:
    behavior = ValidationBehavior()
    awaitable = _ok(Plain(1))
    assert behavior(Plain(1), lambda m: awaitable) is awaitable
    await awaitable


async def test_invalid_message_never_reaches_the_handler_through_a_mediator() -> None:
    registry = Registry()
    handled: list[object] = []

    @registry.handler
    async def rename(cmd: Rename) -> None:
        handled.append(cmd)

    mediator = Mediator(
        registry,
        behaviors=[ValidationBehavior({Rename: lambda c: [FieldError("name", "bad")]})],
    )
    pending = mediator.send(Rename("a", "b"))  # errors surface when awaited, not before
    with pytest.raises(ValidationError, match="name: bad"):
        await pending
    assert handled == []


def test_models_can_be_turned_off_and_non_callable_rejected() -> None:
    bad = PlaceOrder.model_construct(customer="x", total=-1, lines=[])
    assert SyncValidationBehavior(models=False)(bad, lambda m: "through") == "through"
    with pytest.raises(TypeError, match="not callable"):
        ValidationBehavior({Rename: "nope"})  # type: ignore[dict-item]


def test_sync_twin() -> None:
    behavior = SyncValidationBehavior({Rename: lambda c: [FieldError("nickname", "taken")]})
    with pytest.raises(ValidationError) as info:
        behavior(Rename("a", "b"), lambda m: "no")
    assert info.value.errors == [FieldError("nickname", "taken")]
    bad = Ship(address="x", weight=1.0, lines=[SLine(sku="", qty=0)])
    with pytest.raises(ValidationError) as info2:
        behavior(bad, lambda m: "no")
    assert [e.field for e in info2.value.errors] == ["lines[0].sku", "lines[0].qty"]
    assert behavior(Plain(1), lambda m: 7) == 7


def test_events_are_validated_too() -> None:
    @dataclass(frozen=True)
    class Happened(Event):
        n: int

    behavior = SyncValidationBehavior({Happened: lambda e: [FieldError("n", "odd")] * (e.n % 2)})
    assert behavior(Happened(2), lambda m: None) is None
    with pytest.raises(ValidationError):
        behavior(Happened(1), lambda m: None)


def test_pydantic_and_msgspec_are_not_imported_for_plain_messages() -> None:
    code = (
        "import sys, asyncio\n"
        "from dataclasses import dataclass\n"
        "from cqrskit import Command\n"
        "from cqrskit.pipeline import ValidationBehavior\n"
        "@dataclass(frozen=True)\n"
        "class C(Command[int]):\n"
        "    n: int\n"
        "async def ok(m): return 1\n"
        "assert asyncio.run(ValidationBehavior()(C(1), ok)) == 1\n"
        "print('pydantic' in sys.modules, 'msgspec' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PYTHONPATH": "src"},
    )
    assert out.stdout.strip() == "False False"


def test_msgspec_walk_is_bounded_on_cyclic_containers() -> None:
    loop: list[Any] = []
    loop.append(loop)

    class Cyclic(msgspec.Struct, Command[None]):
        items: list[list[Any]]

    behavior = SyncValidationBehavior()
    with pytest.raises(ValidationError) as info:
        behavior(Cyclic(items=loop), lambda m: None)
    assert len(info.value.errors) == 1
    assert info.value.errors[0].field == "items[0][0]"
    assert info.value.errors[0].message == "nested too deeply to validate"


class Extra(pydantic.BaseModel, Command[None]):
    model_config = pydantic.ConfigDict(extra="allow")

    by_key: dict[str, Line]
    pair: tuple[Line, Line]


def test_pydantic_nested_in_dicts_tuples_and_extra_fields() -> None:
    bad = Extra.model_construct(
        by_key={"a": Line.model_construct(sku="", qty=1)},
        pair=(Line(sku="ok", qty=1), Line.model_construct(sku="x", qty=-5)),
    )
    object.__setattr__(bad, "__pydantic_extra__", {"note": "kept"})
    behavior = ValidationBehavior()
    with pytest.raises(ValidationError) as info:
        behavior.check(bad)
    assert [e.field for e in info.value.errors] == ["by_key.a.sku", "pair[1].qty"]
    good = Extra(by_key={}, pair=(Line(sku="a", qty=1), Line(sku="b", qty=2)))
    behavior.check(good)  # returns None: valid


class Wrapper(msgspec.Struct, Command[None]):
    inner: SLine | None
    blob: Any = None


def test_msgspec_optional_struct_and_unencodable_values() -> None:
    behavior = SyncValidationBehavior({Wrapper: lambda m: [FieldError("blob", "custom")]})
    with pytest.raises(ValidationError) as info:
        behavior(Wrapper(inner=SLine(sku="", qty=1), blob=object()), lambda m: None)
    assert [(e.field, e.message) for e in info.value.errors] == [
        ("inner.sku", "Expected `str` of length >= 1"),
        ("blob", "unsupported value of type object"),
    ]
    # the model is well-formed: the registered callable runs
    with pytest.raises(ValidationError) as info2:
        behavior(Wrapper(inner=None), lambda m: None)
    assert info2.value.errors == [FieldError("blob", "custom")]
