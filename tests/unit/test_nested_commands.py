"""A nested command that fails cannot leave its events (or state) in the outer commit."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cqrskit import Command, Event, Mediator, PersistenceError, Registry
from cqrskit.eventlog import InMemoryEventStore, UnitOfWork


@dataclass(frozen=True)
class Outer(Command[str]):
    catch: bool


@dataclass(frozen=True)
class Inner(Command[None]):
    pass


@dataclass(frozen=True)
class Happened(Event):
    what: str


def app(store: InMemoryEventStore) -> Mediator:
    registry = Registry()

    @registry.handler
    async def outer(cmd: Outer, uow: UnitOfWork, mediator: Mediator) -> str:
        uow.record("outer", Happened("outer"))
        try:
            await mediator.send(Inner())
        except ValueError:
            if not cmd.catch:
                raise
            return "caught"
        return "done"

    @registry.handler
    async def inner(cmd: Inner, uow: UnitOfWork) -> None:
        uow.record("inner", Happened("inner"))
        raise ValueError("inner failed")

    return Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())


async def test_a_caught_nested_failure_fails_the_outer_commit() -> None:
    store = InMemoryEventStore()
    with pytest.raises(PersistenceError, match="nothing is committed") as info:
        await app(store).send(Outer(catch=True))
    assert isinstance(info.value.__cause__, ValueError)
    assert await store.read_after(0) == []


async def test_a_propagated_nested_failure_rolls_everything_back() -> None:
    store = InMemoryEventStore()
    with pytest.raises(ValueError, match="inner failed"):
        await app(store).send(Outer(catch=False))
    assert await store.read_after(0) == []
