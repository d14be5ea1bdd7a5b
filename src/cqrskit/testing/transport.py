"""A conformance kit for broker transports: subclass it in your transport's tests.

Each ``test_*`` coroutine checks one promise of :class:`~cqrskit.messaging.Transport` (and
of the :class:`~cqrskit.messaging.Relay` running on it). A transport's test module
subclasses :class:`TransportConformance` in a class named ``Test...`` and implements the
abstract methods; pytest (with pytest-asyncio in auto mode) runs every check::

    class TestMyTransport(TransportConformance):
        async def make_transport(self, *, max_bytes=None, missing=False) -> Transport: ...
        async def read_raw(self, transport, partition) -> list[tuple[Mapping, bytes]]: ...
        async def interrupt(self, transport) -> None: ...
        async def dispose(self, transport) -> None: ...

Only the standard library is imported here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from cqrskit.errors import BrokerUnavailableError, SignatureError
from cqrskit.eventlog import InMemoryEventStore, StoredEvent
from cqrskit.messaging import Envelope, HmacSigner, Relay, Transport, partition_of
from cqrskit.projections import dead_letters, request_retry
from cqrskit.sqlite import SqliteReadDatabase

__all__ = ["TransportConformance", "envelopes_for", "stored_events"]


def stored_events(count: int, streams: int = 10, *, start: int = 1) -> list[StoredEvent]:
    """``count`` synthetic stored events over ``streams`` streams (payload: ``{"n": i}``),
    positions from ``start``, versions per stream from 1."""
    versions: dict[str, int] = {}
    out = []
    for i in range(start, start + count):
        stream = f"kit-{i % streams}"
        versions[stream] = versions.get(stream, 0) + 1
        out.append(
            StoredEvent(
                i,
                stream,
                versions[stream],
                "kit.event",
                1,
                json.dumps({"n": i}),
                {
                    "message_id": f"kit-{os.getpid()}-{id(versions)}-{i}",
                    "correlation_id": None,
                    "causation_id": None,
                    "timestamp": "2026-01-01T00:00:00.000000+00:00",
                },
            )
        )
    return out


def envelopes_for(events: Sequence[StoredEvent], partitions: int) -> list[Envelope]:
    """Envelopes numbered per partition as the relay numbers them."""
    seqs: dict[int, int] = {}
    out = []
    for e in events:
        p = partition_of(e.stream, partitions)
        seqs[p] = seqs.get(p, 0) + 1
        out.append(Envelope.from_stored(e, p, partitions, seqs[p]))
    return out


class _Held(Transport):
    """Wraps a transport and holds its results until released (ack-before-checkpoint)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.name = inner.name
        self.broker_dedup = inner.broker_dedup
        self.release = asyncio.Event()
        self.sent = asyncio.Event()

    def destination(self, partition: int) -> str:
        return self.inner.destination(partition)

    async def publish(self, messages: Sequence[Envelope]) -> list[str | None]:
        results = await self.inner.publish(messages)
        self.sent.set()
        await self.release.wait()
        return results


class TransportConformance(ABC):
    """The promises every transport keeps; subclass and implement the abstract methods."""

    #: partitions used by the checks
    partitions = 4
    #: the longest any check waits for a condition (seconds)
    timeout = 30.0

    # -- what a transport's tests provide --------------------------------------------------

    @abstractmethod
    async def make_transport(
        self, *, max_bytes: int | None = None, missing: bool = False
    ) -> Transport:
        """A transport on destinations of its own (fresh for each call), created on the
        broker; with ``missing=True`` its destinations must *not* exist on the broker (so
        publishing is refused). ``max_bytes`` sets the transport's payload limit."""

    @abstractmethod
    async def read_raw(
        self, transport: Transport, partition: int
    ) -> list[tuple[Mapping[str, Any], bytes]]:
        """Everything the broker holds for ``partition``, in broker order, as (headers,
        body) exactly as a consumer receives them."""

    @abstractmethod
    async def interrupt(self, transport: Transport) -> None:
        """Cut the transport's connection to the broker (the broker stays up)."""

    @abstractmethod
    async def dispose(self, transport: Transport) -> None:
        """Close the transport and delete its destinations from the broker."""

    # -- helpers -------------------------------------------------------------------------

    async def read(self, transport: Transport, partition: int) -> list[Envelope]:
        """The envelopes the broker holds for ``partition``, decoded."""
        return [Envelope.from_wire(h, b) for h, b in await self.read_raw(transport, partition)]

    async def read_all(self, transport: Transport) -> dict[int, list[Envelope]]:
        """Every partition's envelopes."""
        return {p: await self.read(transport, p) for p in range(self.partitions)}

    @staticmethod
    def deduplicated(envs: Sequence[Envelope]) -> list[Envelope]:
        """What a consumer keeps: the first copy of each sequence number, in order."""
        out: list[Envelope] = []
        last = 0
        for env in envs:
            if env.sequence <= last:
                continue
            assert env.sequence == last + 1, f"gap: {last} -> {env.sequence}"
            out.append(env)
            last = env.sequence
        return out

    async def _eventually_read(
        self, transport: Transport, expected: int, *, raw: bool = False
    ) -> dict[int, list[Envelope]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            got = await self.read_all(transport)
            total = sum(len(v if raw else self.deduplicated(v)) for v in got.values())
            if total >= expected or loop.time() > deadline:
                return got
            await asyncio.sleep(0.05)

    # -- the checks ----------------------------------------------------------------------

    async def test_publish_keeps_order_per_partition(self) -> None:
        """Messages of a partition are stored in the order given, across calls."""
        t = await self.make_transport()
        try:
            envs = envelopes_for(stored_events(120), self.partitions)
            assert await t.publish(envs[:70]) == [None] * 70
            assert await t.publish(envs[70:]) == [None] * 50
            got = await self._eventually_read(t, 120)
            for p in range(self.partitions):
                want = [e.message_id for e in envs if e.partition == p]
                assert [e.message_id for e in got[p]] == want, f"partition {p} out of order"
                assert [e.sequence for e in got[p]] == list(range(1, len(want) + 1))
                assert all(e.partition == p and e.partitions == self.partitions for e in got[p])
        finally:
            await self.dispose(t)

    async def test_envelope_round_trips_every_field(self) -> None:
        """Every envelope field (awkward text included) reads back equal."""
        t = await self.make_transport()
        try:
            [e] = stored_events(1)
            e = StoredEvent(
                e.position,
                "strange stream: ü %20 ./*>",
                e.version,
                "kit.type-ü",
                3,
                '{"text": "caf\\u00e9"}',
                {"message_id": "m-1", "correlation_id": "c 1", "causation_id": "ä",
                 "timestamp": "2026-01-01T00:00:00+00:00"},
            )  # fmt: skip
            env = Envelope.from_stored(e, partition_of(e.stream, 4), 4, 1)
            assert await t.publish([env]) == [None]
            got = (await self._eventually_read(t, 1))[env.partition]
            assert got == [env]
            assert got[0].to_stored() == StoredEvent(
                e.position, e.stream, e.version, e.type, 3, e.data,
                {"message_id": "m-1", "correlation_id": "c 1", "causation_id": "ä",
                 "timestamp": "2026-01-01T00:00:00+00:00"},
            )  # fmt: skip
        finally:
            await self.dispose(t)

    async def test_republished_batch_is_dropped_by_broker_or_by_sequence(self) -> None:
        """A republished tail is dropped by the broker (dedup) or by sequence number."""
        t = await self.make_transport()
        try:
            envs = envelopes_for(stored_events(40), self.partitions)
            assert await t.publish(envs) == [None] * 40
            assert await t.publish(envs[10:]) == [None] * 30  # a relay's unacked tail again
            got = await self._eventually_read(t, 40)
            raw_total = sum(len(v) for v in got.values())
            kept = {p: self.deduplicated(v) for p, v in got.items()}
            assert sum(len(v) for v in kept.values()) == 40
            for p, v in got.items():
                by_seq = {e.sequence: e.message_id for e in kept[p]}
                assert all(by_seq[e.sequence] == e.message_id for e in v), "seq reused"
            if t.broker_dedup:
                assert raw_total == 40, f"broker kept {raw_total - 40} duplicate(s)"
            else:
                assert raw_total == 70
        finally:
            await self.dispose(t)

    async def test_too_large_is_refused_and_the_rest_goes_through(self) -> None:
        """An oversized payload is refused; the messages around it are stored."""
        t = await self.make_transport(max_bytes=2000)
        try:
            events = stored_events(3, streams=1)
            big = events[1]
            events[1] = StoredEvent(
                big.position, big.stream, big.version, big.type, 1,
                json.dumps({"blob": "x" * 5000}), big.metadata,
            )  # fmt: skip
            envs = envelopes_for(events, self.partitions)
            # refusal() says so before sending (the relay parks such an event in place)
            assert t.refusal(envs[0]) is None
            assert isinstance(t.refusal(envs[1]), str)
            results = await t.publish(envs)
            assert results[0] is None, results
            assert results[2] is None, results
            assert isinstance(results[1], str), results
            assert results[1], results
            got = await self._eventually_read(t, 2, raw=True)
            ids = [e.message_id for v in got.values() for e in v]
            assert ids == [envs[0].message_id, envs[2].message_id]
        finally:
            await self.dispose(t)

    async def test_missing_destination_is_refused_not_raised(self) -> None:
        """A destination that does not exist is a refusal per message, not an outage."""
        t = await self.make_transport(missing=True)
        try:
            envs = envelopes_for(stored_events(5), self.partitions)
            results = await asyncio.wait_for(t.publish(envs), self.timeout)
            assert all(isinstance(r, str) and r for r in results), results
        finally:
            await self.dispose(t)

    async def test_signed_envelopes_verify_and_tampering_is_caught(self) -> None:
        """Signed messages verify; altered, moved or unknown-key ones do not."""
        t = await self.make_transport()
        signer = HmacSigner({"k1": b"0123456789abcdef0123"})
        try:
            envs = [
                e.signed(signer, t.destination(e.partition))
                for e in envelopes_for(stored_events(8), self.partitions)
            ]
            assert await t.publish(envs) == [None] * 8
            await self._eventually_read(t, 8)
            checked = 0
            for p in range(self.partitions):
                dest = t.destination(p)
                for headers, body in await self.read_raw(t, p):
                    env = Envelope.from_wire(headers, body, destination=dest, verifier=signer)
                    assert env.key_id == "k1"
                    checked += 1
                    other = HmacSigner({"k2": b"0123456789abcdef0123"})
                    for h, b, d, v in (
                        (headers, body + b" ", dest, signer),  # altered payload
                        (headers, body, dest + "x", signer),  # moved to another destination
                        ({**headers, "cqrskit-version": "99"}, body, dest, signer),  # altered
                        (headers, body, dest, other),  # signed with a key we do not know
                    ):
                        try:
                            Envelope.from_wire(h, b, destination=d, verifier=v)
                        except SignatureError:
                            continue
                        raise AssertionError("a tampered message passed verification")
            assert checked == 8
        finally:
            await self.dispose(t)

    async def test_reconnects_after_the_connection_is_cut(self) -> None:
        """After a cut connection publishing resumes and nothing is lost or reordered."""
        t = await self.make_transport()
        try:
            envs = envelopes_for(stored_events(20), self.partitions)
            assert await t.publish(envs[:10]) == [None] * 10
            await self.interrupt(t)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            while True:
                try:
                    assert await t.publish(envs[10:]) == [None] * 10
                    break
                except BrokerUnavailableError:
                    if loop.time() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            got = await self._eventually_read(t, 20)
            kept = [e.message_id for v in got.values() for e in self.deduplicated(v)]
            assert sorted(kept) == sorted(e.message_id for e in envs)
        finally:
            await self.dispose(t)

    async def test_sends_in_flight_keep_order_across_a_cut(self) -> None:
        """Overlapping sends are stored in call order; a connection cut with sends in
        flight never lets a later batch be stored ahead of an earlier batch's lost tail, so
        publishing again from the first batch not acknowledged restores every partition."""
        t = await self.make_transport()
        try:
            envs = envelopes_for(stored_events(90), self.partitions)
            batches = [envs[0:30], envs[30:60], envs[60:90]]
            futures = [await t.send(batches[0]), await t.send(batches[1])]
            await self.interrupt(t)
            try:
                futures.append(await t.send(batches[2]))
            except BrokerUnavailableError:
                pass
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            for outcome in outcomes:
                assert outcome == [None] * 30 or isinstance(outcome, BrokerUnavailableError), (
                    outcome
                )
            first = next(
                (i for i, o in enumerate(outcomes) if not isinstance(o, list)), len(outcomes)
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            i = first
            while i < len(batches):  # what the relay does: the same batches, in order
                try:
                    assert await t.publish(batches[i]) == [None] * 30
                    i += 1
                except BrokerUnavailableError:
                    if loop.time() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            got = await self._eventually_read(t, 90)
            for p in range(self.partitions):
                kept = self.deduplicated(got[p])  # asserts: no gap in first-copy order
                assert [e.message_id for e in kept] == [
                    e.message_id for e in envs if e.partition == p
                ], f"partition {p}"
        finally:
            await self.dispose(t)

    # -- the relay on this transport -------------------------------------------------------

    async def _relay_setup(self) -> tuple[InMemoryEventStore, SqliteReadDatabase, str]:
        """An event log and a state database in a new temporary directory, which
        :meth:`_relay_teardown` removes."""
        store = InMemoryEventStore()
        path = os.path.join(tempfile.mkdtemp(prefix="cqrskit-kit-"), "state.db")
        return store, SqliteReadDatabase(path), path

    async def _relay_teardown(self, db: SqliteReadDatabase) -> None:
        """Close ``db`` and remove the temporary directory :meth:`_relay_setup` made."""
        await db.close()
        shutil.rmtree(os.path.dirname(db.path), ignore_errors=True)

    async def _append(self, store: InMemoryEventStore, events: Sequence[StoredEvent]) -> None:
        store._apply(list(events))  # synthetic events straight into the log
        store._wake()

    async def test_relay_publishes_every_event_once_in_stream_order(self) -> None:
        """The relay publishes every event once, in order per stream."""
        t = await self.make_transport()
        store, db, _ = await self._relay_setup()
        try:
            events = stored_events(150, streams=12)
            async with Relay(store, db, t, partitions=self.partitions, batch_size=40) as relay:
                await self._append(store, events[:90])
                assert await relay.wait_published(90, self.timeout)
                await self._append(store, events[90:])
                assert await relay.wait_published(150, self.timeout)
            got = await self._eventually_read(t, 150)
            kept = [e for v in got.values() for e in self.deduplicated(v)]
            assert sorted(e.position for e in kept) == list(range(1, 151))
            last: dict[str, int] = {}
            for p in range(self.partitions):
                for e in self.deduplicated(got[p]):
                    assert e.version == last.get(e.stream, 0) + 1, "per-stream order"
                    last[e.stream] = e.version
        finally:
            await self._relay_teardown(db)
            await self.dispose(t)

    async def test_relay_advances_its_checkpoint_only_after_the_ack(self) -> None:
        """The relay's checkpoint stays put until the broker acknowledged the batch."""
        inner = await self.make_transport()
        held = _Held(inner)
        store, db, _ = await self._relay_setup()
        try:
            await self._append(store, stored_events(30))
            async with Relay(store, db, held, partitions=self.partitions) as relay:
                await asyncio.wait_for(held.sent.wait(), self.timeout)
                await asyncio.sleep(0.05)  # give a wrong relay the chance to commit
                assert relay.checkpoint == 0
                async with db.read_only() as s:
                    cp = await s.fetchval(
                        "SELECT position FROM cqrskit_checkpoints WHERE projection = 'relay'"
                    )
                assert cp == 0
                held.release.set()
                assert await relay.wait_published(30, self.timeout)
            got = await self._eventually_read(inner, 30)
            assert sum(len(self.deduplicated(v)) for v in got.values()) == 30
        finally:
            await self._relay_teardown(db)
            await self.dispose(inner)

    async def test_relay_parks_a_refused_event_and_keeps_the_sequence_whole(self) -> None:
        """A refused event parks its stream; placeholders keep the sequence whole."""
        t = await self.make_transport()
        store, db, _ = await self._relay_setup()
        try:
            events = stored_events(20, streams=4)
            bad = events[4]  # position 5: stream kit-1, version 2
            events[4] = StoredEvent(
                bad.position, bad.stream, bad.version, bad.type, 1,
                json.dumps({"blob": "x" * 3000}), bad.metadata,
            )  # fmt: skip
            await self._append(store, events)
            relay = Relay(store, db, t, partitions=self.partitions, max_bytes=1000)
            async with relay:
                assert await relay.wait_published(20, self.timeout)
            assert relay.parked == 4  # kit-1 v2 .. v5 (v3..v5 wait behind the parked one)
            got = await self._eventually_read(t, 20)
            kept = [e for v in got.values() for e in self.deduplicated(v)]
            assert len(kept) == 20
            parked = sorted((e.stream, e.version) for e in kept if e.kind == "parked")
            assert parked == [("kit-1", v) for v in range(2, 6)]
            async with db.read_only() as s:
                rows = await s.fetchall(
                    "SELECT stream, version FROM cqrskit_dead_letters WHERE projection = "
                    "'relay' ORDER BY position"
                )
            assert [tuple(r) for r in rows] == [("kit-1", v) for v in range(2, 6)]
        finally:
            await self._relay_teardown(db)
            await self.dispose(t)

    async def test_relay_retries_parked_events_in_stream_order(self) -> None:
        """Parked events are published again on request, in stream order, under new
        sequence numbers; their dead letters go."""
        t = await self.make_transport()
        store, db, _ = await self._relay_setup()
        try:
            events = stored_events(20, streams=4)
            bad = events[4]  # position 5: stream kit-1, version 2
            events[4] = StoredEvent(
                bad.position, bad.stream, bad.version, bad.type, 1,
                json.dumps({"blob": "x" * 3000}), bad.metadata,
            )  # fmt: skip
            await self._append(store, events)
            relay = Relay(
                store, db, t, partitions=self.partitions, max_bytes=1000, state_interval=0.05
            )
            async with relay:
                assert await relay.wait_published(20, self.timeout)
                assert relay.parked == 4
                relay.max_bytes = 1 << 20  # the fix: the limit allows the event now
                assert await request_retry(db, "relay") == 4
                loop = asyncio.get_running_loop()
                deadline = loop.time() + self.timeout
                while relay.published < 20 or await dead_letters(db, "relay"):
                    assert loop.time() < deadline, (relay.published, relay.parked)
                    await asyncio.sleep(0.02)
            got = await self._eventually_read(t, 24)
            kept = {p: self.deduplicated(v) for p, v in got.items()}
            real = [e for v in kept.values() for e in v if e.kind == "event"]
            assert sorted(e.position for e in real) == list(range(1, 21))
            p = partition_of("kit-1", self.partitions)
            versions = [e.version for e in kept[p] if e.stream == "kit-1" and e.kind == "event"]
            assert versions == [1, 2, 3, 4, 5], versions
            retried = [
                e for e in kept[p] if e.stream == "kit-1" and e.version > 1 and e.kind == "event"
            ]
            placeholders = [e for e in kept[p] if e.kind == "parked"]
            assert len(placeholders) == 4
            assert min(e.sequence for e in retried) > max(e.sequence for e in placeholders)
        finally:
            await self._relay_teardown(db)
            await self.dispose(t)
