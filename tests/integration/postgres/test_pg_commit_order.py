"""Positions become visible in commit order: scripted interleavings over several connections.

Each writer is paused *inside* its transaction, after its events were inserted and before
COMMIT, by an inline hook that waits on a gate; the test then drives the other connections
and the reader in a fixed order. No sleeps: every step waits on an event with a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from cqrskit.errors import ConcurrencyError
from cqrskit.eventlog import StoredEvent, UnitOfWork
from cqrskit.postgres import PostgresEventStore, PostgresUnitOfWork
from cqrskit.testing.eventlog import Opened, wait_visible

pytestmark = pytest.mark.postgres

STEP = 10.0


class Gate:
    """Pauses the writer whose stream is named, right before its COMMIT."""

    def __init__(self) -> None:
        self.inserted: dict[str, asyncio.Event] = {}
        self.release: dict[str, asyncio.Event] = {}
        self.fail: set[str] = set()

    def hold(self, stream: str) -> None:
        self.inserted[stream] = asyncio.Event()
        self.release[stream] = asyncio.Event()

    async def hook(self, uow: UnitOfWork, stored: list[StoredEvent]) -> None:
        stream = stored[0].stream
        if stream in self.inserted:
            self.inserted[stream].set()
            await asyncio.wait_for(self.release[stream].wait(), STEP)
        if stream in self.fail:
            raise RuntimeError(f"scripted rollback of {stream}")


@pytest.fixture
async def store(postgres_dsn: str, pg_schema: str) -> AsyncIterator[PostgresEventStore]:
    s = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, max_size=6)
    try:
        yield s
    finally:
        await s.close()


async def write(store: PostgresEventStore, stream: str) -> int | None:
    uow = await store.begin()
    uow.record(stream, Opened(stream, "x"))
    return await uow.commit()


async def streams(store: PostgresEventStore, after: int = 0) -> list[str]:
    return [e.stream for e in await store.read_after(after)]


async def settled(store: PostgresEventStore, position: int) -> list[str]:
    """The streams readable once ``position`` is visible (other developers' transactions on
    the shared server may hold the horizon for a moment)."""
    await wait_visible(store, position)
    return await streams(store)


async def test_open_lower_position_holds_back_later_commits(store: PostgresEventStore) -> None:
    gate = Gate()
    store.add_inline_hook(gate.hook)
    gate.hold("low")
    low = asyncio.ensure_future(write(store, "low"))
    await asyncio.wait_for(gate.inserted["low"].wait(), STEP)
    high_pos = await write(store, "high")  # commits while "low" is open
    assert high_pos is not None
    assert await streams(store) == []  # "high" is above the horizon: not readable yet
    assert await store.head() == 0
    gate.release["low"].set()
    low_pos = await asyncio.wait_for(low, STEP)
    assert low_pos is not None
    assert low_pos < high_pos
    assert await settled(store, high_pos) == ["low", "high"]
    assert await store.head() == high_pos


async def test_rolled_back_lower_transaction_leaves_a_gap_not_a_skip(
    store: PostgresEventStore,
) -> None:
    gate = Gate()
    store.add_inline_hook(gate.hook)
    gate.hold("doomed")
    gate.fail.add("doomed")
    doomed = asyncio.ensure_future(write(store, "doomed"))
    await asyncio.wait_for(gate.inserted["doomed"].wait(), STEP)
    kept = await write(store, "kept")
    assert kept is not None
    assert await streams(store) == []
    gate.release["doomed"].set()
    with pytest.raises(RuntimeError, match="scripted rollback"):
        await asyncio.wait_for(doomed, STEP)
    assert await settled(store, kept) == ["kept"]


async def test_slow_commit_with_early_xid_is_not_skipped(store: PostgresEventStore) -> None:
    """T1 gets its xid first (a state write), T2 appends and commits, then T1 appends.

    T1's events are inserted after T2's commit yet get the lower position; a reader that
    already read up to the horizon in between must still receive them.
    """
    t1 = await store.begin()
    assert isinstance(t1, PostgresUnitOfWork)
    await t1.connection.execute("SELECT pg_current_xact_id()")  # assigns T1's xid now
    t2_pos = await write(store, "t2")
    assert t2_pos is not None
    assert await streams(store) == []  # a reader polls here: nothing readable yet
    t1.record("t1", Opened("t1", "x"))
    t1_pos = await t1.commit()
    assert t1_pos is not None
    assert t1_pos < t2_pos
    assert await settled(store, t2_pos) == ["t1", "t2"]


async def test_an_unrelated_open_write_transaction_does_not_hold_the_horizon(
    store: PostgresEventStore, postgres_dsn: str, pg_schema: str
) -> None:
    """A write transaction that never appends to the log (it never took the appender lock)
    does not stop readers; one of this log's writers does, at its xid."""
    other = await asyncpg.connect(postgres_dsn)
    try:
        await other.execute("BEGIN")
        await other.execute(f'CREATE TABLE "{pg_schema}".unrelated (x int)')
        passed = await write(store, "passes")
        assert passed is not None
        assert await settled(store, passed) == ["passes"]
        assert await store.head() == passed
        appender = await store.begin()
        assert isinstance(appender, PostgresUnitOfWork)
        await appender.connection.execute("SELECT pg_current_xact_id()")
        blocked = await write(store, "blocked")
        assert blocked is not None
        assert await streams(store, passed) == []
        assert await store.head() == passed  # readable: held back by the appender
        assert await store.last_position() == blocked  # committed: known
        await appender.rollback()
        assert await settled(store, blocked) == ["passes", "blocked"]
        assert other.is_in_transaction()
    finally:
        await other.close()


async def test_many_interleavings_never_skip(store: PostgresEventStore) -> None:
    """Commit 6 writers in every rotation of a fixed order while a reader tails the log."""
    gate = Gate()
    store.add_inline_hook(gate.hook)
    names = [f"w{i}" for i in range(6)]
    tail: list[StoredEvent] = []
    for rotation in range(3):
        order = names[rotation:] + names[:rotation]
        tagged = [f"{n}-{rotation}" for n in names]
        for n in tagged:
            gate.hold(n)
        tasks = {n: asyncio.ensure_future(write(store, n)) for n in tagged}
        for n in tagged:
            await asyncio.wait_for(gate.inserted[n].wait(), STEP)
        for n in order:
            name = f"{n}-{rotation}"
            gate.release[name].set()
            await asyncio.wait_for(tasks[name], STEP)
            after = tail[-1].position if tail else 0
            tail.extend(await store.read_after(after))
    await wait_visible(store, await store.last_position())  # bounded: no fixed reading
    full = await store.read_after(0)
    assert len(full) == 18
    for _ in range(200):  # bounded: drain what other servers' transactions held back
        if len(tail) == len(full):
            break
        await wait_visible(store, full[-1].position)
        tail.extend(await store.read_after(tail[-1].position if tail else 0))
    assert [e.position for e in tail] == [e.position for e in full]


@pytest.mark.parametrize("positions", [True, False])
async def test_older_transaction_cannot_append_after_a_younger_one(
    store: PostgresEventStore, positions: bool
) -> None:
    """Per stream, position order equals version order: the older writer must retry.

    Both commit paths: RETURNING then COMMIT, and the one-round-trip literal INSERT+COMMIT.
    """
    old = await store.begin(positions=positions)
    assert isinstance(old, PostgresUnitOfWork)
    await old.connection.execute("SELECT pg_current_xact_id()")  # older xid, taken first
    young = await write(store, "shared")
    assert young is not None
    old.record("shared", Opened("shared", "late"), expected_version=1)
    with pytest.raises(ConcurrencyError) as info:
        await old.commit()
    assert info.value.stream == "shared"
    assert info.value.actual_version == 1
    assert "started later" in str(info.value)
    retried = await write(store, "shared")  # a new transaction has a younger xid
    assert retried is not None
    assert retried > young
    events = await store.read_stream("shared")
    assert [e.version for e in events] == [1, 2]
    assert [e.position for e in events] == [young, retried]
