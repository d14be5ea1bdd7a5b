"""A cancellation an inline hook holds back (it shields its work, then asks for the
cancellation again, as a driver's COMMIT does) is delivered inside ``mediator.send``, so an
``asyncio.timeout()`` around it raises ``TimeoutError`` in its block — on every store,
including those whose own commit never holds one."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from cqrskit import Command, Event, Mediator, Registry
from cqrskit.eventlog import EventStore, InMemoryEventStore, StoredEvent, UnitOfWork
from cqrskit.sqlite import SqliteEventStore


@dataclass(frozen=True)
class Ping(Command[None]):
    pass


@dataclass(frozen=True)
class Pinged(Event):
    n: int


async def _holding_hook(uow: UnitOfWork, events: list[StoredEvent]) -> None:
    work = asyncio.ensure_future(asyncio.sleep(0.2))  # a write that must finish
    try:
        await asyncio.shield(work)
    except asyncio.CancelledError:
        await work  # hold the cancellation until it is done ...
        task = asyncio.current_task()
        assert task is not None
        task.uncancel()
        task.cancel()  # ... and ask for it again


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_cancellation_held_by_an_inline_hook_is_raised_inside_the_timeout(
    kind: str, tmp_path: Path
) -> None:
    store: EventStore = (
        InMemoryEventStore() if kind == "memory" else SqliteEventStore(tmp_path / "x.db")
    )
    try:
        assert store._commit_holds_cancellation is False
        registry = Registry()

        @registry.handler
        async def ping(cmd: Ping, uow: UnitOfWork) -> None:
            uow.record("p", Pinged(1))

        store.add_inline_hook(_holding_hook)
        mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await mediator.send(Ping())
        await asyncio.sleep(0)  # no stray cancellation after the block
        assert [e.type for e in await store.read_after(0)] == ["Pinged"]  # it committed
    finally:
        if isinstance(store, SqliteEventStore):
            store.close()
