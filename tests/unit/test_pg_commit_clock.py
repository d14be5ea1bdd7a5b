"""The PostgreSQL store's bound on COMMIT replies: one timer for every commit in flight,
each commit held to its own deadline."""

from __future__ import annotations

import asyncio

from cqrskit.postgres._connections import _CommitClock

TIMEOUT = 0.2
BOUND = 5.0


class Conn:
    """Stands for an asyncpg connection: records when the clock ended it."""

    def __init__(self) -> None:
        self.ended_at: float | None = None
        self.ended = asyncio.Event()

    def terminate(self) -> None:
        assert self.ended_at is None, "ended twice"
        self.ended_at = asyncio.get_running_loop().time()
        self.ended.set()


async def test_a_commit_without_reply_is_ended_at_its_deadline() -> None:
    clock = _CommitClock(TIMEOUT)
    loop = asyncio.get_running_loop()
    conn = Conn()
    started = loop.time()
    clock.start(conn)
    await asyncio.wait_for(conn.ended.wait(), BOUND)
    assert conn.ended_at is not None
    assert conn.ended_at - started >= TIMEOUT - 0.01  # not before (clock resolution)
    assert clock.stop(conn) is False  # the commit learns that the clock ended it
    clock.close()


async def test_each_commit_keeps_its_own_deadline_and_a_finished_one_is_never_ended() -> None:
    clock = _CommitClock(TIMEOUT)
    loop = asyncio.get_running_loop()
    first, second = Conn(), Conn()
    clock.start(first)  # arms the timer for first's deadline
    clock.start(second)
    await asyncio.sleep(TIMEOUT / 2)  # time passes (not a synchronization)
    assert clock.stop(second) is True  # replied in time
    again = loop.time()
    clock.start(second)  # the connection's next commit: a fresh deadline
    await asyncio.wait_for(first.ended.wait(), BOUND)
    assert second.ended_at is None  # the timer fired for first, second is not due yet
    await asyncio.wait_for(second.ended.wait(), BOUND)
    assert second.ended_at is not None
    assert second.ended_at - again >= TIMEOUT - 0.01
    assert clock.stop(first) is False
    assert clock.stop(second) is False
    # a commit that replied is not ended by a timer armed while it was in flight
    third = Conn()
    clock.start(third)
    assert clock.stop(third) is True
    fourth = Conn()
    clock.start(fourth)
    await asyncio.wait_for(fourth.ended.wait(), BOUND)
    assert third.ended_at is None
    clock.close()


def test_a_timer_left_on_a_closed_loop_does_not_unbound_the_next_loop() -> None:
    clock = _CommitClock(TIMEOUT)
    conn = Conn()

    async def on_first_loop() -> None:
        clock.start(conn)  # the timer is armed on this loop, which then ends
        assert clock.stop(conn) is True

    async def on_second_loop() -> None:
        late = Conn()
        clock.start(late)
        await asyncio.wait_for(late.ended.wait(), BOUND)
        assert clock.stop(late) is False

    asyncio.run(on_first_loop())
    asyncio.run(on_second_loop())
    clock.close()
