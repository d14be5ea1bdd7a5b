"""The partitioned log projector on SQLite and PostgreSQL: shares, takeover, moving from
the one-process projector and to a broker consumer, poison parking and retry, tokens."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from tests.integration.messaging.test_consumer import (
    accounts,
    accounts_have,
    accounts_match,
    order_errors,
    until,
    write,
)
from tests.support.bank import POISON_FLAG, Deposited, Poison, balances, serializer

from cqrskit.messaging import Consumer, InMemoryTransport, Relay, partition_of
from cqrskit.projections import (
    ConsistencyGate,
    PartitionedProjector,
    Projector,
    dead_letters,
    partition_status,
    projection_status,
    request_retry,
)

N = 4


def worker(log: Any, db: Any, owner: str, **kw: Any) -> PartitionedProjector:
    options: dict[str, Any] = {"partitions": N, "batch_size": 15, "lease_ttl": 0.6}
    options.update(kw)
    return PartitionedProjector(log, db, [balances], serializer, owner=owner, **options)


async def test_workers_split_the_log_and_take_over_a_dead_one(backend: Any) -> None:
    log, db = backend
    events = await write(log, 60)
    # the one-process projector ran first: the partitions start at its checkpoint
    async with Projector(log, db, [balances], serializer, batch_size=10) as single:
        await until(lambda: accounts_match(db, events), what="single projector")
    assert single.checkpoint("balances") == events[-1].position
    a, b = worker(log, db, "a"), worker(log, db, "b")
    await a.start()
    await b.start()
    try:
        await until(lambda: len(a.owned("balances")) == len(b.owned("balances")) == 2)
        events += await write(log, 60)
        await until(lambda: accounts_match(db, events), what="both workers")
        # a dies without releasing anything (its tasks just stop): b takes over within
        # lease_ttl plus a tick
        for t in a._tasks:
            t.cancel()
        await asyncio.gather(*a._tasks, return_exceptions=True)
        a._tasks = []
        loop = asyncio.get_running_loop()
        start = loop.time()
        await until(lambda: len(b.owned("balances")) == N, what="takeover")
        took = loop.time() - start
        events += await write(log, 60)
        await until(lambda: accounts_match(db, events), what="after takeover")
        rows = await partition_status(db, "balances", log)
        status = (await projection_status(db, log, ["balances"]))[0]
    finally:
        await b.stop()
    assert took < 0.6 * 4 + 2
    assert {r.owner for r in rows} == {"b"}
    assert all(r.lag_events == 0 for r in rows)
    assert status.mode == "partitioned"
    assert status.checkpoint == events[-1].position
    assert await order_errors(db) == 0
    assert sum(n for _b, n, _v in (await accounts(db)).values()) == len(events)


async def test_poison_is_parked_per_stream_and_retried(backend: Any, tmp_path: Path) -> None:
    log, db = backend
    flag = tmp_path / "poison"
    flag.write_text("on")
    os.environ[POISON_FLAG] = str(flag)
    try:
        await log.append("p-1", Deposited("p-1", 5))
        await log.append("p-1", Poison("p-1"))
        await log.append("p-1", Deposited("p-1", 7))
        events = await write(log, 20)
        async with worker(log, db, "solo") as w:
            await until(lambda: accounts_match_except(db, events), what="others flow")
            letters = await dead_letters(db, "balances")
            assert [(d.stream, d.version) for d in letters] == [("p-1", 2), ("p-1", 3)]
            assert (await accounts(db))["p-1"] == (5, 1, 1)
            flag.unlink()
            assert await request_retry(db, "balances") == 2
            await until(lambda: accounts_have(db, "p-1", (12, 3, 3)), what="retried in order")
            assert not await dead_letters(db, "balances")
            assert w.counts["applied"] >= len(events)
    finally:
        os.environ.pop(POISON_FLAG, None)
    assert await order_errors(db) == 0


async def accounts_match_except(db: Any, events: Any) -> bool:
    try:
        got = await accounts(db)
    except Exception:
        return False
    from tests.integration.messaging.test_consumer import expected

    return all(got.get(s) == v for s, v in expected(events).items())


async def test_moving_between_the_log_and_a_broker_applies_nothing_twice(backend: Any) -> None:
    log, db = backend
    transport = InMemoryTransport(dedup_window=None)
    relay = Relay(log, db, transport, partitions=N, batch_size=20, poll_interval=0.05)
    await relay.start()
    try:
        events = await write(log, 40)
        async with worker(log, db, "log-1"):
            await until(lambda: accounts_match(db, events), what="log workers")
        events += await write(log, 40)
        # the same projection, now fed by the broker: the relay republished everything
        # from sequence 1; what the log workers applied is skipped by the floor
        consumer = Consumer(transport.source(), db, [balances], serializer, partitions=N,
                            lease_ttl=0.6)  # fmt: skip
        async with consumer:
            await until(lambda: accounts_match(db, events), what="broker consumer")
        assert consumer.counts.get("floor", 0) == 40
        events += await write(log, 40)
        async with worker(log, db, "log-2"):  # and back to the log
            await until(lambda: accounts_match(db, events), what="back to the log")
    finally:
        await relay.stop()
    assert await order_errors(db) == 0


async def test_tokens_wait_for_the_partitions_that_hold_the_write(backend: Any) -> None:
    log, db = backend
    await write(log, 20)
    a = worker(log, db, "a")
    async with a:
        gate = ConsistencyGate(log, db, signal=a.signal)
        [stored] = await log.append("acct-3", Deposited("acct-3", 1))
        stale = await gate.check(["balances"], stored.position, "wait", 20.0)
        assert stale is False
        rows = await partition_status(db, "balances")
        assert rows[partition_of("acct-3", N)].position >= stored.position
    [late] = await log.append("acct-5", Deposited("acct-5", 1))  # nobody applies it now
    assert await gate.check(["balances"], late.position, "stale", 0.2) is True
