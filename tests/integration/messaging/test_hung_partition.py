"""A partition loop that hangs inside a handler (the process stays alive): the worker stops
beating that partition, another worker takes it within the lease and applies the event;
when the hung handler finally returns, its commit is fenced — applied once (PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from tests.integration.messaging.test_consumer import until

from cqrskit import Event
from cqrskit.eventlog import StoredEvent
from cqrskit.messaging import Consumer, Envelope, InMemoryTransport, partition_of
from cqrskit.projections import Projection, ProjectionContext, ReadDatabase
from cqrskit.serialization import EventTypes, JsonSerializer

N = 2


@dataclass(frozen=True, slots=True)
class Credited(Event):
    account: str
    amount: int


types = EventTypes()
types.register(Credited, "hang.credited")
serializer = JsonSerializer(types)
ledger = Projection(
    "ledger",
    tables={"totals": ("CREATE TABLE {totals} (id TEXT PRIMARY KEY, total BIGINT, n BIGINT)",)},
)
HANG: dict[str, Any] = {}


@ledger.on
async def credited(e: Credited, ctx: ProjectionContext) -> None:
    if e.amount < 0 and not HANG["hung"]:  # the first attempt hangs, later ones do not
        HANG["hung"] = True
        HANG["entered"].set()
        await HANG["release"].wait()
    t = ctx.table("totals")
    await ctx.execute(
        f"INSERT INTO {t} (id, total, n) VALUES (?, ?, 1) ON CONFLICT (id) DO UPDATE SET "
        f"total = {t}.total + excluded.total, n = {t}.n + 1",
        e.account,
        e.amount,
    )


def envelope(position: int, stream: str, version: int, amount: int, seq: int) -> Envelope:
    data = json.dumps({"account": stream, "amount": amount})
    md = {"message_id": f"h-{position}", "timestamp": "2026-01-01T00:00:00+00:00"}
    stored = StoredEvent(position, stream, version, "hang.credited", 1, data, md)
    return Envelope.from_stored(stored, partition_of(stream, N), N, seq)


async def totals(db: ReadDatabase) -> dict[str, tuple[int, int]]:
    async with db.read_only() as s:
        return {str(r[0]): (int(r[1]), int(r[2])) for r in await s.fetchall("SELECT * FROM totals")}


async def test_a_hung_partition_moves_and_its_late_commit_is_fenced(
    pg_read: tuple[str, ReadDatabase],
) -> None:
    _spec, db = pg_read
    HANG.update(hung=False, entered=asyncio.Event(), release=asyncio.Event())
    transport = InMemoryTransport(dedup_window=None)
    stream = "acct-hang"
    p = partition_of(stream, N)
    other = next(s for s in (f"acct-{i}" for i in range(50)) if partition_of(s, N) != p)
    for env in (envelope(1, stream, 1, -5, 1), envelope(2, other, 1, 7, 1)):
        transport.inject(env.partition, env.headers(), env.payload)
    options: dict[str, Any] = {"partitions": N, "batch_size": 1, "lease_ttl": 1.0}
    a = Consumer(transport.source(), db, [ledger], serializer, owner="a", **options)
    b = Consumer(transport.source(), db, [ledger], serializer, owner="b", **options)
    await a.start()
    try:
        await asyncio.wait_for(HANG["entered"].wait(), 30)  # a's loop of p hangs now
        assert p in a.owned("ledger")
        await b.start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await until(lambda: p in b.owned("ledger"), what="b took the hung partition")
        took = loop.time() - start
        await until(lambda: has(db, stream, (-5, 1)), what="b applied the event")
        transport.inject(p, *wire(envelope(3, stream, 2, 10, 2)))
        await until(lambda: has(db, stream, (5, 2)), what="later events flow")
        HANG["release"].set()  # a's handler returns: its commit must be refused
        await until(lambda: p not in a.owned("ledger"), what="a noticed it lost p")
        await asyncio.sleep(0)
        assert (await totals(db))[stream] == (5, 2)
        assert (await totals(db))[other] == (7, 1)
    finally:
        HANG["release"].set()
        await b.stop()
        await a.stop()
    assert took < 1.0 * 4 + 3


def wire(env: Envelope) -> tuple[dict[str, str], bytes]:
    return env.headers(), env.payload


async def has(db: ReadDatabase, stream: str, value: tuple[int, int]) -> bool:
    try:
        return (await totals(db)).get(stream) == value
    except Exception:
        return False
