"""The relay on SQLite and PostgreSQL logs, over the in-memory transport."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from tests.support.bank import Deposited, Unrelated

from cqrskit.errors import ConfigurationError
from cqrskit.messaging import Envelope, HmacSigner, InMemoryTransport, Relay, relay_status
from cqrskit.projections import ReadDatabase, dead_letters, request_retry
from cqrskit.projections import schema as pschema

Backend = tuple[Any, ReadDatabase]


async def until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def kept(t: InMemoryTransport, partitions: int) -> list[Envelope]:
    """What consumers keep: first copy per (partition, sequence), checked contiguous."""
    out = []
    for p in range(partitions):
        last = 0
        for env in t.messages(p):
            if env.sequence <= last:
                continue
            assert env.sequence == last + 1, (p, last, env.sequence)
            last = env.sequence
            out.append(env)
    return out


def check_stream_order(envs: list[Envelope]) -> None:
    last: dict[str, int] = {}
    for env in sorted(envs, key=lambda e: (e.partition, e.sequence)):
        assert env.version == last.get(env.stream, 0) + 1, (env.stream, env.version)
        last[env.stream] = env.version


async def fill(log: Any, count: int, streams: int = 5, start: int = 0) -> int:
    last = 0
    for i in range(start, start + count):
        stored = await log.append(f"acct-{i % streams}", Deposited(f"acct-{i % streams}", i))
        last = stored[-1].position
    return last


async def test_relay_publishes_the_log_with_lineage_and_reports_status(backend: Backend) -> None:
    log, db = backend
    t = InMemoryTransport()
    last = await fill(log, 40)
    async with Relay(log, db, t, partitions=4, batch_size=9) as relay:
        assert await relay.wait_published(last, 20)
        more = await fill(log, 10, start=40)
        assert await relay.wait_published(more, 20)
        status = await relay_status(db, log)
    envs = kept(t, 4)
    assert len(envs) == 50
    check_stream_order(envs)
    stored = await log.read_after(0, 100)
    assert [e.to_stored() for e in sorted(envs, key=lambda e: e.position)] == [
        type(s)(s.position, s.stream, s.version, s.type, s.schema_version, s.data,
                {k: s.metadata.get(k) for k in
                 ("message_id", "correlation_id", "causation_id", "timestamp")})
        for s in stored
    ]  # fmt: skip
    assert status.mode == "relay"
    assert status.checkpoint == more
    assert status.lag_events == 0
    assert status.dead_letters == 0
    assert relay.published == 50


async def test_broker_outage_backs_off_then_drains_once(backend: Backend) -> None:
    log, db = backend
    t = InMemoryTransport()
    t.available = False
    last = await fill(log, 30)
    async with Relay(log, db, t, partitions=2, max_backoff=0.2) as relay:
        await until(lambda: relay.outages >= 1)
        assert relay.checkpoint == 0
        status = await relay_status(db, log)
        assert status.lag_events == 30
        t.available = True
        assert await relay.wait_published(last, 20)
    assert len(kept(t, 2)) == 30
    assert sum(len(t.messages(p)) for p in range(2)) == 30


async def test_lost_acks_republish_the_same_ids_and_sequences(backend: Backend) -> None:
    log, db = backend
    t = InMemoryTransport(dedup_window=None)  # like Redis: the broker keeps every copy
    t.lose_acks(2)
    last = await fill(log, 25)
    async with Relay(log, db, t, partitions=3, max_backoff=0.05) as relay:
        assert await relay.wait_published(last, 20)
    raw = [e for p in range(3) for e in t.messages(p)]
    assert len(raw) == 75  # three copies: two lost acks, then one acknowledged
    envs = kept(t, 3)
    assert len(envs) == 25
    by_seq = {(e.partition, e.sequence): e.message_id for e in envs}
    assert all(by_seq[(e.partition, e.sequence)] == e.message_id for e in raw)
    check_stream_order(envs)


async def test_a_standby_takes_over_and_continues_the_numbering(backend: Backend) -> None:
    log, db = backend
    t = InMemoryTransport(dedup_window=None)
    first = await fill(log, 20)
    a = Relay(log, db, t, partitions=2, owner="a", lease_ttl=1.0)
    b = Relay(log, db, t, partitions=2, owner="b", lease_ttl=1.0)
    async with a:
        assert await a.wait_published(first, 20)
        await b.start()
        # for well past lease_ttl, an idle holder's heartbeats keep the standby out
        watch_until = time.monotonic() + 2.5 * b.lease_ttl
        while time.monotonic() < watch_until:
            assert not b.leading, "the standby took a lease its holder kept alive"
            assert a.leading
            await asyncio.sleep(0.05)
    # a released its lease on stop: b takes over and numbers on from a's counters
    try:
        second = await fill(log, 20, start=20)
        assert await b.wait_published(second, 20)
        assert b.leading
    finally:
        await b.stop()
    envs = kept(t, 2)
    assert len(envs) == 40
    check_stream_order(envs)


async def test_a_fenced_relay_cannot_move_the_checkpoint(backend: Backend) -> None:
    log, db = backend
    t = InMemoryTransport()
    gate = t.hold_acks()
    last = await fill(log, 10)
    async with Relay(log, db, t, owner="old", lease_ttl=30) as relay:
        await until(lambda: relay.leading and t.published > 0)
        async with db.transaction() as s:  # another relay takes the lease meanwhile
            row = await pschema.load(s, "relay")
            assert row is not None
            assert await pschema.take_lease(s, "relay", "new", row) == row.lease_epoch + 1
        gate.set()
        await until(lambda: not relay.leading)
        assert relay.checkpoint == 0
    status = await relay_status(db, log)
    assert status.checkpoint == 0
    assert status.lease_owner == "new"
    assert last > 0


async def test_refused_events_park_their_stream_and_retry_republishes(backend: Backend) -> None:
    log, db = backend
    t = InMemoryTransport()
    await fill(log, 4, streams=2)
    big = (await log.append("acct-0", Unrelated("x" * 500)))[-1]
    await log.append("acct-0", Deposited("acct-0", 1))
    last = await fill(log, 4, streams=2, start=100)
    relay = Relay(log, db, t, partitions=2, max_bytes=200, state_interval=0.05)
    async with relay:
        assert await relay.wait_published(last, 20)
        letters = await dead_letters(db, "relay")
        assert (letters[0].stream, letters[0].position) == ("acct-0", big.position)
        assert all(d.stream == "acct-0" for d in letters)
        assert len(letters) == 4  # the big one, then acct-0's later events wait behind it
        envs = kept(t, 2)
        assert sorted(e.kind for e in envs).count("parked") == 4
        relay.max_bytes = 1 << 20  # "fix" the limit, then retry from the CLI or code
        assert await request_retry(db, "relay") == 4
        await until(lambda: relay.published == 10)
        assert await dead_letters(db, "relay") == []
    envs = kept(t, 2)
    real = [e for e in envs if e.kind == "event"]
    assert len(real) == 10
    assert [e.version for e in real if e.stream == "acct-0"] == [1, 2, 3, 4, 5, 6]


async def test_a_retry_while_the_broker_is_down_backs_off_like_a_batch(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    log, db = backend
    t = InMemoryTransport()
    await log.append("acct-0", Unrelated("x" * 500))
    last = await fill(log, 3, streams=2, start=100)
    relay = Relay(log, db, t, max_bytes=200, state_interval=0.05, max_backoff=0.05)
    async with relay:
        assert await relay.wait_published(last, 20)
        epoch = relay.epoch
        t.available = False
        relay.max_bytes = 1 << 20
        assert await request_retry(db, "relay") == 3
        await until(lambda: relay.outages >= 1, timeout=10)
        assert relay.epoch == epoch  # an outage: the lease is kept, not lost and re-taken
        t.available = True
        await until(lambda: relay.published == 4)  # every event of the log
        assert await dead_letters(db, "relay") == []
    assert not [r for r in caplog.records if "failed; restarting" in r.getMessage()]


class _FlagDuringPublish(InMemoryTransport):
    """Runs ``during`` (once) inside a publish call: an operator acting meanwhile."""

    during: Any = None

    async def publish(self, messages: Any) -> list[str | None]:
        during, self.during = self.during, None
        if during is not None:
            await during()
        return await super().publish(messages)


async def test_a_retry_requested_while_another_is_published_is_not_lost(
    backend: Backend,
) -> None:
    log, db = backend
    t = _FlagDuringPublish()
    await log.append("acct-0", Unrelated("x" * 500))
    await log.append("acct-1", Unrelated("y" * 500))
    last = await fill(log, 4, streams=2, start=100)
    relay = Relay(log, db, t, partitions=2, max_bytes=200, state_interval=0.05)
    async with relay:
        assert await relay.wait_published(last, 20)
        assert {d.stream for d in await dead_letters(db, "relay")} == {"acct-0", "acct-1"}

        async def flag_acct_1() -> None:
            assert await request_retry(db, "relay", stream="acct-1") == 3

        t.during = flag_acct_1  # flagged while acct-0's retry is being published
        assert await request_retry(db, "relay", stream="acct-0") == 3
        deadline = time.monotonic() + 20
        while letters := await dead_letters(db, "relay"):
            assert any(d.retry for d in letters), f"a retry request was dropped: {letters}"
            assert time.monotonic() < deadline, letters
            await asyncio.sleep(0.02)
    assert relay.published == 6


async def test_an_event_the_transport_refuses_parks_its_stream_in_order(backend: Backend) -> None:
    """The transport's own limit is lower than the relay's: the event it would refuse is
    parked in place, and the later events of its stream in the same batch wait behind it
    instead of reaching the broker ahead of it; the sequence has no hole."""
    log, db = backend
    t = InMemoryTransport(max_bytes=200)
    await fill(log, 4, streams=2)
    big = (await log.append("acct-0", Unrelated("x" * 500)))[-1]
    await log.append("acct-0", Deposited("acct-0", 1))
    last = await fill(log, 4, streams=2, start=100)
    async with Relay(log, db, t, partitions=2) as relay:  # one batch holds them all
        assert await relay.wait_published(last, 20)
    letters = await dead_letters(db, "relay")
    assert [(d.stream, d.position) for d in letters][:1] == [("acct-0", big.position)]
    assert len(letters) == 4  # the big one, then acct-0's later events wait behind it
    envs = kept(t, 2)  # checks each partition's sequence is whole and in order
    assert len(envs) == 10
    real = [(e.stream, e.version) for e in envs if e.kind == "event"]
    assert [v for s, v in real if s == "acct-0"] == [1, 2]
    assert relay.gaps == 0


async def test_partition_sets_split_the_work_between_named_relays(backend: Backend) -> None:
    log, db = backend
    t = InMemoryTransport(dedup_window=None)
    last = await fill(log, 40, streams=9)
    r1 = Relay(log, db, t, name="relay_a", partitions=4, owned={0, 1})
    r2 = Relay(log, db, t, name="relay_b", partitions=4, owned={2, 3})
    async with r1, r2:
        assert await r1.wait_published(last, 20)
        assert await r2.wait_published(last, 20)
    envs = kept(t, 4)
    assert sorted(e.position for e in envs) == sorted(
        e.position for e in await log.read_after(0, 100)
    )
    assert r1.published == sum(1 for e in envs if e.partition in (0, 1))
    assert r2.published == sum(1 for e in envs if e.partition in (2, 3))
    assert 0 < r1.published < 40
    with pytest.raises(ConfigurationError):
        Relay(log, db, t, partitions=2, owned={2})


async def test_signed_relay_messages_verify(backend: Backend) -> None:
    log, db = backend
    t = InMemoryTransport()
    signer = HmacSigner({"k1": b"s" * 32})
    last = await fill(log, 12)
    async with Relay(log, db, t, partitions=2, signer=signer) as relay:
        assert await relay.wait_published(last, 20)
    n = 0
    for p in range(2):
        for h, b in t.wire(p):
            Envelope.from_wire(h, b, destination=t.destination(p), verifier=signer)
            n += 1
    assert n == 12


class Gated(InMemoryTransport):
    """Stores each send at once; acknowledges only once :attr:`release` is set."""

    def __init__(self) -> None:
        super().__init__(dedup_window=None)
        self.release = asyncio.Event()
        self.sends = 0

    async def send(self, messages: Any) -> asyncio.Future[list[str | None]]:
        acks = await super().send(messages)
        self.sends += 1

        async def later() -> list[str | None]:
            await self.release.wait()
            return await acks

        return asyncio.ensure_future(later())


async def test_pipeline_sends_ahead_of_acks_and_checkpoints_only_acked_batches(
    backend: Backend,
) -> None:
    log, db = backend
    t = Gated()
    last = await fill(log, 30)
    async with Relay(log, db, t, partitions=2, batch_size=10, pipeline=2) as relay:
        await until(lambda: t.sends == 2)
        await asyncio.sleep(0.05)  # a relay ignoring its pipeline bound would send more now
        assert t.sends == 2
        assert t.published == 20  # two batches on the broker, neither acknowledged
        assert relay.checkpoint == 0
        assert (await relay_status(db, log)).checkpoint == 0
        t.release.set()
        assert await relay.wait_published(last, 20)
    assert t.sends == 3
    envs = kept(t, 2)
    assert len(envs) == 30
    check_stream_order(envs)


async def test_a_slow_checkpoint_commit_does_not_stall_small_batches(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acknowledged batches wait for their checkpoint in the background, bounded by
    ``pipeline * batch_size`` events: a steady trickle of one-event batches keeps being
    published while a checkpoint commit is slow, up to that bound and no further."""
    log, db = backend
    gate = asyncio.Event()
    entered = asyncio.Event()
    original = Relay._commit

    async def slow_commit(self: Relay, epoch: int) -> None:
        # slow before its transaction opens: SQLite's log shares the file's write lock
        entered.set()
        await gate.wait()
        await original(self, epoch)

    monkeypatch.setattr(Relay, "_commit", slow_commit)
    t = InMemoryTransport(dedup_window=None)
    relay = Relay(log, db, t, partitions=2, batch_size=4, pipeline=2, poll_interval=0.05)
    try:
        await relay.start()
        await fill(log, 1)
        await asyncio.wait_for(entered.wait(), 20)  # the first checkpoint commit hangs
        # one event at a time: each is a batch of its own; before, the relay stopped
        # after `pipeline` (2) acknowledged batches waited for their checkpoint
        for i in range(1, 8):
            await fill(log, 1, start=i)
            await until(lambda i=i: sum(len(t.messages(p)) for p in range(2)) == i + 1)
        # the bound: 8 events (pipeline * batch_size) wait for their checkpoint now
        heads = 0
        head = log.head

        async def counted_head() -> int:
            nonlocal heads
            heads += 1
            return int(await head())

        monkeypatch.setattr(log, "head", counted_head)
        last = await fill(log, 4, start=8)
        await asyncio.sleep(0.2)  # a relay ignoring the bound would publish them now
        assert sum(len(t.messages(p)) for p in range(2)) == 8
        # waiting at the bound, it waits for the commit, not in a loop of wake-up checks
        # (it spun on head() while new events were pending: ~20,000 calls in 0.5 s)
        assert heads < 20
        assert relay.checkpoint == 0
        gate.set()
        assert await relay.wait_published(last, 20)
    finally:
        gate.set()
        await relay.stop()
    envs = kept(t, 2)
    assert len(envs) == 12
    check_stream_order(envs)


async def test_lost_acks_with_batches_in_flight_republish_in_order(backend: Backend) -> None:
    log, db = backend
    t = InMemoryTransport(dedup_window=None)
    t.lose_acks(2)  # the first two batches are stored but their acks never come
    last = await fill(log, 40)
    async with Relay(log, db, t, partitions=3, batch_size=10, pipeline=3, max_backoff=0.05) as r:
        assert await r.wait_published(last, 20)
        assert r.outages >= 1
    raw = [e for p in range(3) for e in t.messages(p)]
    assert len(raw) > 40  # batches in flight when the ack was lost went out again
    envs = kept(t, 3)  # asserts each partition's first copies are gap-free
    assert len(envs) == 40
    by_seq = {(e.partition, e.sequence): e.message_id for e in envs}
    assert all(by_seq[(e.partition, e.sequence)] == e.message_id for e in raw)
    check_stream_order(envs)


async def test_pipeline_must_be_positive(backend: Backend) -> None:
    log, db = backend
    with pytest.raises(ConfigurationError, match="pipeline"):
        Relay(log, db, InMemoryTransport(), pipeline=0)
