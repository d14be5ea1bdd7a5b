"""A worker frozen inside a read-database transaction cannot keep its rows locked.

``ReadDatabase.transaction(hold=...)`` on PostgreSQL sets
``idle_in_transaction_session_timeout`` for that transaction: the server ends a session that
sits idle inside it (a SIGSTOPped process, a stalled host), which frees its row locks and
makes sure the transaction never commits. Partition leases, consumers and partitioned
projectors open their transactions with ``hold=lease_ttl``, so partitions of a frozen worker
move to the others. The freezes here are a connection left idle mid-transaction: to the
server that is exactly what a stopped process looks like.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
from tests.support.bank import balances

from cqrskit.errors import ConfigurationError
from cqrskit.projections import ReadDatabase, Session
from cqrskit.projections.partitions import PartitionLeases


async def _make_table(db: ReadDatabase) -> None:
    async with db.transaction() as s:
        await s.execute("CREATE TABLE IF NOT EXISTS frozen (id INT PRIMARY KEY, who TEXT)")
        await s.execute("INSERT INTO frozen VALUES (1, 'nobody') ON CONFLICT DO NOTHING")


async def test_hold_ends_a_transaction_left_idle_and_frees_its_locks(
    pg_read: tuple[str, ReadDatabase],
) -> None:
    _spec, db = pg_read
    await _make_table(db)
    taken = asyncio.Event()
    resume = asyncio.Event()

    async def frozen() -> None:
        async with db.transaction(hold=0.2) as s:
            await s.execute("UPDATE frozen SET who = 'frozen' WHERE id = 1")
            await resume.wait()  # idle inside the transaction, holding the row lock
            await s.execute("UPDATE frozen SET who = 'frozen again' WHERE id = 1")

    async def other() -> None:
        async with db.transaction(lock_timeout=20) as s:
            await s.execute("UPDATE frozen SET who = 'other' WHERE id = 1")
        taken.set()

    holder = asyncio.create_task(frozen())
    await asyncio.sleep(0)  # let the holder take the lock first
    waiter = asyncio.create_task(other())
    # the other transaction gets the row while the holder is still frozen: only the
    # server ending the idle session can have freed it
    await asyncio.wait_for(taken.wait(), 15)
    assert not holder.done()
    resume.set()
    with pytest.raises(Exception) as caught:
        await holder  # its session is gone: nothing of it commits
    assert not isinstance(caught.value, AssertionError)
    await waiter
    async with db.read_only() as s:
        assert await s.fetchval("SELECT who FROM frozen WHERE id = 1") == "other"
    # the pool hands out a working connection afterwards
    async with db.transaction(hold=5) as s:
        assert await s.fetchval("SELECT 1") == 1


async def test_without_hold_the_lock_stays_with_the_idle_holder(
    pg_read: tuple[str, ReadDatabase],
) -> None:
    """The control: no ``hold``, and a waiter times out on the idle holder's lock."""
    _spec, db = pg_read
    await _make_table(db)
    resume = asyncio.Event()
    locked = asyncio.Event()

    async def holder() -> None:
        async with db.transaction() as s:
            await s.execute("UPDATE frozen SET who = 'holder' WHERE id = 1")
            locked.set()
            await resume.wait()

    task = asyncio.create_task(holder())
    await locked.wait()
    try:
        with pytest.raises(Exception, match="lock"):
            async with db.transaction(lock_timeout=0.3) as s:
                await s.execute("UPDATE frozen SET who = 'other' WHERE id = 1")
    finally:
        resume.set()
        await task
    async with db.read_only() as s:
        assert await s.fetchval("SELECT who FROM frozen WHERE id = 1") == "holder"


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
async def test_a_hold_that_is_not_a_positive_number_is_refused(
    pg_read: tuple[str, ReadDatabase], bad: float
) -> None:
    _spec, db = pg_read
    with pytest.raises(ConfigurationError, match="hold="):
        async with db.transaction(hold=bad):
            pass


class Freezing(ReadDatabase):
    """``db`` as worker a sees it: its transactions open exactly as the library asks
    (same ``lock_timeout`` and ``hold``), and once ``armed`` the first one that beats a
    partition freezes right after that statement, locks held, until ``resume``."""

    def __init__(self, db: ReadDatabase) -> None:
        self.db = db
        self.dialect = db.dialect
        self.flavor = db.flavor
        self.armed = False
        self.frozen = asyncio.Event()
        self.resume = asyncio.Event()

    def transaction(
        self, *, lock_timeout: float | None = None, hold: float | None = None
    ) -> AbstractAsyncContextManager[Session]:
        return self._tx(lock_timeout, hold)

    @asynccontextmanager
    async def _tx(self, lock_timeout: float | None, hold: float | None) -> AsyncIterator[Session]:
        async with self.db.transaction(lock_timeout=lock_timeout, hold=hold) as s:
            yield _FreezingSession(s, self)

    def read_only(self) -> AbstractAsyncContextManager[Session]:
        return self.db.read_only()

    def inline(self, connection: Any) -> Session:
        return self.db.inline(connection)

    async def close(self) -> None:
        pass


class _FreezingSession:
    def __init__(self, session: Session, owner: Freezing) -> None:
        self.s = session
        self.owner = owner
        self.dialect = session.dialect
        self.flavor = session.flavor

    async def execute(self, sql: str, *args: Any) -> int:
        n = await self.s.execute(sql, *args)
        if self.owner.armed and sql.startswith("UPDATE cqrskit_partitions SET beat"):
            self.owner.armed = False
            self.owner.frozen.set()
            await self.owner.resume.wait()
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.s, name)


async def test_partitions_of_a_worker_frozen_mid_tick_move_to_the_others(
    pg_read: tuple[str, ReadDatabase],
) -> None:
    """Worker a holds all partitions and freezes inside its own tick, right after beating
    a partition: its worker row and that partition row stay locked (the state a SIGSTOP
    mid-tick leaves). Worker b's ticks never fail and b takes every partition, each at a
    new epoch, while a is still frozen; a, resumed, learns it lost them."""
    _spec, db = pg_read
    ttl = 0.5
    frozen_db = Freezing(db)
    a = PartitionLeases(frozen_db, balances, 4, "a", ttl, mode="consumer")
    b = PartitionLeases(db, balances, 4, "b", ttl, mode="consumer")
    await a.setup()
    await b.setup()
    tick = await a.tick()
    assert sorted(tick.gained) == [0, 1, 2, 3]
    epochs = dict(a.owned)
    a.progress.update(dict.fromkeys(epochs, time.monotonic()))
    frozen_db.armed = True
    task = asyncio.create_task(a.tick())
    await frozen_db.frozen.wait()
    start = time.monotonic()
    try:
        for _ in range(400):  # bounded: 400 ticks of ttl/4
            await b.tick()  # raises if a lock wait on a's rows fails the tick
            if len(b.owned) == 4:
                break
            await asyncio.sleep(ttl / 4)
        taken = time.monotonic() - start
        assert sorted(b.owned) == [0, 1, 2, 3], f"b holds {b.owned} after {taken:.1f} s"
        assert all(b.owned[p] > epochs[p] for p in epochs)
        assert not task.done()  # a is still frozen: the server freed its rows
    finally:
        frozen_db.resume.set()
        await asyncio.gather(task, return_exceptions=True)
    assert task.exception() is not None  # its session was ended: that tick never committed
    # a's next tick (its loops show progress) finds its beats no longer match
    a.progress.update(dict.fromkeys(epochs, time.monotonic()))
    lost = await a.tick()
    assert lost.lost == frozenset({0, 1, 2, 3})
    assert not a.owned
