"""Handing partitions over never stalls a consumer's lease heartbeat.

When a worker gives partitions up to a newcomer, each one's loop has to stop first (its
batch commits, its subscription closes — on a busy RabbitMQ a close takes seconds). The
worker keeps ticking meanwhile: its other partitions and its own worker row stay beaten,
so they are not taken over, and the newcomer does not count it as gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from tests.integration.messaging.test_consumer import until
from tests.support.bank import balances, serializer

from cqrskit.messaging import Consumer, Delivery, InMemorySource, InMemoryTransport, Subscription
from cqrskit.projections import ReadDatabase

N = 4


class SlowClose(InMemorySource):
    """The in-memory broker, whose subscriptions close only once ``gate`` is set."""

    def __init__(self, broker: InMemoryTransport) -> None:
        super().__init__(broker)
        self.gate = asyncio.Event()
        self.closing = 0

    async def subscribe(self, group: str, partition: int, cursor: str) -> Subscription:
        return _SlowSubscription(self, await super().subscribe(group, partition, cursor))


class _SlowSubscription(Subscription):
    def __init__(self, source: SlowClose, inner: Subscription) -> None:
        self.source = source
        self.inner = inner

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        return await self.inner.fetch(max_messages, timeout)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        await self.inner.ack(deliveries)

    async def close(self) -> None:
        self.source.closing += 1
        await asyncio.wait_for(self.source.gate.wait(), 60)
        await self.inner.close()


async def worker_beat(db: ReadDatabase, owner: str) -> int:
    async with db.read_only() as s:
        value = await s.fetchval(
            "SELECT beat FROM cqrskit_workers WHERE projection = 'balances' AND owner = ?", owner
        )
    return int(value or 0)


async def lease_rows(db: ReadDatabase) -> dict[int, tuple[str | None, int]]:
    async with db.read_only() as s:
        rows = await s.fetchall(
            "SELECT partition, owner, epoch FROM cqrskit_partitions WHERE projection = 'balances'"
        )
    return {int(r[0]): (r[1], int(r[2])) for r in rows}


async def beaten_to(db: ReadDatabase, owner: str, value: int) -> bool:
    return await worker_beat(db, owner) >= value


async def test_a_slow_handover_does_not_stall_the_lease_heartbeat(backend: Any) -> None:
    _log, db = backend
    broker = InMemoryTransport(dedup_window=None)
    slow = SlowClose(broker)
    options: dict[str, Any] = {"partitions": N, "batch_size": 20, "lease_ttl": 0.6}
    a = Consumer(slow, db, [balances], serializer, owner="worker-a", **options)
    b = Consumer(broker.source(), db, [balances], serializer, owner="worker-b", **options)
    try:
        await a.start()
        await until(lambda: len(a.owned("balances")) == N, what="a holds every partition")
        before = a.owned("balances")
        await b.start()
        await until(lambda: slow.closing >= 1, what="a hands a partition over")
        beat = await worker_beat(db, "worker-a")
        # a keeps ticking while both closes hang: 8 ticks are two lease_ttl
        await until(
            lambda: beaten_to(db, "worker-a", beat + 8),
            timeout=15,
            what="a's heartbeat goes on during the handover",
        )
        assert slow.closing == 2  # both partitions handed over at once
        rows = await lease_rows(db)
        kept = {p: before[p] for p in (0, 1)}
        assert {p: rows[p] for p in kept} == {p: ("worker-a", e) for p, e in kept.items()}, rows
        slow.gate.set()
        await until(
            lambda: set(a.owned("balances")) == {0, 1} and set(b.owned("balances")) == {2, 3},
            what="fair shares",
        )
        assert a.owned("balances") == kept  # the same epochs: never taken over
    finally:
        slow.gate.set()
        await a.stop()
        await b.stop()
