"""P7: broker consumers (see shared PERFORMANCE.md), NATS JetStream unless said otherwise.

P7a  one Consumer applying batches from NATS into a SQLite read model vs a hand-written
     consumer on the same client (nats-py pull consumer) doing the same batched writes: per
     batch of 500, decode each event with the same serializer, one upsert per event, store
     the last sequence, commit, ack each message. Ratio = throughput / baseline's (higher
     is better), interleaved rounds, fresh read database per round.
P7s  scale-out: 1, 2 and 4 worker processes over 8 partitions on a latency-bound read model
     (PostgreSQL whose every write transaction takes ``--delay`` more seconds to commit),
     for broker consumers and for the partitioned log projector; events per second to drain
     a backlog published once the workers hold their partitions.
P7l  commit -> visible in a broker-fed read model at a steady command rate (default 1,000
     commands/s), in one process: mediator + SQLite event log + relay + consumer into a
     separate SQLite read database; "visible" = the consumer committed the event's
     partition past its position (measured after each consumer commit). p50/p99/max,
     for NATS, Redis and RabbitMQ.
P7m  peak RSS of a consumer process catching up on a backlog of N messages (two or more
     sizes: flat means bounded).

Run: ``python benchmarks/consumer.py [--only a,s,l,m] [--pg DSN] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from _harness import HEADER, Result

from cqrskit import Command, Event, Mediator, Registry
from cqrskit.eventlog import StoredEvent, UnitOfWork
from cqrskit.messaging import Consumer, Envelope, Relay, Source, Transport, partition_of
from cqrskit.projections import Projection, ProjectionContext
from cqrskit.serialization import EventTypes, JsonSerializer
from cqrskit.sqlite import SqliteEventStore, SqliteReadDatabase

NATS = "nats://127.0.0.1:4222"
REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class Deposited(Event):
    account: str
    amount: int


@dataclass(frozen=True, slots=True)
class Deposit(Command[None]):
    account: str
    amount: int


types = EventTypes()
types.register(Deposited, "bench.deposited")
serializer = JsonSerializer(types)

UPSERT = (
    "INSERT INTO {t} (id, balance) VALUES (?, ?) "
    "ON CONFLICT (id) DO UPDATE SET balance = {t}.balance + excluded.balance"
)

balances = Projection(
    "balances",
    tables={"accounts": ("CREATE TABLE {accounts} (id TEXT PRIMARY KEY, balance BIGINT)",)},
)


@balances.on
async def deposited(e: Deposited, ctx: ProjectionContext) -> None:
    table = ctx.table("accounts")
    await ctx.execute(UPSERT.format(t=table), e.account, e.amount)


def events(count: int, accounts: int = 100, start: int = 1) -> list[StoredEvent]:
    versions: dict[str, int] = {}
    out = []
    tag = uuid.uuid4().hex[:8]
    for i in range(start, start + count):
        stream = f"acct-{i % accounts}"
        versions[stream] = versions.get(stream, 0) + 1
        data = json.dumps({"account": stream, "amount": 1})
        md = {"message_id": f"{tag}-{i}", "timestamp": "2026-01-01T00:00:00+00:00"}
        out.append(StoredEvent(i, stream, versions[stream], "bench.deposited", 1, data, md))
    return out


def numbered(stored: list[StoredEvent], partitions: int) -> list[Envelope]:
    seqs: dict[int, int] = {}
    out = []
    for e in stored:
        p = partition_of(e.stream, partitions)
        seqs[p] = seqs.get(p, 0) + 1
        out.append(Envelope.from_stored(e, p, partitions, seqs[p]))
    return out


async def publish(transport: Transport, envs: list[Envelope], chunk: int = 2000) -> None:
    for i in range(0, len(envs), chunk):
        part = envs[i : i + chunk]
        assert await transport.publish(part) == [None] * len(part)


async def drop_stream(stream: str) -> None:
    import nats

    nc = await nats.connect(NATS)
    try:
        await nc.jetstream().delete_stream(stream)
    except Exception:
        pass
    finally:
        await nc.close()


# -- P7a -------------------------------------------------------------------------------------


async def consumer_round(name: str, count: int, tmp: Path) -> float:
    from cqrskit.nats import NatsSource

    db = SqliteReadDatabase(str(tmp / f"c-{uuid.uuid4().hex[:6]}.db"))
    source = NatsSource(NATS, stream=name.upper(), subject_prefix=name)
    c = Consumer(source, db, [balances], serializer, partitions=1, batch_size=500,
                 owner=uuid.uuid4().hex)  # fmt: skip
    start = time.perf_counter()
    async with c:
        while c.counts.get("applied", 0) < count:
            await c.signal.wait(1.0)
        took = time.perf_counter() - start  # everything applied (stopping is not counted)
    await source.close()
    await db.close()
    return took


async def hand_round(name: str, count: int, tmp: Path) -> float:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    conn = sqlite3.connect(str(tmp / f"h-{uuid.uuid4().hex[:6]}.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE accounts (id TEXT PRIMARY KEY, balance BIGINT)")
    conn.execute("CREATE TABLE checkpoint (id INTEGER PRIMARY KEY, sequence BIGINT)")
    conn.execute("INSERT INTO checkpoint VALUES (1, 0)")
    upsert = UPSERT.format(t='"accounts"')
    start = time.perf_counter()
    nc = await nats.connect(NATS)
    js = nc.jetstream()
    durable = f"hand_{uuid.uuid4().hex[:8]}"
    await js.add_consumer(
        name.upper(),
        ConsumerConfig(durable_name=durable, deliver_policy=DeliverPolicy.ALL,
                       ack_policy=AckPolicy.EXPLICIT, max_ack_pending=10_000,
                       filter_subject=f"{name}.0"),
    )  # fmt: skip
    sub = await js.pull_subscribe_bind(durable=durable, stream=name.upper())
    done = 0
    decode = serializer.decode_stored
    while done < count:
        msgs = await sub.fetch(500, timeout=5)
        conn.execute("BEGIN IMMEDIATE")
        seq = 0
        for m in msgs:
            h = m.headers or {}
            seq = int(h["cqrskit-sequence"])
            stored = StoredEvent(int(h["cqrskit-position"]), h["cqrskit-stream"],
                                 int(h["cqrskit-version"]), h["cqrskit-type"], 1,
                                 m.data.decode())  # fmt: skip
            e = decode(stored)
            assert isinstance(e, Deposited)
            conn.execute(upsert, (e.account, e.amount))
        conn.execute("UPDATE checkpoint SET sequence = ? WHERE id = 1", (seq,))
        conn.execute("COMMIT")
        for m in msgs:
            await m.ack()
        done += len(msgs)
    took = time.perf_counter() - start  # everything applied
    await js.delete_consumer(name.upper(), durable)
    await nc.close()
    conn.close()
    return took


async def p7a(tmp: Path, count: int, rounds: int) -> Result:
    from cqrskit.nats import NatsTransport

    name = f"bench_{uuid.uuid4().hex[:8]}"
    t = NatsTransport(NATS, stream=name.upper(), subject_prefix=name)
    await publish(t, numbered(events(count), 1))
    await t.close()
    r = Result("P7a", f"NATS -> SQLite, {count:,} events, batch 500", "≥ 0.8×",
               higher_is_better=True)  # fmt: skip
    try:
        await consumer_round(name, count, tmp)  # warm up
        for i in range(rounds):
            pair = [("b", hand_round), ("c", consumer_round)]
            if i % 2:
                pair.reverse()
            took = {k: await fn(name, count, tmp) for k, fn in pair}
            b_ns, c_ns = took["b"] / count * 1e9, took["c"] / count * 1e9
            r.baseline_ns.append(b_ns)
            r.candidate_ns.append(c_ns)
            r.ratios.append(b_ns / c_ns)  # throughput ratio
    finally:
        await drop_stream(name.upper())
    return r


# -- P7s -------------------------------------------------------------------------------------


def spawn(*args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), str(HERE)])
    return subprocess.Popen(
        [sys.executable, str(HERE / "_consumer_worker.py"), *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def scale_point(
    kind: str, workers: int, dsn: str, count: int, delay: float, tmp: Path
) -> float:
    import asyncpg

    from cqrskit.postgres import PostgresReadDatabase
    from cqrskit.projections.partitions import partition_status

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    name = f"bench_{uuid.uuid4().hex[:8]}"
    n = 8
    log_path = str(tmp / f"log-{uuid.uuid4().hex[:6]}.db")
    store = SqliteEventStore(log_path, encoder=serializer.encode)
    db = PostgresReadDatabase(dsn, schema=schema)
    procs = []
    t: Any = None
    try:
        if kind == "consumer":
            from cqrskit.nats import NatsTransport

            t = NatsTransport(NATS, stream=name.upper(), subject_prefix=name)
            await publish(t, numbered(events(1, start=1), n))  # creates the stream
        for w in range(workers):
            args = (
                ("consumer", NATS, name, str(n), dsn, schema, str(delay), f"w{w}")
                if kind == "consumer"
                else ("projector", log_path, str(n), dsn, schema, str(delay), f"w{w}")
            )
            procs.append(spawn(*args))
        deadline = time.monotonic() + 60
        while True:  # every worker holds its share before the backlog arrives
            try:
                rows = await partition_status(db, "balances")
            except Exception:
                rows = []
            owners = {r.owner for r in rows}
            if rows and None not in owners and len(owners) == workers:
                break
            assert time.monotonic() < deadline, "workers did not start"
            await asyncio.sleep(0.1)
        start = time.perf_counter()
        if kind == "consumer":
            stored = events(count, start=2)
            envs = numbered(events(1, start=1) + stored, n)[1:]
            await publish(t, envs)
            target = count + 1
        else:
            uow = await store.begin()
            for e in events(count):
                uow.record(e.stream, Deposited(e.stream, 1))
            await uow.commit()
            target = count
        while True:
            rows = await partition_status(db, "balances", store if kind != "consumer" else None)
            if kind == "consumer":
                if sum(r.sequence for r in rows) >= target:
                    break
            elif all(r.lag_events == 0 for r in rows) and rows:
                break
            await asyncio.sleep(0.02)
        took = time.perf_counter() - start
        return count / took
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        if t is not None:
            await t.close()
            await drop_stream(name.upper())
        await db.close()
        store.close()
        conn = await asyncpg.connect(dsn)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


# -- P7l -------------------------------------------------------------------------------------


def transport_and_source(broker: str, name: str) -> tuple[Transport, Source]:
    if broker == "nats":
        from cqrskit.nats import NatsSource, NatsTransport

        return (NatsTransport(NATS, stream=name.upper(), subject_prefix=name),
                NatsSource(NATS, stream=name.upper(), subject_prefix=name))  # fmt: skip
    if broker == "redis":
        from cqrskit.redis import RedisSource, RedisTransport

        prefix = name.replace("_", ":")
        return RedisTransport(REDIS, key_prefix=prefix), RedisSource(REDIS, key_prefix=prefix)
    from cqrskit.rabbitmq import RabbitMQSource, RabbitMQTransport

    return RabbitMQTransport(AMQP, exchange=name), RabbitMQSource(AMQP, exchange=name)


async def cleanup(broker: str, name: str, partitions: int) -> None:
    if broker == "nats":
        await drop_stream(name.upper())
    elif broker == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(REDIS)
        await client.delete(*[f"{name.replace('_', ':')}:{p}" for p in range(partitions)])
        await client.aclose()
    else:
        import aio_pika

        conn = await aio_pika.connect(AMQP)
        ch = await conn.channel()
        for p in range(partitions):
            await ch.queue_delete(f"{name}.{p}")
        await ch.exchange_delete(name)
        await conn.close()


async def p7l(broker: str, tmp: Path, rate: int, seconds: float) -> list[float]:
    """Writer, mediator and relay in this process (the application); the consumer in a
    process of its own, which records when each partition's position became visible."""
    n = 4
    name = f"bench_{uuid.uuid4().hex[:8]}"
    d = tmp / uuid.uuid4().hex[:6]
    d.mkdir()
    store = SqliteEventStore(d / "write.db", encoder=serializer.encode)
    state = SqliteReadDatabase(str(d / "write.db"))
    transport, _source = transport_and_source(broker, name)
    await _source.close()
    registry = Registry()

    @registry.handler
    async def deposit(cmd: Deposit, uow: UnitOfWork) -> None:
        uow.record(cmd.account, Deposited(cmd.account, cmd.amount))

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=[store.resolver()])
    relay = Relay(store, state, transport, partitions=n, batch_size=200, poll_interval=0.2)
    commits: list[tuple[int, int, float]] = []
    published: list[tuple[int, float]] = []

    async def watch_relay() -> None:
        while True:
            await relay.signal.wait(0.05)
            published.append((relay.checkpoint, time.monotonic()))

    async def one(i: int, record: bool) -> None:
        account = f"acct-{i % 64}"
        receipt = await mediator.send_tracked(Deposit(account, 1))
        assert receipt.token is not None
        if record:
            commits.append((partition_of(account, n), receipt.token, time.monotonic()))

    await relay.start()
    relay_watch = asyncio.create_task(watch_relay())
    for i in range(n * 16):  # every destination exists before the consumer subscribes
        await one(i, False)
    assert await relay.wait_published(await store.head(), 30)
    out = d / "visible.txt"
    proc = spawn("visible", broker, name, str(n), str(d / "read.db"), str(out))
    try:
        warm_deadline = time.monotonic() + 60
        while True:  # the consumer caught up with the warm-up commands
            try:
                async with SqliteReadDatabase(str(d / "read.db")).read_only() as s:
                    got = await s.fetchval("SELECT count(*) FROM accounts")
            except Exception:
                got = 0
            if got and int(got) >= 64:
                break
            assert time.monotonic() < warm_deadline, "the consumer did not start"
            await asyncio.sleep(0.05)
        total = int(rate * seconds)
        start = time.perf_counter()
        tasks = []
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, True)))
        await asyncio.gather(*tasks)
        assert await relay.wait_published(await store.head(), 60)
        await asyncio.sleep(1.0)  # let the consumer apply the tail before it is stopped
    finally:
        relay_watch.cancel()
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        await relay.stop()
        await transport.close()
        await state.close()
        store.close()
        await cleanup(broker, name, n)
    marks: dict[int, list[tuple[int, float]]] = {}
    for line in out.read_text().splitlines():
        p, position, t = line.split()
        marks.setdefault(int(p), []).append((int(position), float(t)))
    latencies, acked = [], []
    for p, token, t0 in commits:
        seen = next((t for position, t in marks.get(p, []) if position >= token), None)
        assert seen is not None, f"position {token} of partition {p} never became visible"
        latencies.append((seen - t0) * 1e6)
        sent = next((t for position, t in published if position >= token), None)
        if sent is not None:
            acked.append((sent - t0) * 1e6)
    RELAY_LAG[broker] = acked
    return latencies


RELAY_LAG: dict[str, list[float]] = {}


# -- P7m -------------------------------------------------------------------------------------


async def p7m(tmp: Path, count: int) -> int:
    from cqrskit.nats import NatsTransport

    name = f"bench_{uuid.uuid4().hex[:8]}"
    t = NatsTransport(NATS, stream=name.upper(), subject_prefix=name)
    try:
        for i in range(0, count, 20_000):  # one partition, sequences continuing
            stored = events(min(20_000, count - i), start=i + 1)
            await publish(
                t, [Envelope.from_stored(e, 0, 1, i + k + 1) for k, e in enumerate(stored)]
            )
        await t.close()
        read = str(tmp / f"m-{uuid.uuid4().hex[:6]}.db")
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(HERE / "_consumer_worker.py"), "memory", NATS, name, "1",
             read, str(count)],
            capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip().splitlines()[-1])
    finally:
        await drop_stream(name.upper())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="a,s,l,m")
    parser.add_argument("--events", type=int, default=20_000, help="P7a events per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg", metavar="DSN", default="postgresql://postgres@127.0.0.1/test")
    parser.add_argument("--scale-events", type=int, default=8_000)
    parser.add_argument("--delay", type=float, default=0.05, help="P7s extra commit latency")
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--brokers", default="nats,redis,rabbitmq")
    parser.add_argument("--memory", default="50000,200000", help="P7m backlog sizes")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    only = set(args.only.split(","))
    out: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="cqrskit-bench-"))
    print(f"Python {sys.version.split()[0]} on {sys.platform}, {os.cpu_count()} CPUs")
    if "a" in only:
        r = await p7a(tmp, args.events, args.rounds)
        print("\n### P7a: broker consumer vs hand-written consumer (throughput ratio)\n")
        print(HEADER)
        print(r.row())
        out["P7a"] = {"ratio": r.ratio, "ratios": r.ratios,
                      "baseline_ns": r.baseline_ns, "candidate_ns": r.candidate_ns}  # fmt: skip
    if "s" in only:
        print(f"\n### P7s: scale-out, 8 partitions, +{args.delay * 1000:.0f} ms per commit, "
              f"{args.scale_events:,} events\n")  # fmt: skip
        print("| workers | broker consumers (events/s) | partitioned log projector (events/s) |")
        print("|---|---|---|")
        curve: dict[str, dict[int, float]] = {"consumer": {}, "projector": {}}
        for w in (1, 2, 4):
            for kind in ("consumer", "projector"):
                curve[kind][w] = await scale_point(kind, w, args.pg, args.scale_events,
                                                   args.delay, tmp)  # fmt: skip
            print(f"| {w} | {curve['consumer'][w]:,.0f} | {curve['projector'][w]:,.0f} |")
        out["P7s"] = curve
    if "l" in only:
        print(f"\n### P7l: commit -> visible at {args.rate:,} commands/s "
              f"({args.seconds:g} s measured, in one process, SQLite)\n")  # fmt: skip
        print(
            "| broker | p50 µs | p99 µs | max µs | samples | of which commit -> broker-acked "
            "p50 / p99 µs |\n|---|---|---|---|---|---|"
        )
        out["P7l"] = {}
        for broker in args.brokers.split(","):
            lat = await p7l(broker, tmp, args.rate, args.seconds)
            relay_lag = RELAY_LAG[broker]
            print(f"| {broker} | {pct(lat, 0.5):,.0f} | {pct(lat, 0.99):,.0f} | "
                  f"{max(lat):,.0f} | {len(lat)} | {pct(relay_lag, 0.5):,.0f} / "
                  f"{pct(relay_lag, 0.99):,.0f} |")  # fmt: skip
            out["P7l"][broker] = {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "n": len(lat)}
    if "m" in only:
        print("\n### P7m: consumer process peak RSS over a NATS backlog\n")
        print("| messages | peak RSS (MiB) |\n|---|---|")
        out["P7m"] = {}
        for size in (int(x) for x in args.memory.split(",")):
            rss = await p7m(tmp, size)
            print(f"| {size:,} | {rss / 1024:,.1f} |")
            out["P7m"][size] = rss
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:  # noqa: ASYNC230 - once, at the end
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    asyncio.run(main())
