"""A projector's looks at its lease take no write lock: on SQLite a write transaction is
``BEGIN IMMEDIATE``, the database's one write lock, which every other writer (the leader's
batches, other projections, the application) would queue behind.

An idle leader polls the log and looks at its lease row and bookkeeping (rebuild and retry
requests) at every poll; a standby looks at the lease row at every poll. Both looks are
read-only; the write lock is taken only when there is something to write: a batch, a
heartbeat, a retry, a takeover.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from tests.support.bank import Deposited, balances, decode
from tests.support.logs import AppendLog

from cqrskit.projections import ConsistencyGate, Projector, Session
from cqrskit.sqlite import SqliteReadDatabase

BOUND = 15.0  # seconds any single wait may take


class CountingReadDatabase(SqliteReadDatabase):
    """Counts the write transactions (``BEGIN IMMEDIATE``) and read-only sessions opened."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.writes = 0
        self.reads = 0

    def transaction(
        self, *, lock_timeout: float | None = None, hold: float | None = None
    ) -> AbstractAsyncContextManager[Session]:
        self.writes += 1
        return super().transaction(lock_timeout=lock_timeout, hold=hold)

    def read_only(self) -> AbstractAsyncContextManager[Session]:
        self.reads += 1
        return super().read_only()


def count_polls(log: AppendLog) -> Callable[[], int]:
    """Count the projectors' idle waits on ``log`` (one per poll that found nothing)."""
    calls = [0]
    wait_for = log.wait_for  # type: ignore[attr-defined]

    async def counted(position: int, timeout: float) -> bool:
        calls[0] += 1
        return bool(await wait_for(position, timeout))

    log.wait_for = counted  # type: ignore[attr-defined]
    return lambda: calls[0]


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {BOUND} s"
        await asyncio.sleep(0.01)


async def test_an_idle_leader_polls_without_the_write_lock(
    log: AppendLog, read_location: str
) -> None:
    db = CountingReadDatabase(read_location)
    polls = count_polls(log)
    # lease_ttl far beyond the test: no heartbeat is due while it runs
    leader = Projector(
        log, db, [balances], decode, lease_ttl=300.0, poll_interval=0.01, owner="leader"
    )
    await leader.start()
    try:
        [e] = await log.append("a", Deposited("a", 1))
        gate = ConsistencyGate(log, db, signal=leader.signal)
        await gate.check(["balances"], e.position, "wait", BOUND)
        writes, reads, seen = db.writes, db.reads, polls()
        await until(lambda: polls() >= seen + 20, "20 idle polls")
        assert leader.leading("balances")
        assert db.writes == writes  # no BEGIN IMMEDIATE for looking
        assert db.reads > reads  # it did look (lease, rebuild and retry requests)
        # a write is still applied at once: the read-only looks did not stop the work
        [e] = await log.append("a", Deposited("a", 2))
        await gate.check(["balances"], e.position, "wait", BOUND)
        assert db.writes > writes
    finally:
        await leader.stop()
        await db.close()


async def test_a_standby_polls_without_the_write_lock(log: AppendLog, read_location: str) -> None:
    leader_db = CountingReadDatabase(read_location)
    standby_db = CountingReadDatabase(read_location)
    # the standby looks every lease_ttl / 4; the leader beats every lease_ttl / 3, so the
    # lease stays live unless the event loop stalls for lease_ttl
    ttl = 4.0
    leader = Projector(log, leader_db, [balances], decode, lease_ttl=ttl, owner="leader")
    standby = Projector(log, standby_db, [balances], decode, lease_ttl=ttl, owner="standby")
    await leader.start()
    try:
        [e] = await log.append("a", Deposited("a", 1))
        await ConsistencyGate(log, leader_db, signal=leader.signal).check(
            ["balances"], e.position, "wait", BOUND
        )
        await standby.start()
        looks = standby_db.reads
        await until(lambda: standby_db.reads >= looks + 3, "3 looks of the standby")
        assert leader.leading("balances")
        assert not standby.leading("balances")
        assert standby_db.writes == 0
    finally:
        await standby.stop()
        await leader.stop()
        await leader_db.close()
        await standby_db.close()
