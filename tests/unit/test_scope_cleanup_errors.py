"""A failing cleanup never replaces the dispatch's own error or cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from cqrskit import Command, Dependencies, Mediator, Registry, ValidationError


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
