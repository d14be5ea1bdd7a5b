"""The write path's shortcuts keep the semantics of what they replace."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pytest

from cqrskit import Event, Mediator, Registry, WrongMessageKindError
from cqrskit._encoding import encode_event
from cqrskit.errors import SerializationError
from cqrskit.messages import _new_id


@dataclass(frozen=True)
class Base(Event):
    n: int


@dataclass(frozen=True)
class Child(Base):
    pass


@dataclass(frozen=True)
class Unhandled(Event):
    n: int


@dataclass(frozen=True)
class Anything(Event):
    value: object


def test_new_id_is_a_uuid4_hex() -> None:
    ids = {_new_id() for _ in range(2000)}
    assert len(ids) == 2000
    for h in ids:
        u = uuid.UUID(hex=h)
        assert u.hex == h
        assert u.version == 4
        assert u.variant == uuid.RFC_4122


def test_has_event_handlers_follows_publish() -> None:
    seen: list[Event] = []
    registry = Registry()

    @registry.handler
    async def on_base(event: Base) -> None:
        seen.append(event)

    mediator = Mediator(registry)
    assert mediator.has_event_handlers(Base)
    assert mediator.has_event_handlers(Child)  # through its base type
    assert not mediator.has_event_handlers(Unhandled)
    assert not mediator.has_event_handlers(int)


async def test_has_event_handlers_leaves_publish_checks_in_place() -> None:
    mediator = Mediator(Registry())
    assert not mediator.has_event_handlers(int)
    with pytest.raises(WrongMessageKindError):
        await mediator.publish(5)  # type: ignore[arg-type]
    assert not mediator.has_event_handlers(Unhandled)
    await mediator.publish(Unhandled(1))


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "quote ' \" and é \u2028 \x00",
        1,
        1.5,
        None,
        True,
        [1, {"a": [2, 3]}],
        {"k": {1: 2}},
    ],
)
def test_encode_event_matches_the_stdlib_encoder(value: object) -> None:
    expected = json.dumps(
        {"value": value}, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str
    )
    assert encode_event(Anything(value)).data == expected


def test_encode_event_refuses_a_container_holding_itself() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match="Anything"):
        encode_event(Anything(loop))


def test_encode_event_refuses_nan() -> None:
    with pytest.raises(SerializationError, match="Anything"):
        encode_event(Anything(float("nan")))
