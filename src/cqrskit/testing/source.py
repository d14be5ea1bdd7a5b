"""A conformance kit for broker sources (the consuming side): subclass it in your tests.

Each ``test_*`` coroutine checks one promise of :class:`~cqrskit.messaging.Source` (and of
the :class:`~cqrskit.messaging.Consumer` running on it). A source's test module subclasses
:class:`SourceConformance` in a class named ``Test...`` and implements the abstract
methods::

    class TestMySource(SourceConformance):
        async def make_pair(self) -> tuple[Transport, Source]: ...
        async def interrupt(self, source) -> None: ...
        async def dispose(self, transport, source) -> None: ...

Only the standard library is imported here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from cqrskit.errors import BrokerUnavailableError
from cqrskit.eventlog import InMemoryEventStore, StoredEvent
from cqrskit.messages import Event
from cqrskit.messaging import Consumer, Delivery, Envelope, Relay, Source, Transport
from cqrskit.messaging.source import Subscription
from cqrskit.projections import Projection, ProjectionContext
from cqrskit.projections.partitions import partition_status
from cqrskit.sqlite import SqliteReadDatabase
from cqrskit.testing.transport import envelopes_for, stored_events

__all__ = ["SourceConformance", "kit_projection"]


@dataclass(frozen=True, slots=True)
class _KitEvent(Event):
    """The kit's event (decoded by :func:`_decode`)."""

    n: int


def kit_projection(name: str) -> Projection:
    """A projection of the kit's events: per stream, the sum of ``n``, how many events were
    applied and the last version (a version that is not last + 1 is counted as disorder)."""
    projection = Projection(
        name,
        tables={
            "totals": (
                "CREATE TABLE {totals} (stream TEXT PRIMARY KEY, total BIGINT NOT NULL, "
                "applied BIGINT NOT NULL, version BIGINT NOT NULL, disorder BIGINT NOT NULL)",
            )
        },
    )

    @projection.on(_KitEvent)
    async def apply(event: _KitEvent, ctx: ProjectionContext) -> None:
        stored = ctx.stored
        assert stored is not None
        table = ctx.table("totals")
        row = await ctx.fetchone(f"SELECT version FROM {table} WHERE stream = ?", stored.stream)
        bad = 0 if stored.version == (int(row[0]) if row else 0) + 1 else 1
        await ctx.execute(
            f"INSERT INTO {table} (stream, total, applied, version, disorder) "
            "VALUES (?, ?, 1, ?, ?) ON CONFLICT (stream) DO UPDATE SET "
            f"total = {table}.total + excluded.total, applied = {table}.applied + 1, "
            f"version = excluded.version, disorder = {table}.disorder + excluded.disorder",
            stored.stream,
            event.n,
            stored.version,
            bad,
        )

    return projection


def _decode(stored: StoredEvent) -> _KitEvent:
    return _KitEvent(int(json.loads(stored.data)["n"]))


class SourceConformance(ABC):
    """The promises every source keeps; subclass and implement the abstract methods."""

    #: partitions used by the checks
    partitions = 4
    #: the longest any check waits for a condition (seconds)
    timeout = 30.0
    #: whether two groups each get every message (``False`` for a broker whose queue is
    #: consumed by one group, as RabbitMQ's: then a second subscriber must get nothing
    #: while the first one holds the partition — single active consumer)
    independent_groups = True

    @abstractmethod
    async def make_pair(self) -> tuple[Transport, Source]:
        """A transport and the matching source on destinations of their own (fresh for
        each call)."""

    @abstractmethod
    async def interrupt(self, source: Source) -> None:
        """Cut the source's connection to the broker (the broker stays up)."""

    @abstractmethod
    async def dispose(self, transport: Transport, source: Source) -> None:
        """Close both and delete their destinations from the broker."""

    # -- helpers -------------------------------------------------------------------------

    async def fetch_until(
        self, sub: Subscription, count: int, *, max_messages: int = 50
    ) -> list[Delivery]:
        """Fetch until ``count`` messages came (bounded by :attr:`timeout`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        out: list[Delivery] = []
        while len(out) < count:
            assert loop.time() < deadline, f"only {len(out)} of {count} messages came"
            out += await sub.fetch(min(max_messages, count - len(out)), 0.5)
        return out

    @staticmethod
    def sequences(deliveries: Sequence[Delivery]) -> list[int]:
        """The sequence numbers of ``deliveries``."""
        return [Envelope.from_wire(d.headers, d.body).sequence for d in deliveries]

    def group(self) -> str:
        """A fresh consumer group name."""
        return f"kit_{uuid.uuid4().hex[:10]}"

    # -- the checks ----------------------------------------------------------------------

    async def test_fetch_returns_a_partition_in_order(self) -> None:
        """A subscription returns its partition's messages in publish order."""
        t, src = await self.make_pair()
        try:
            envs = envelopes_for(stored_events(60), self.partitions)
            assert await t.publish(envs) == [None] * 60
            for p in range(self.partitions):
                want = [e.sequence for e in envs if e.partition == p]
                sub = await src.subscribe(self.group(), p, "")
                got = await self.fetch_until(sub, len(want), max_messages=7)
                assert self.sequences(got) == want
                assert await sub.fetch(10, 0.2) == []
                await sub.ack(got)
                await sub.close()
        finally:
            await self.dispose(t, src)

    async def test_unacknowledged_messages_come_again_in_order(self) -> None:
        """What a closed subscription did not acknowledge comes to the next one, in
        order; what it acknowledged may come again (the consumer drops it by sequence)."""
        t, src = await self.make_pair()
        group = self.group()
        try:
            envs = envelopes_for(stored_events(40, streams=1), self.partitions)
            p = envs[0].partition
            assert await t.publish(envs) == [None] * 40
            sub = await src.subscribe(group, p, "")
            first = await self.fetch_until(sub, 40)
            await sub.ack(first[:15])
            await sub.close()
            sub = await src.subscribe(group, p, first[14].cursor)
            again = self.sequences(await self.fetch_until(sub, 25))
            assert again[0] <= 16
            tail = [s for s in again if s >= 16]
            assert tail[:25] == list(range(16, 41))
            await sub.close()
        finally:
            await self.dispose(t, src)

    async def test_groups_are_independent(self) -> None:
        """Two groups each get every message of a partition (or, where a queue serves one
        group, a second subscriber gets nothing while the first holds it)."""
        t, src = await self.make_pair()
        try:
            envs = envelopes_for(stored_events(10, streams=1), self.partitions)
            p = envs[0].partition
            assert await t.publish(envs) == [None] * 10
            if not self.independent_groups:
                first = await src.subscribe(self.group(), p, "")
                second = await src.subscribe(self.group(), p, "")
                got = await self.fetch_until(first, 10)
                assert self.sequences(got) == list(range(1, 11))
                assert await second.fetch(10, 0.5) == []
                await first.close()
                again = await self.fetch_until(second, 10)  # the active one left: takes over
                assert self.sequences(again) == list(range(1, 11))
                await second.ack(again)
                await second.close()
                return
            for group in (self.group(), self.group()):
                sub = await src.subscribe(group, p, "")
                got = await self.fetch_until(sub, 10)
                assert self.sequences(got) == list(range(1, 11))
                await sub.ack(got)
                await sub.close()
        finally:
            await self.dispose(t, src)

    async def test_a_cut_connection_raises_unavailable_then_recovers(self) -> None:
        """After a cut connection, fetch fails as unavailable (or returns nothing) and a new
        subscription gets everything not acknowledged."""
        t, src = await self.make_pair()
        group = self.group()
        try:
            envs = envelopes_for(stored_events(20, streams=1), self.partitions)
            p = envs[0].partition
            assert await t.publish(envs[:10]) == [None] * 10
            sub = await src.subscribe(group, p, "")
            got = await self.fetch_until(sub, 10)
            await sub.ack(got)
            await self.interrupt(src)
            try:
                await sub.fetch(10, 0.3)
            except BrokerUnavailableError:
                pass
            await sub.close()
            assert await t.publish(envs[10:]) == [None] * 10
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            while True:
                try:
                    sub = await src.subscribe(group, p, got[-1].cursor)
                    seqs: list[int] = []
                    while not seqs or seqs[-1] < 20:  # acks lost with the cut repeat 1..10
                        seqs += self.sequences(await self.fetch_until(sub, 1))
                    break
                except BrokerUnavailableError:
                    assert loop.time() < deadline
                    await asyncio.sleep(0.1)
            assert [s for s in seqs if s > 10] == list(range(11, 21))
            await sub.close()
        finally:
            await self.dispose(t, src)

    async def test_consumer_applies_every_event_once_in_order(self) -> None:
        """Relay -> broker -> Consumer: every event applied once, in order per stream, a
        republished batch dropped; two workers share the partitions."""
        t, src = await self.make_pair()
        store = InMemoryEventStore()
        path = os.path.join(tempfile.mkdtemp(prefix="cqrskit-kit-"), "read.db")
        db = SqliteReadDatabase(path)
        projection = kit_projection(self.group())
        events = stored_events(200, streams=9)
        try:
            store._apply(events[:120])
            relay = Relay(store, db, t, partitions=self.partitions, batch_size=50)
            async with relay:
                assert await relay.wait_published(120, self.timeout)
            # the relay's unacknowledged tail, published again
            assert await t.publish(envelopes_for(events[:120], self.partitions)[80:]) == [None] * 40
            workers = [
                Consumer(src, db, [projection], _decode, partitions=self.partitions,
                         batch_size=30, lease_ttl=1.0, owner=f"kit-{i}")
                for i in range(2)
            ]  # fmt: skip
            for w in workers:
                await w.start()
            store._apply(events[120:])
            async with Relay(store, db, t, partitions=self.partitions, batch_size=50) as relay:
                assert await relay.wait_published(200, self.timeout)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + self.timeout
                while True:
                    rows = await partition_status(db, projection.name, store)
                    if rows and all(r.lag_events == 0 for r in rows):
                        break
                    assert loop.time() < deadline, rows
                    await asyncio.sleep(0.05)
            for w in workers:
                await w.stop()
            async with db.read_only() as s:
                got = {
                    str(r[0]): (int(r[1]), int(r[2]), int(r[3]))
                    for r in await s.fetchall("SELECT stream, total, applied, disorder FROM totals")
                }
            want: dict[str, tuple[int, int, int]] = {}
            for e in events:
                total, n, _ = want.get(e.stream, (0, 0, 0))
                want[e.stream] = (total + json.loads(e.data)["n"], n + 1, 0)
            assert got == want
            assert sum(w.counts.get("applied", 0) for w in workers) == 200
        finally:
            await db.close()
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            await self.dispose(t, src)
