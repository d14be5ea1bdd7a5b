"""Partitioned projections rebuilt in place, on SQLite and PostgreSQL: under writes with
several workers (reads never go back, tokens keep working, the rebuilt read model equals a
replay of the log), with another number of partitions (old and new workers never share a
generation; the old ones stop with a clear error), beside broker consumers (they continue
on the new generation), cancelled; and the refusals."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from tests.integration.messaging.test_consumer import (
    accounts,
    accounts_match,
    expected,
    order_errors,
    until,
    write,
)
from tests.support.bank import Deposited, balances, serializer

from cqrskit.errors import ConfigurationError
from cqrskit.eventlog import StoredEvent
from cqrskit.messaging import Consumer, InMemoryTransport, Relay
from cqrskit.projections import (
    ConsistencyGate,
    PartitionedProjector,
    Projector,
    ReadDatabase,
    cancel_rebuild,
    partition_status,
    projection_status,
    rebuild_progress,
    request_rebuild,
)

TTL = 0.6


def worker(log: Any, db: Any, owner: str, n: int, **kw: Any) -> PartitionedProjector:
    options: dict[str, Any] = {"batch_size": 15, "lease_ttl": TTL, "poll_interval": 0.05}
    options.update(kw)
    return PartitionedProjector(
        log, db, [balances], serializer, partitions=n, owner=owner, **options
    )


async def generation(db: ReadDatabase, log: Any) -> tuple[int, int | None]:
    [st] = await projection_status(db, log, ["balances"])
    return st.generation, st.rebuilding


class Reader:
    """Reads the read model over and over while the rebuild runs: what it saw must never
    go back (the total of applied events), and no read may fail."""

    def __init__(self, db: ReadDatabase) -> None:
        self.db = db
        self.seen: list[int] = []
        self.errors: list[str] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        for _ in range(20_000):  # bounded: stopped long before
            if self.stop.is_set():
                return
            try:
                rows = await accounts(self.db)
                self.seen.append(sum(n for _b, n, _v in rows.values()))
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            try:
                await asyncio.wait_for(self.stop.wait(), 0.005)
            except TimeoutError:
                pass

    def went_back(self) -> list[tuple[int, int]]:
        return [(a, b) for a, b in zip(self.seen, self.seen[1:], strict=False) if b < a]


async def write_until(
    log: Any,
    db: ReadDatabase,
    gate: ConsistencyGate,
    done: Any,
    events: list[StoredEvent],
    *,
    after: int = 30,
    limit: int = 3000,
) -> int:
    """Write deposits (and wait for each one's token: it must be met) until ``done()``
    holds, then ``after`` more; return how many tokens were stale (must be 0)."""
    stale = 0
    extra = None
    for i in range(limit):
        [e] = await log.append(f"acct-{i % 11}", Deposited(f"acct-{i % 11}", 1))
        events.append(e)
        if await gate.check(["balances"], e.position, "wait", 20.0):
            stale += 1
        if extra is None and await done():
            extra = after
        if extra is not None:
            extra -= 1
            if extra <= 0:
                return stale
    raise AssertionError(f"{what_is_not(done)} within {limit} writes")


def what_is_not(done: Any) -> str:
    return f"{getattr(done, '__name__', 'condition')} not met"


async def stop_all(workers: Sequence[PartitionedProjector]) -> None:
    for w in workers:
        await w.stop()


async def test_rebuild_in_place_under_writes_with_three_workers(backend: Any) -> None:
    log, db = backend
    events = await write(log, 240, streams=11)
    workers = [worker(log, db, f"w{i}", 4) for i in range(3)]
    for w in workers:
        await w.start()
    reader = Reader(db)
    reading = asyncio.create_task(reader.run())
    try:
        await until(lambda: accounts_match(db, events), what="caught up")
        gate = ConsistencyGate(log, db, signal=workers[0].signal)
        assert await request_rebuild(db, balances) == 2
        progress = await rebuild_progress(db, "balances")
        assert progress is not None
        assert (progress.generation, progress.partitions, progress.active_partitions) == (2, 4, 4)

        async def switched() -> bool:
            return await generation(db, log) == (2, None)

        stale = await write_until(log, db, gate, switched, events)
        await until(lambda: accounts_match(db, events), what="rebuilt and caught up")
        building = [w.generations("balances") for w in workers]
        rows = await partition_status(db, "balances", log)
    finally:
        reader.stop.set()
        await reading
        await stop_all(workers)
    assert stale == 0
    assert reader.errors == []
    assert reader.went_back() == []
    assert len(reader.seen) > 10
    # one switch, by one worker; every worker serves the new generation and builds none
    assert sum(w.counts.get("switches", 0) for w in workers) == 1
    assert building == [(2, None)] * 3
    assert [r.generation for r in rows] == [2] * 4
    assert all(r.lag_events == 0 for r in rows)
    # the rebuilt read model equals a replay of the log: nothing lost, nothing twice,
    # each stream in order
    assert await accounts(db) == expected(events)
    assert await order_errors(db) == 0
    async with db.read_only() as s:
        with pytest.raises(Exception, match="accounts__g1"):
            async with s.savepoint():
                await s.fetchall("SELECT * FROM accounts__g1")
        left = await s.fetchall(
            "SELECT DISTINCT projection FROM cqrskit_partitions ORDER BY projection"
        )
    assert [r[0] for r in left] == ["balances"]
    assert await rebuild_progress(db, "balances") is None


async def test_a_rebuild_changes_the_number_of_partitions(backend: Any) -> None:
    log, db = backend
    events = await write(log, 150, streams=11)
    old = [worker(log, db, f"old{i}", 2) for i in range(2)]
    runs = [asyncio.create_task(w.run()) for w in old]
    new: list[PartitionedProjector] = []
    try:
        await until(lambda: accounts_match(db, events), what="caught up")
        assert await request_rebuild(db, balances, partitions=3) == 2
        # a request with yet another number while this one is pending is refused
        with pytest.raises(ConfigurationError, match="already being rebuilt"):
            await request_rebuild(db, balances, partitions=5)
        # the old workers keep serving generation 1 and do not build generation 2
        events += await write(log, 20, streams=11)
        await until(lambda: accounts_match(db, events), what="old workers serving")
        assert [w.generations("balances") for w in old] == [(1, None)] * 2
        assert not any(w.owned("balances", building=True) for w in old)
        # a worker with a third number fits neither generation: refused, naming them
        with pytest.raises(ConfigurationError) as info:
            await worker(log, db, "odd", 5).start()
        text = f"{info.value} {info.value.hint}"
        assert "split into 2 partitions" in text
        assert "started with 5" in text
        assert "3 partitions is pending" in text

        new = [worker(log, db, f"new{i}", 3) for i in range(2)]
        for w in new:
            await w.start()
        assert [w.generations("balances") for w in new] == [(None, 2)] * 2
        gate = ConsistencyGate(log, db, signal=new[0].signal)

        async def switched() -> bool:
            return await generation(db, log) == (2, None)

        stale = await write_until(log, db, gate, switched, events)
        await until(lambda: accounts_match(db, events), what="new generation caught up")
        # the old workers stop by themselves, saying why and what to run
        ended = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 10)
        rows = await partition_status(db, "balances", log)
    finally:
        for w in old:
            w.request_stop()
        await asyncio.gather(*runs, return_exceptions=True)
        await stop_all(new)
    assert stale == 0
    for error in ended:
        assert isinstance(error, ConfigurationError), error
        assert "split into 3 partitions" in str(error)
        assert "started with 2" in str(error)
        assert "--partitions 3" in (error.hint or "")
    assert [(r.partition, r.partitions, r.generation) for r in rows] == [
        (p, 3, 2) for p in range(3)
    ]
    assert {r.owner for r in rows} <= {"new0", "new1"}
    assert await accounts(db) == expected(events)
    assert await order_errors(db) == 0
    # an old-N worker started now is refused at once, with the command that fits
    with pytest.raises(ConfigurationError) as info:
        await worker(log, db, "late", 2).start()
    assert "split into 3 partitions" in str(info.value)
    assert "--partitions 3" in (info.value.hint or "")


async def test_broker_consumers_continue_on_the_rebuilt_generation(backend: Any) -> None:
    log, db = backend
    transport = InMemoryTransport(dedup_window=None)
    relay = Relay(log, db, transport, partitions=4, batch_size=20, poll_interval=0.05)
    consumer = Consumer(transport.source(), db, [balances], serializer, partitions=4, lease_ttl=TTL)
    await relay.start()
    log_worker: PartitionedProjector | None = None
    try:
        events = await write(log, 80)
        await consumer.start()
        await until(lambda: accounts_match(db, events), what="consumer")
        # fed by a broker alone: refused, naming the way that works
        with pytest.raises(ConfigurationError) as info:
            await request_rebuild(db, balances)
        assert "broker" in str(info.value)
        assert "--partitions" in (info.value.hint or "")
        # a log worker beside the consumers builds it; the consumers keep serving
        log_worker = worker(log, db, "log", 4)
        await log_worker.start()
        assert await request_rebuild(db, balances) == 2

        async def switched() -> bool:
            return await generation(db, log) == (2, None)

        gate = ConsistencyGate(log, db, signal=log_worker.signal)
        stale = await write_until(log, db, gate, switched, events)
        await until(lambda: accounts_match(db, events), what="after the switch")
        await log_worker.stop()
        log_worker = None
        # the consumers alone go on with the new generation, skipping what the log
        # workers applied
        events += await write(log, 40)
        await until(lambda: accounts_match(db, events), what="consumers on generation 2")
        rows = await partition_status(db, "balances", log)
    finally:
        if log_worker is not None:
            await log_worker.stop()
        await consumer.stop()
        await relay.stop()
    assert stale == 0
    assert consumer.error is None
    assert {r.generation for r in rows} == {2}
    assert await accounts(db) == expected(events)
    assert await order_errors(db) == 0


async def test_consumers_with_the_old_number_stop_after_a_switch(backend: Any) -> None:
    log, db = backend
    transport = InMemoryTransport(dedup_window=None)
    relay = Relay(log, db, transport, partitions=4, batch_size=20, poll_interval=0.05)
    consumer = Consumer(transport.source(), db, [balances], serializer, partitions=4, lease_ttl=TTL)
    await relay.start()
    builder = worker(log, db, "log-2", 2)
    try:
        events = await write(log, 60)
        serving = worker(log, db, "log-4", 4)
        async with serving:  # a log worker once: the projection is partitioned
            await until(lambda: accounts_match(db, events), what="log worker")
        assert await request_rebuild(db, balances, partitions=2) == 2
        run = asyncio.create_task(consumer.run())  # serves generation 1 meanwhile
        await until(lambda: len(consumer.owned("balances")) == 4, what="consumer serving")
        await builder.start()

        async def switched() -> bool:
            return await generation(db, log) == (2, None)

        await until(switched, what="switched to 2 partitions")
        with pytest.raises(ConfigurationError) as info:
            await asyncio.wait_for(run, 10)
        events += await write(log, 20)
        await until(lambda: accounts_match(db, events), what="the new generation serving")
    finally:
        consumer.request_stop()
        await builder.stop()
        await relay.stop()
    assert consumer.error is info.value
    assert "split into 2 partitions" in str(info.value)
    assert "started with 4" in str(info.value)
    assert await order_errors(db) == 0


async def test_a_pending_rebuild_can_be_cancelled(backend: Any) -> None:
    log, db = backend
    events = await write(log, 60)
    w = worker(log, db, "w", 3)
    async with w:
        await until(lambda: accounts_match(db, events), what="caught up")
        assert await request_rebuild(db, balances, partitions=4) == 2
        assert await rebuild_progress(db, "balances") is not None
        assert await cancel_rebuild(db, balances) == 2
        assert await cancel_rebuild(db, balances) is None
        events += await write(log, 30)
        await until(lambda: accounts_match(db, events), what="still serving")
        # a rebuild with the worker's own number now (a new generation number: the
        # cancelled one is not used again): it builds and switches
        assert await request_rebuild(db, balances) == 3

        async def switched() -> bool:
            return await generation(db, log) == (3, None)

        await until(switched, what="switched")
        await until(lambda: accounts_match(db, events), what="rebuilt")
    async with db.read_only() as s:
        keys = await s.fetchall("SELECT DISTINCT projection FROM cqrskit_partitions")
        with pytest.raises(Exception, match="accounts__g2"):
            async with s.savepoint():
                await s.fetchall("SELECT * FROM accounts__g2")
    assert [r[0] for r in keys] == ["balances"]
    assert await order_errors(db) == 0


async def test_refusals(backend: Any) -> None:
    log, db = backend
    events = await write(log, 20)
    # a one-process projection: --partitions has nothing to rebuild into
    async with Projector(log, db, [balances], serializer) as single:
        await until(lambda: accounts_match(db, events), what="single")
        with pytest.raises(ConfigurationError, match="not partitioned") as info:
            await request_rebuild(db, balances, partitions=4)
        assert "--partitions 4" in (info.value.hint or "")
        assert await request_rebuild(db, balances) == 2
        with pytest.raises(ConfigurationError, match="cannot be cancelled"):
            await cancel_rebuild(db, balances)
        await until(lambda: single.checkpoint("balances") >= events[-1].position)


async def test_workers_with_another_number_are_refused_naming_both(backend: Any) -> None:
    log, db = backend
    await write(log, 10)
    async with worker(log, db, "a", 4):
        with pytest.raises(ConfigurationError) as info:
            await worker(log, db, "b", 6).start()
    text = str(info.value)
    assert "split into 4 partitions" in text
    assert "started with 6" in text
    hint = info.value.hint or ""
    assert "--partitions 4" in hint
    assert "cqrskit projections rebuild" in hint
    assert "--partitions 6" in hint
