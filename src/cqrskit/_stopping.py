"""The bound of a graceful stop, shared by the long-running workers.

:class:`~cqrskit.projections.Projector`, :class:`~cqrskit.projections.PartitionedProjector`,
:class:`~cqrskit.messaging.Relay` and :class:`~cqrskit.messaging.Consumer` take a
``stop_timeout`` (and ``stop(timeout)``): how long their batches in flight may take to
finish on stop before they are abandoned (cancelled, rolled back) and the leases released.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from cqrskit.errors import ConfigurationError

__all__ = ["cancel_and_wait", "check_stop_timeout", "finish_or_abandon"]


def check_stop_timeout(value: float, name: str = "stop_timeout") -> float:
    """Return ``value`` as a float if it is a finite number of seconds >= 0.

    Raises:
        ConfigurationError: it is not (the message names ``name``).
    """
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigurationError(
            f"{name} must be a finite number of seconds >= 0 (0 abandons the batches in "
            f"flight at once), not {value!r}."
        )
    return seconds


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], grace: float = 1.0) -> set[Any]:
    """Cancel ``tasks`` and wait until they end, for at most ``grace`` seconds, cancelling
    again those that go on: a cancelled task may await again while it unwinds (a rollback,
    a subscription's close in a ``finally``), and that await may hang too. Returns the
    tasks still running then (left to themselves: whatever they commit later is fenced by
    the lease epoch the release raises)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(0.05, left))
    for task in tasks:  # retrieve what they raised (CancelledError, or a failure)
        if task.done() and not task.cancelled():
            task.exception()
    return pending


async def finish_or_abandon(
    tasks: Sequence[asyncio.Task[Any]],
    abandons: Sequence[Callable[[], Awaitable[None]]],
    limit: float,
    log: logging.Logger,
    what: str,
) -> None:
    """Wait up to ``limit`` seconds for ``tasks`` (a worker's loops) to end; then cancel
    those still running (see :func:`cancel_and_wait`) and call the matching ``abandons``
    entry of each (which releases its leases). ``what`` names the worker in the warning."""
    _, pending = await asyncio.wait(tasks, timeout=limit)
    if not pending:
        await asyncio.gather(*tasks, return_exceptions=True)
        return
    log.warning(
        "%s: %d still busy after %.1f s; abandoning their batches", what, len(pending), limit
    )
    await cancel_and_wait(tasks)  # the pending ones; the others are done
    for abandon, task in zip(abandons, tasks, strict=True):
        if task in pending:
            await abandon()
