"""An in-process broadcast: projectors announce committed checkpoints, waiters wake."""

from __future__ import annotations

import asyncio

__all__ = ["Signal"]


class Signal:
    """Wake every current waiter; waiters re-check their condition (wake-ups are hints)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

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
