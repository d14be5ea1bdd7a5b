"""``stop(timeout)`` of the partitioned projector and of the broker consumer, on SQLite and
PostgreSQL: a batch still running after the timeout is abandoned (cancelled, rolled back),
the partitions are released at once (another worker takes them though ``lease_ttl`` is
30 s), and whoever takes them applies the abandoned events, exactly once. A batch that
finishes within the timeout commits as before."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest
from tests.integration.messaging.test_consumer import until, write
from tests.support.bank import Deposited, serializer

from cqrskit.errors import ConfigurationError
from cqrskit.eventlog import StoredEvent
from cqrskit.messaging import (
    Consumer,
    Delivery,
    InMemorySource,
    InMemoryTransport,
    Relay,
    Subscription,
)
from cqrskit.projections import (
    PartitionedProjector,
    Projection,
    ProjectionContext,
    ReadDatabase,
    SqliteReadDatabase,
)

N = 4
TTL = 30.0  # a lease left behind would block the next worker for this long

ledger = Projection(
    "ledger",
    tables={
        "totals": (
            "CREATE TABLE {totals} (id TEXT PRIMARY KEY, total BIGINT NOT NULL, "
            "version BIGINT NOT NULL, applied BIGINT NOT NULL)",
        ),
    },
)


class Gate:
    """What the handler does: hang (until ``release``) while ``hang``, else apply."""

    def __init__(self, *, hang: bool) -> None:
        self.hang = hang
        self.entered = asyncio.Event()
        self.release = asyncio.Event()


GATE = Gate(hang=False)


@ledger.on
async def deposited(e: Deposited, ctx: ProjectionContext) -> None:
    gate = GATE
    if gate.hang:
        gate.entered.set()
        await gate.release.wait()  # inside the batch's transaction
    stored = ctx.stored
    assert stored is not None
    t = ctx.table("totals")
    await ctx.execute(
        f"INSERT INTO {t} (id, total, version, applied) VALUES (?, ?, ?, 1) "
        f"ON CONFLICT (id) DO UPDATE SET total = {t}.total + excluded.total, "
        f"version = excluded.version, applied = {t}.applied + 1",
        e.account,
        e.amount,
        stored.version,
    )


def use(gate: Gate) -> Gate:
    global GATE
    GATE = gate
    return gate


async def totals(db: ReadDatabase) -> dict[str, tuple[int, int, int]]:
    try:
        async with db.read_only() as s:
            rows = await s.fetchall("SELECT id, total, applied, version FROM totals")
    except Exception:
        return {}
    return {str(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows}


def expected(events: list[StoredEvent]) -> dict[str, tuple[int, int, int]]:
    out: dict[str, tuple[int, int, int]] = {}
    for e in events:
        total, applied, _v = out.get(e.stream, (0, 0, 0))
        amount = serializer.decode_stored(e).amount
        out[e.stream] = (total + amount, applied + 1, e.version)
    return out


async def leases(db: ReadDatabase) -> dict[int, tuple[str | None, int]]:
    """partition -> (owner, position) of the ledger's partitions."""
    async with db.read_only() as s:
        rows = await s.fetchall(
            "SELECT partition, owner, position FROM cqrskit_partitions WHERE projection = 'ledger'"
        )
    return {int(r[0]): (r[1], int(r[2])) for r in rows}


def projector(log: Any, db: ReadDatabase, owner: str, **kw: Any) -> PartitionedProjector:
    options: dict[str, Any] = {"partitions": N, "batch_size": 100, "lease_ttl": TTL}
    options.update(kw)
    return PartitionedProjector(log, db, [ledger], serializer, owner=owner, **options)


def consumer(transport: InMemoryTransport, db: ReadDatabase, owner: str, **kw: Any) -> Consumer:
    options: dict[str, Any] = {"partitions": N, "batch_size": 100, "lease_ttl": TTL}
    options.update(kw)
    return Consumer(transport.source(), db, [ledger], serializer, owner=owner, **options)


async def published(log: Any, db: ReadDatabase, count: int) -> tuple[InMemoryTransport, Any]:
    transport = InMemoryTransport(dedup_window=None)
    events = await write(log, count)
    async with Relay(log, db, transport, partitions=N, batch_size=50) as relay:
        assert await relay.wait_published(events[-1].position, 30)
    return transport, events


async def takes_all(worker: PartitionedProjector | Consumer) -> None:
    # far less than TTL: the partitions were free, not expiring
    await until(lambda: len(worker.owned("ledger")) == N, timeout=10, what="takes every partition")


async def test_partitioned_abandons_a_hung_batch_and_releases_at_once(backend: Any) -> None:
    log, db = backend
    gate = use(Gate(hang=True))
    events = await write(log, 40)
    a = projector(log, db, "a")
    await a.start()
    try:
        await asyncio.wait_for(gate.entered.wait(), 30)
        held = set(a.owned("ledger"))
        assert held
        started = time.monotonic()
        await asyncio.wait_for(a.stop(timeout=0.2), 20)
        assert time.monotonic() - started < 5  # not stuck behind the hung handler
        rows = await leases(db)
        assert {p: rows[p] for p in held} == dict.fromkeys(held, (None, 0))  # free, rolled back
        assert a.owned("ledger") == {}
        assert await totals(db) == {}
        gate.hang = False  # the handler is fixed: the next holder applies everything
        async with projector(log, db, "b") as b:
            await takes_all(b)
            await until(lambda: equal(db, expected(events)), what="b applied the events")
        assert await totals(db) == expected(events)  # each event once
    finally:
        gate.release.set()
        await a.stop()


async def test_partitioned_context_exit_is_bounded_by_stop_timeout(backend: Any) -> None:
    log, db = backend
    gate = use(Gate(hang=True))
    events = await write(log, 20)
    started = 0.0
    try:
        async with projector(log, db, "a", stop_timeout=0.2) as a:
            await asyncio.wait_for(gate.entered.wait(), 30)
            started = time.monotonic()
        assert time.monotonic() - started < 5
        assert all(owner is None for owner, _pos in (await leases(db)).values())
        gate.hang = False
        async with projector(log, db, "b") as b:
            await takes_all(b)
            await until(lambda: equal(db, expected(events)), what="b applied the events")
    finally:
        gate.release.set()
    assert a.owned("ledger") == {}


async def test_partitioned_batch_finishing_in_time_commits(backend: Any) -> None:
    log, db = backend
    gate = use(Gate(hang=True))
    events = await write(log, 10)
    a = projector(log, db, "a")
    await a.start()
    await asyncio.wait_for(gate.entered.wait(), 30)
    stopping = asyncio.ensure_future(a.stop(timeout=30))
    await asyncio.sleep(0)
    gate.release.set()  # the batch in flight finishes within the timeout
    await asyncio.wait_for(stopping, 30)
    assert await totals(db) == expected(events)
    rows = await leases(db)
    assert all(owner is None for owner, _pos in rows.values())
    assert max(pos for _owner, pos in rows.values()) == events[-1].position


async def test_consumer_abandons_a_hung_batch_and_releases_at_once(backend: Any) -> None:
    log, db = backend
    transport, events = await published(log, db, 40)
    gate = use(Gate(hang=True))
    a = consumer(transport, db, "a")
    await a.start()
    try:
        await asyncio.wait_for(gate.entered.wait(), 30)
        held = set(a.owned("ledger"))
        assert held
        started = time.monotonic()
        await asyncio.wait_for(a.stop(timeout=0.2), 20)
        assert time.monotonic() - started < 5
        rows = await leases(db)
        assert {p: rows[p] for p in held} == dict.fromkeys(held, (None, 0))
        assert a.owned("ledger") == {}
        assert await totals(db) == {}
        gate.hang = False
        async with consumer(transport, db, "b") as b:
            await takes_all(b)
            await until(lambda: equal(db, expected(events)), what="b applied the messages")
        assert await totals(db) == expected(events)
    finally:
        gate.release.set()
        await a.stop()


class StuckClose(InMemorySource):
    """The in-memory broker, whose subscriptions' close never returns (as a broker
    connection that hangs): the partition loop awaits it again while it unwinds."""

    def __init__(self, broker: InMemoryTransport) -> None:
        super().__init__(broker)
        self.closing = 0

    async def subscribe(self, group: str, partition: int, cursor: str) -> Subscription:
        return _Stuck(self, await super().subscribe(group, partition, cursor))


class _Stuck(Subscription):
    def __init__(self, source: StuckClose, inner: Subscription) -> None:
        self.source = source
        self.inner = inner

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        return await self.inner.fetch(max_messages, timeout)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        await self.inner.ack(deliveries)

    async def close(self) -> None:
        self.source.closing += 1
        await asyncio.Event().wait()


async def test_consumer_abandons_a_loop_whose_unwinding_hangs_too(backend: Any) -> None:
    # cancelled in its hung handler, the loop awaits its subscription's close (a finally),
    # which hangs as well: the stop cancels it again and still returns, partitions free
    log, db = backend
    transport, events = await published(log, db, 20)
    gate = use(Gate(hang=True))
    source = StuckClose(transport)
    a = Consumer(source, db, [ledger], serializer, owner="a", partitions=N, lease_ttl=TTL)
    await a.start()
    try:
        await asyncio.wait_for(gate.entered.wait(), 30)
        started = time.monotonic()
        await asyncio.wait_for(a.stop(timeout=0.2), 20)
        assert time.monotonic() - started < 5
        assert source.closing >= 1  # the loops did reach the hanging close
        assert all(owner is None for owner, _pos in (await leases(db)).values())
        gate.hang = False
        async with consumer(transport, db, "b") as b:
            await takes_all(b)
            await until(lambda: equal(db, expected(events)), what="b applied the messages")
        assert await totals(db) == expected(events)
    finally:
        gate.release.set()


async def test_consumer_context_exit_is_bounded_by_stop_timeout(backend: Any) -> None:
    log, db = backend
    transport, events = await published(log, db, 20)
    gate = use(Gate(hang=True))
    started = 0.0
    try:
        async with consumer(transport, db, "a", stop_timeout=0.2) as a:
            await asyncio.wait_for(gate.entered.wait(), 30)
            started = time.monotonic()
        assert time.monotonic() - started < 5
        assert all(owner is None for owner, _pos in (await leases(db)).values())
        gate.hang = False
        async with consumer(transport, db, "b") as b:
            await takes_all(b)
            await until(lambda: equal(db, expected(events)), what="b applied the messages")
    finally:
        gate.release.set()
    assert a.owned("ledger") == {}


async def test_consumer_batch_finishing_in_time_commits(backend: Any) -> None:
    log, db = backend
    transport, events = await published(log, db, 10)
    gate = use(Gate(hang=True))
    a = consumer(transport, db, "a")
    await a.start()
    await asyncio.wait_for(gate.entered.wait(), 30)
    stopping = asyncio.ensure_future(a.stop(timeout=30))
    await asyncio.sleep(0)
    gate.release.set()
    await asyncio.wait_for(stopping, 30)
    # only the batches in flight finish: at least the one that was hanging committed
    got = await totals(db)
    assert got
    want = expected(events)
    assert all(got[k] == want[k] for k in got)
    assert all(owner is None for owner, _pos in (await leases(db)).values())


async def equal(db: ReadDatabase, want: dict[str, tuple[int, int, int]]) -> bool:
    return await totals(db) == want


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
async def test_a_bad_stop_timeout_is_refused(tmp_path: Any, bad: float) -> None:
    db = SqliteReadDatabase(str(tmp_path / "r.db"))
    transport = InMemoryTransport()
    try:
        with pytest.raises(ConfigurationError, match="stop_timeout"):
            projector(None, db, "a", stop_timeout=bad)
        with pytest.raises(ConfigurationError, match="stop_timeout"):
            consumer(transport, db, "a", stop_timeout=bad)
        for worker in (projector(None, db, "a"), consumer(transport, db, "a")):
            with pytest.raises(ConfigurationError, match="timeout"):
                await worker.stop(timeout=bad)
    finally:
        await db.close()
