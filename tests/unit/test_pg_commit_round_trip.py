"""The PostgreSQL commit round trip: a cancellation waits for the outcome (with asyncio's
C task and its Python one), and one timer bounds every commit in flight, each commit held
to its own deadline."""

from __future__ import annotations

import asyncio

import pytest

from cqrskit.errors import CommitOutcomeUnknownError
from cqrskit.postgres._connections import _commit_round_trip, _CommitClock

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


class Wire:
    """Stands for an asyncpg connection whose ``execute`` waits for a reply the test
    gives (or that ``terminate`` fails, as asyncpg does)."""

    def __init__(self) -> None:
        self.reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.sent: list[str] = []

    async def execute(self, sql: str) -> str:
        self.sent.append(sql)
        return await self.reply

    def terminate(self) -> None:
        if not self.reply.done():
            self.reply.set_exception(ConnectionError("connection was closed"))


TASKS = {"c": asyncio.Task, "python": asyncio.tasks._PyTask}  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", sorted(TASKS))
async def test_a_cancellation_waits_for_the_outcome_and_arrives_at_the_next_await(
    kind: str,
) -> None:
    clock = _CommitClock(BOUND)
    wire = Wire()
    steps: list[str] = []

    async def command() -> None:
        await _commit_round_trip(wire, "COMMIT", clock)
        steps.append("committed")
        await asyncio.sleep(0)  # the next await: the cancellation arrives here
        steps.append("not reached")

    task = TASKS[kind](command(), loop=asyncio.get_running_loop())
    await asyncio.sleep(0)  # the task sends COMMIT and waits for the reply
    assert wire.sent == ["COMMIT"]
    task.cancel("stop")
    await asyncio.sleep(0)
    assert not task.done()
    assert not wire.reply.cancelled()  # asyncpg's future is never cancelled
    wire.reply.set_result("COMMIT")
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["committed"]
    assert task.cancelled()
    assert task.cancelling() == 1  # counted once
    assert not clock._due
    clock.close()


@pytest.mark.parametrize("kind", sorted(TASKS))
async def test_the_reply_and_its_error_reach_the_caller(kind: str) -> None:
    clock = _CommitClock(BOUND)
    loop = asyncio.get_running_loop()
    wire = Wire()

    async def command() -> None:  # a Task takes a coroutine (3.12+), not a generator
        await _commit_round_trip(wire, "COMMIT", clock)

    task = TASKS[kind](command(), loop=loop)
    await asyncio.sleep(0)
    wire.reply.set_exception(ValueError("refused"))
    with pytest.raises(ValueError, match="refused"):
        await task
    assert not clock._due
    clock.close()


async def test_a_commit_without_reply_ends_as_an_unknown_outcome() -> None:
    clock = _CommitClock(TIMEOUT)
    wire = Wire()
    with pytest.raises(CommitOutcomeUnknownError, match=r"within 0\.2 s") as info:
        await asyncio.wait_for(_commit_round_trip(wire, "COMMIT", clock), BOUND)
    assert isinstance(info.value.__cause__, ConnectionError)
    assert not clock._due
    clock.close()
