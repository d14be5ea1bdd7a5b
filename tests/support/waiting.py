"""Bounded waiting on a projector's signal (no sleeps standing in for synchronization)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from cqrskit.eventlog import EventStore
from cqrskit.projections import Signal


async def until(
    check: Callable[[], Awaitable[bool]], signal: Signal, timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"condition not met within {timeout}s")
        await signal.wait(min(remaining, 0.05))


async def visible(log: EventStore, position: int, timeout: float = 10.0) -> None:
    """Wait until ``position`` is readable (on PostgreSQL a commit becomes readable once no
    older writer of the same event log is still open)."""
    deadline = time.monotonic() + timeout
    while await log.head() < position:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"position {position} not visible within {timeout}s")
        await log.wait_for(await log.head(), min(remaining, 0.05))
