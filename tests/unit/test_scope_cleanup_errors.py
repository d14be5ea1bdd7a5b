"""A failing cleanup never replaces the dispatch's own error or cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from cqrskit import Command, Dependencies, Mediator, Query, Registry, ValidationError


class Session:
    pass


def failing_cleanup() -> Iterator[Session]:
    try:
        yield Session()
    finally:
        raise RuntimeError("cleanup failed")


@dataclass(frozen=True)
class Invalid(Command[None]):
    pass


@dataclass(frozen=True)
class Slow(Command[None]):
    pass


@dataclass(frozen=True)
class Fine(Command[None]):
    pass


def app(started: asyncio.Event) -> Mediator:
    registry = Registry()

    @registry.handler
    async def invalid(cmd: Invalid, session: Session, other: Session) -> None:
        raise ValidationError({"field": "bad"}, message_type=Invalid)

    @registry.handler
    async def slow(cmd: Slow, session: Session, other: Session) -> None:
        started.set()
        await asyncio.Event().wait()

    @registry.handler
    async def fine(cmd: Fine, session: Session, other: Session) -> None:
        return None

    deps = Dependencies()
    deps.scoped(Session, failing_cleanup)
    return Mediator(registry, resolver=deps)


async def test_handler_error_survives_a_failing_cleanup() -> None:
    mediator = app(asyncio.Event())
    with pytest.raises(ValidationError) as info:
        await mediator.send(Invalid())
    assert any("cleanup also failed" in note for note in info.value.__notes__)


async def test_cancellation_survives_a_failing_cleanup() -> None:
    started = asyncio.Event()
    mediator = app(started)
    task = asyncio.create_task(mediator.send(Slow()))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_cleanup_error_is_raised_when_the_dispatch_succeeded() -> None:
    mediator = app(asyncio.Event())
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await mediator.send(Fine())


@dataclass(frozen=True)
class Rows(Query[AsyncIterator[int]]):
    pass


async def test_closing_a_stream_early_closes_its_scope() -> None:
    closed: list[bool] = []

    def session() -> Iterator[Session]:
        try:
            yield Session()
        finally:
            closed.append(True)

    registry = Registry()

    @registry.handler
    async def rows(query: Rows, session: Session) -> AsyncIterator[int]:
        for i in range(100):
            yield i

    deps = Dependencies()
    deps.scoped(Session, session)
    mediator = Mediator(registry, resolver=deps)
    async with contextlib.aclosing(mediator.stream(Rows())) as stream:
        async for row in stream:
            if row == 2:
                break
    assert closed == [True]
