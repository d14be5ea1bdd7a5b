"""The broker consumer on the in-memory broker, with the read model on SQLite and PostgreSQL:
effectively once, duplicates, gaps, bad messages parked and retried, partitions and
takeover, consistency tokens, event handlers with an inbox."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from tests.support.bank import POISON_FLAG, Deposited, Unrelated, balances, serializer

from cqrskit import Mediator, Metadata, Registry
from cqrskit.eventlog import StoredEvent
from cqrskit.messaging import (
    Consumer,
    Envelope,
    EventHandlers,
    HmacSigner,
    InMemoryTransport,
    Relay,
    partition_of,
)
from cqrskit.projections import ReadDatabase, dead_letters, request_retry
from cqrskit.projections.partitions import partition_status, token_positions

N = 4
KEY = HmacSigner({"k1": b"0123456789abcdef0123456789abcdef"})


async def until(check: Any, timeout: float = 30.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert loop.time() < deadline, f"{what} not met within {timeout}s"
        await asyncio.sleep(0.01)


async def accounts(db: ReadDatabase) -> dict[str, tuple[int, int, int]]:
    async with db.read_only() as s:
        rows = await s.fetchall("SELECT id, balance, applied, last_version FROM accounts")
    return {str(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows}


async def order_errors(db: ReadDatabase) -> int:
    async with db.read_only() as s:
        return int(await s.fetchval("SELECT count(*) FROM order_errors"))


def expected(log: list[StoredEvent]) -> dict[str, tuple[int, int, int]]:
    out: dict[str, tuple[int, int, int]] = {}
    for e in log:
        if e.type != "bank.deposited":
            continue
        amount = json.loads(e.data)["amount"]
        b, n, _v = out.get(e.stream, (0, 0, 0))
        out[e.stream] = (b + amount, n + 1, e.version)
    return out


def consumer(transport: InMemoryTransport, db: ReadDatabase, **kw: Any) -> Consumer:
    options: dict[str, Any] = {"partitions": N, "batch_size": 20, "lease_ttl": 0.6}
    options.update(kw)
    return Consumer(transport.source(), db, [balances], serializer, **options)


async def write(log: Any, count: int, streams: int = 8) -> list[StoredEvent]:
    out: list[StoredEvent] = []
    for i in range(count):
        out += await log.append(f"acct-{i % streams}", Deposited(f"acct-{i % streams}", i + 1))
    return out


async def test_events_reach_the_read_model_once_in_order(backend: Any) -> None:
    log, db = backend
    transport = InMemoryTransport(dedup_window=None)
    events = await write(log, 120)
    async with Relay(log, db, transport, partitions=N, batch_size=50) as relay:
        assert await relay.wait_published(events[-1].position, 30)
    async with consumer(transport, db) as c:
        await until(lambda: accounts_match(db, events), what="read model caught up")
        # a republished batch (the relay's at-least-once) is dropped by sequence
        copies = {p: transport.wire(p)[:7] for p in range(N)}
        for p, wire in copies.items():
            for headers, body in wire:
                transport.inject(p, headers, body)
        dups = sum(len(w) for w in copies.values())
        await until(lambda: c.counts.get("duplicates", 0) == dups, what="duplicates seen")
        assert await accounts(db) == expected(events)
        status = await partition_status(db, "balances", log)
    assert await order_errors(db) == 0
    assert [s.partition for s in status] == list(range(N))
    assert all(s.lag_events == 0 and s.gap_sequence is None for s in status)
    held = {p: len(transport.messages(p)) for p in range(N)}
    assert sum(held.values()) == len(events) + dups
    assert [s.sequence for s in status] == [held[p] - len(copies[p]) for p in range(N)]
    assert c.counts.get("applied") == len(events)


async def accounts_match(db: ReadDatabase, events: list[StoredEvent]) -> bool:
    try:
        return await accounts(db) == expected(events)
    except Exception:
        return False


def _envelope(stored: StoredEvent, sequence: int, *, partitions: int = N) -> Envelope:
    return Envelope.from_stored(
        stored, partition_of(stored.stream, partitions), partitions, sequence
    )


def _stored(
    position: int, stream: str, version: int, amount: int, type_: str = "bank.deposited"
) -> StoredEvent:
    data = json.dumps({"account": stream, "amount": amount})
    return StoredEvent(position, stream, version, type_, 1, data, {"message_id": f"m-{position}"})


async def test_a_gap_holds_the_partition_until_the_message_comes(backend: Any) -> None:
    _log, db = backend
    transport = InMemoryTransport(dedup_window=None)
    stream = "acct-gap"
    p = partition_of(stream, N)
    e1, e2, e3 = (_stored(i, stream, i, 10 * i) for i in (1, 2, 3))
    for env in (_envelope(e1, 1), _envelope(e3, 3)):
        transport.inject(p, env.headers(), env.payload)
    async with consumer(transport, db) as c:
        await until(lambda: c.gaps == 1, what="gap reported")

        async def gap_in_status() -> bool:
            rows = await partition_status(db, "balances")
            return rows[p].gap_sequence == 2 and rows[p].sequence == 1

        await until(gap_in_status, what="gap in status")
        assert (await accounts(db))[stream] == (10, 1, 1)  # 3 is not applied past the hole
        transport.inject(p, _envelope(e2, 2).headers(), _envelope(e2, 2).payload)
        await until(
            lambda: accounts_have(db, stream, (60, 3, 3)), what="gap closed and applied in order"
        )
        rows = await partition_status(db, "balances")
    assert rows[p].gap_sequence is None
    assert rows[p].sequence == 3
    assert await order_errors(db) == 0
    assert c.gaps == 1


async def accounts_have(db: ReadDatabase, stream: str, value: tuple[int, int, int]) -> bool:
    try:
        return (await accounts(db)).get(stream) == value
    except Exception:
        return False


async def test_bad_messages_are_parked_acked_and_retried(backend: Any, tmp_path: Path) -> None:
    _log, db = backend
    transport = InMemoryTransport(dedup_window=None)
    p = 0
    streams = [s for s in (f"s{i}" for i in range(200)) if partition_of(s, N) == p][:5]
    a, b, c_, d, e = streams
    dest = transport.destination(p)

    def signed(stored: StoredEvent, seq: int) -> Envelope:
        return _envelope(stored, seq).signed(KEY, dest)

    good1 = signed(_stored(1, a, 1, 5), 1)
    transport.inject(p, good1.headers(), good1.payload)
    transport.inject(p, {"content-type": "text/plain"}, b"hello")  # not an envelope
    junk: dict[Any, Any] = {b"\xff\xfe": b"x", **good1.headers()}
    transport.inject(p, junk, good1.payload)  # a header name that is not UTF-8
    forged = _envelope(_stored(2, b, 1, 1_000_000), 2)  # unsigned: claims sequence 2
    transport.inject(p, forged.headers(), forged.payload)
    tampered = signed(_stored(2, b, 1, 7), 2)
    transport.inject(p, tampered.headers(), b'{"account": "x", "amount": 999}')
    real2 = signed(_stored(2, b, 1, 7), 2)  # the real sequence 2 still applies
    transport.inject(p, real2.headers(), real2.payload)
    bad_json = replace(_envelope(_stored(3, c_, 1, 0), 3), payload=b'{"account": ').signed(
        KEY, dest
    )
    transport.inject(p, bad_json.headers(), bad_json.payload)  # signed, undecodable
    flag = tmp_path / "poison"
    flag.write_text("on")
    os.environ[POISON_FLAG] = str(flag)
    try:
        poison = signed(
            StoredEvent(
                4, d, 1, "bank.poison", 1, json.dumps({"account": d}), {"message_id": "p4"}
            ),
            4,
        )
        after_poison = signed(_stored(5, d, 2, 3), 5)  # held behind the poison event
        unknown = signed(_stored(6, e, 1, 1, type_="bank.from_the_future"), 6)
        big = signed(StoredEvent(7, e, 2, "bank.deposited", 1, "x" * 5000, {"message_id": "m7"}), 7)
        other = signed(_stored(8, a, 2, 11), 8)
        for env in (poison, after_poison, unknown, big, other):
            transport.inject(p, env.headers(), env.payload)
        backwards = signed(_stored(9, a, 3, 13), 2)  # a new event under an old number
        transport.inject(p, backwards.headers(), backwards.payload)
        async with consumer(transport, db, verifier=KEY, max_bytes=4000) as c:
            await until(lambda: accounts_have(db, a, (16, 2, 2)), what="a applied")
            letters = await dead_letters(db, "balances")
            reasons = {(x.stream, x.version): x.error for x in letters if x.position > 0}
            rejected = [x.error for x in letters if x.position < 0]
            assert len(rejected) == 4, rejected
            assert any("not a cqrskit envelope" in r for r in rejected)
            assert any("UnicodeDecodeError" in r for r in rejected)
            assert sum("signature" in r for r in rejected) == 2
            assert "cannot apply poison" in reasons[(d, 1)]
            assert "earlier event" in reasons[(d, 2)]
            assert "unknown event type" in reasons[(e, 1)]
            assert "exceeds max_bytes" in reasons[(e, 2)]
            assert "JSON" in reasons[(c_, 1)] or "decode" in reasons[(c_, 1)].lower()
            assert "went backwards" in reasons[(a, 3)]
            got = await accounts(db)
            assert got[b] == (7, 1, 1)  # the forged and the tampered copies changed nothing
            assert d not in got
            flag.unlink()  # "the bug is fixed"
            assert await request_retry(db, "balances", stream=d) == 2
            await until(lambda: accounts_have(db, d, (3, 2, 2)), what="poison retried")
            left = await dead_letters(db, "balances")
        assert {(x.stream, x.version) for x in left if x.position > 0} == {
            (e, 1),
            (e, 2),
            (a, 3),
            (c_, 1),
        }
        assert await order_errors(db) == 0
        assert c.counts.get("rejected") == 4
    finally:
        os.environ.pop(POISON_FLAG, None)


async def test_workers_share_partitions_and_take_over(backend: Any) -> None:
    log, db = backend
    transport = InMemoryTransport(dedup_window=None)
    relay = Relay(log, db, transport, partitions=N, batch_size=25, poll_interval=0.05)
    await relay.start()
    a = consumer(transport, db, owner="worker-a", lease_ttl=0.5)
    b = consumer(transport, db, owner="worker-b", lease_ttl=0.5)
    try:
        await a.start()
        events = await write(log, 40)
        await until(lambda: len(a.owned("balances")) == N, what="a holds every partition")
        await b.start()
        await until(
            lambda: len(a.owned("balances")) == 2 and len(b.owned("balances")) == 2,
            what="fair shares",
        )
        events += await write(log, 40)
        await a.stop()  # graceful: its partitions are released at once
        await until(lambda: len(b.owned("balances")) == N, timeout=5, what="b took over")
        events += await write(log, 40)
        await until(lambda: accounts_match(db, events), what="all applied")
        rows = await partition_status(db, "balances", log)
        assert {r.owner for r in rows} == {"worker-b"}
    finally:
        await a.stop()
        await b.stop()
        await relay.stop()
    assert await order_errors(db) == 0


async def test_consistency_positions_follow_the_partitions(backend: Any) -> None:
    log, db = backend
    transport = InMemoryTransport(dedup_window=None)
    events = await write(log, 12, streams=3)
    async with Relay(log, db, transport, partitions=N, batch_size=50) as relay:
        assert await relay.wait_published(events[-1].position, 30)
    token = events[-1].position
    async with consumer(transport, db) as _c:
        await until(lambda: accounts_match(db, events), what="caught up")
        async with db.read_only() as s:
            assert await token_positions(s, log, ["balances"], token) == {"balances": token}
    more = await log.append("acct-0", Deposited("acct-0", 1))
    async with db.read_only() as s:  # written, not consumed: behind
        got = await token_positions(s, log, ["balances"], more[-1].position)
    assert got["balances"] < more[-1].position


async def test_event_handlers_run_at_least_once_with_an_inbox(backend: Any) -> None:
    log, db = backend
    transport = InMemoryTransport(dedup_window=None)
    calls: list[Any] = []
    fail = {"left": 2}

    async def publish(event: Any) -> None:
        if isinstance(event, Unrelated) and fail["left"]:
            fail["left"] -= 1
            raise ConnectionError("smtp down")
        calls.append(event)

    events = await write(log, 10, streams=2)
    events += await log.append("note-1", Unrelated("hello"))
    async with Relay(log, db, transport, partitions=N, batch_size=50) as relay:
        assert await relay.wait_published(events[-1].position, 30)
    # a copy of every message, as after a relay restart
    for p in range(N):
        for headers, body in transport.wire(p):
            transport.inject(p, headers, body)
    mailer = EventHandlers("mailer", publish)
    async with Consumer(transport.source(), db, [mailer], serializer, partitions=N) as c:
        await until(lambda: len(calls) == len(events), what="handled")
        await until(lambda: c.counts.get("duplicates", 0) == len(events), what="copies seen")
    assert sorted(x.amount for x in calls if isinstance(x, Deposited)) == list(range(1, 11))
    async with db.read_only() as s:
        inbox = await s.fetchval("SELECT count(*) FROM cqrskit_inbox WHERE consumer = 'mailer'")
    assert int(inbox) == len(events)
    assert not await dead_letters(db, "mailer")


async def test_event_handlers_from_a_registry_see_the_events_lineage(backend: Any) -> None:
    log, db = backend
    transport = InMemoryTransport(dedup_window=None)
    seen: list[tuple[int, str | None, str]] = []
    registry = Registry()

    @registry.handler
    async def on_deposit(e: Deposited, metadata: Metadata) -> None:
        seen.append((e.amount, metadata.causation_id, metadata.correlation_id))

    events = await write(log, 6, streams=2)
    async with Relay(log, db, transport, partitions=N, batch_size=50) as relay:
        assert await relay.wait_published(events[-1].position, 30)
    mailer = EventHandlers("mailer2", Mediator(registry))
    async with Consumer(transport.source(), db, [mailer], serializer, partitions=N):
        await until(lambda: len(seen) == len(events), what="handled")
    by_amount = {amount: (cause, corr) for amount, cause, corr in seen}
    for stored in events:
        amount = json.loads(stored.data)["amount"]
        cause, corr = by_amount[amount]
        assert cause == stored.metadata["message_id"]  # the handler's idempotency key
        assert corr == (stored.metadata.get("correlation_id") or corr)
