"""The queue of the PostgreSQL write connections: a freed slot is never lost."""

from __future__ import annotations

import asyncio

import pytest

from cqrskit.postgres._connections import _Retry, _WriteConnections


class _Dead:
    """A connection the server ended."""

    def is_closed(self) -> bool:
        return True

    def terminate(self) -> None:
        pass


async def test_a_freed_slot_handed_to_a_cancelled_caller_goes_to_the_next() -> None:
    """A slot frees (a connection died) and the first queued caller is told to open a
    new one, but it is cancelled in the same pass: the next queued caller gets the slot
    instead of waiting until acquire_timeout for a pool that is not full."""
    w = _WriteConnections("postgresql://unused", size=1, acquire_timeout=30.0)
    w._opened = 1  # the one connection is busy elsewhere
    first = asyncio.ensure_future(w.acquire())
    second = asyncio.ensure_future(w.acquire())
    await asyncio.sleep(0)  # both queue
    assert len(w._waiters) == 2
    w.release(_Dead(), broken=True)  # the busy one died: its slot is free
    first.cancel()  # the first caller went away in the same pass
    await asyncio.gather(first, return_exceptions=True)
    assert w._opened == 0
    with pytest.raises(_Retry):  # told at once to open a connection in the free slot
        await asyncio.wait_for(second, 5)
    assert not w._waiters
