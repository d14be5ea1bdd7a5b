"""The in-memory event store passes the conformance kit; plus port-level checks."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from cqrskit import Command, Event, Mediator, Registry
from cqrskit._encoding import encode_event
from cqrskit.errors import (
    ConfigurationError,
    DependencyError,
    PublishError,
    SerializationError,
)
from cqrskit.eventlog import (
    EventStore,
    InMemoryEventStore,
    InMemoryUnitOfWork,
    UnitOfWork,
    validate_identifier,
)
from cqrskit.testing.eventlog import EventStoreConformance


class TestInMemoryEventStore(EventStoreConformance):
    async def make_store(self) -> EventStore:
        return InMemoryEventStore()

    async def close_store(self, store: EventStore) -> None:
        return None

    async def write_state(self, uow: UnitOfWork, key: str) -> None:
        assert isinstance(uow, InMemoryUnitOfWork)
        uow.changes[key] = True

    async def state_keys(self, store: EventStore) -> set[str]:
        assert isinstance(store, InMemoryEventStore)
        return set(store.state)


@dataclass(frozen=True, slots=True)
class Ping(Command[None]):
    pass


@dataclass(frozen=True, slots=True)
class Pinged(Event):
    n: int


@pytest.mark.parametrize("name", ["events", "_x", "a" * 63, "cqrskit_t_0f"])
def test_valid_identifiers_are_quoted(name: str) -> None:
    assert validate_identifier(name) == f'"{name}"'


@pytest.mark.parametrize(
    "name",
    ["", "Events", "1abc", "a" * 64, 'x"; drop table y; --', "a-b", "a b", "é", "events\n"],
)
def test_invalid_identifiers_are_rejected(name: str) -> None:
    with pytest.raises(ConfigurationError, match="must match"):
        validate_identifier(name, "table name")


async def test_unit_of_work_outside_a_command_is_a_clear_error() -> None:
    store = InMemoryEventStore()
    registry = Registry()

    @registry.handler
    async def on_ping(e: Pinged, uow: UnitOfWork) -> None:
        raise AssertionError("must not run")

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    with pytest.raises(PublishError) as info:
        await mediator.publish(Pinged(1))
    assert isinstance(info.value.exceptions[0], DependencyError)
    assert "only command handlers" in str(info.value.exceptions[0])


async def test_driver_subclass_type_resolves_to_the_same_unit_of_work() -> None:
    store = InMemoryEventStore()
    registry = Registry()
    got: list[object] = []

    @registry.handler
    async def ping(cmd: Ping, uow: InMemoryUnitOfWork, base: UnitOfWork) -> None:
        got.extend([uow, base])
        uow.record("p", Pinged(1))

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    await mediator.send(Ping())
    assert got[0] is got[1]
    assert isinstance(got[0], InMemoryUnitOfWork)
    assert not got[0].active
    assert [e.stream for e in await store.read_after(0)] == ["p"]


async def test_handler_committing_itself_is_refused_and_rolled_back() -> None:
    store = InMemoryEventStore()
    registry = Registry()

    @registry.handler
    async def ping(cmd: Ping, uow: UnitOfWork) -> None:
        await uow.rollback()

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    with pytest.raises(Exception, match="committed or rolled back the unit of work itself"):
        await mediator.send(Ping())


def test_encode_event_names_and_json() -> None:
    enc = encode_event(Pinged(3))
    assert enc == ("Pinged", 1, '{"n":3}')

    @dataclass(frozen=True)
    class Custom(Event):
        __event_type__ = "custom.v2"
        __schema_version__ = 2
        x: float

    assert encode_event(Custom(1.5)) == ("custom.v2", 2, '{"x":1.5}')
    with pytest.raises(SerializationError, match="Custom"):
        encode_event(Custom(float("nan")))


async def test_read_after_pages_by_position() -> None:
    store = InMemoryEventStore()
    for i in range(5):
        uow = await store.begin()
        uow.record("s", Pinged(i))
        await uow.commit()
    first = await store.read_after(0, 2)
    assert [e.version for e in first] == [1, 2]
    rest = await store.read_after(first[-1].position, 10)
    assert [e.version for e in rest] == [3, 4, 5]
    assert await store.read_after(rest[-1].position) == []


class _SlowHeadStore(InMemoryEventStore):
    """The issue's reproduction: ``head()`` reads the log, then takes a while to answer."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def head(self) -> int:
        value = await super().head()
        self.entered.set()
        await self.release.wait()
        return value


async def test_wait_for_sees_a_commit_made_while_head_runs() -> None:
    # a commit lands while wait_for is inside head() (which answered 0): the wake-up must
    # not be lost, so wait_for returns True at once instead of sleeping its whole timeout
    store = _SlowHeadStore()
    waiter = asyncio.ensure_future(store.wait_for(0, timeout=2.0))
    await asyncio.wait_for(store.entered.wait(), 5)
    uow = await store.begin()
    uow.record("s", Pinged(1))
    assert await uow.commit() == 1
    store.release.set()
    assert await asyncio.wait_for(waiter, 5) is True  # woken (False: slept to the timeout)
    assert await store.head() == 1


async def test_wait_for_refuses_a_nan_timeout() -> None:
    store = InMemoryEventStore()
    with pytest.raises(ValueError, match="timeout"):
        await store.wait_for(0, float("nan"))


async def test_backlog_counts_committed_events_up_to_a_limit() -> None:
    store = InMemoryEventStore()
    assert await store.backlog(0, 10) == (0, None)
    for i in range(5):
        uow = await store.begin()
        uow.record("s", Pinged(i))
        await uow.commit()
    count, oldest = await store.backlog(2, 10)
    assert count == 3
    assert oldest is not None
    assert abs(oldest - time.time()) < 60
    assert (await store.backlog(0, 2))[0] == 2
    assert await store.backlog(5, 10) == (0, None)
    assert await store.oldest_appender() is None  # nothing holds in-memory readers back
