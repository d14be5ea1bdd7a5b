"""An in-process broadcast: projectors announce committed checkpoints, waiters wake."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Applied", "Signal"]


@dataclass(frozen=True, slots=True)
class Applied:
    """What this process's leading projector has committed for one projection.

    Attributes:
        generation: the active generation it applies.
        position: its committed checkpoint.
        parked: an upper bound of the positions of its parked events (0: none).
        until: monotonic time up to which the lease is surely still its own.
    """

    generation: int
    position: int
    parked: int
    until: float


class Signal:
    """Wake every current waiter; waiters re-check their condition (wake-ups are hints).

    A leading projector also records here what it committed (:meth:`applied`), so that a
    :class:`~cqrskit.projections.ConsistencyGate` in the same process can answer a token
    that is already applied without a round trip to the read database.
    """

    __slots__ = ("_event", "_applied")

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._applied: dict[str, Applied] = {}

    def notify(self) -> None:
        """Wake all waiters."""
        event = self._event
        self._event = asyncio.Event()
        event.set()

    async def wait(self, timeout: float) -> bool:
        """Wait for the next :meth:`notify` or ``timeout`` seconds; ``True`` if notified."""
        if not timeout > 0:  # also NaN: never hand the event loop a NaN deadline
            return False
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def applied(self, name: str, state: Applied | None) -> None:
        """Record (``None``: forget) what the leader of ``name`` in this process committed."""
        if state is None:
            self._applied.pop(name, None)
        else:
            self._applied[name] = state

    def reached(self, names: Sequence[str], token: int, window: int) -> dict[str, int] | None:
        """The committed checkpoints of ``names`` if this process's leaders applied
        ``token`` in every one of them, with no event parked in ``(token - window,
        token]`` and their leases surely still held; else ``None`` (ask the database)."""
        found: dict[str, int] = {}
        now = time.monotonic()
        applied = self._applied
        for name in names:
            state = applied.get(name)
            if (
                state is None
                or state.position < token
                or state.until <= now
                or (state.parked and state.parked > token - window)
            ):
                return None
            found[name] = state.position
        return found
