"""P6: the outbox relay against the broker client's own pipelined publish, and relay lag.

**P6 throughput.** Each round appends ``--events`` fresh events (64 streams, 4 partitions,
a ~300-byte JSON payload) to the event log, untimed. Then, interleaved A B A B:

* baseline: the broker's own client publishes the wire form of those same events (the
  same headers and payload bytes, built before the clock starts) with the same
  acknowledgement guarantee as the transport: NATS ``publish_async`` with at most 4,000
  acks outstanding, then every ``PubAck`` awaited; Redis ``XADD`` in pipelines of
  ``--batch`` entries (no MULTI), each reply read; RabbitMQ persistent ``mandatory``
  publishes with publisher confirms into quorum queues, 1,000 confirms outstanding;
* candidate: a :class:`~cqrskit.messaging.Relay` is started on the log and timed until its
  checkpoint reaches the head: reading from the log, building and numbering envelopes,
  publishing through the transport, waiting for the acks and committing the checkpoint
  and sequence counters, start-up and lease included.

Both publish into their own stream / keys / exchange of the same shape, purged between
rounds. The ratio is the median of the per-round throughput ratios (relay / client).

**P6 lag.** A writer process commits one event per command at a steady ``--rate`` per
second (open loop, 16 connections, ``notify=True``) to PostgreSQL for ``--lag-seconds``;
a relay in this process (``LISTEN``) publishes them. Lag = the time the relay's
``transport.publish`` call returned with the event acknowledged, minus the time the
writer's ``commit()`` returned (both ``time.monotonic_ns``, CLOCK_MONOTONIC, one clock for
every process of the machine). Also shown from the start of the writer's ``commit()``
call. The first second is left out (warm-up).

    python benchmarks/relay.py [--brokers nats,redis,rabbitmq] [--store postgres|sqlite]
        [--rounds 7] [--events 20000] [--lag-seconds 15] [--rate 1000] [--no-lag]
        [--json FILE] [--pg DSN]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cqrskit import Event
from cqrskit.eventlog import EventStore, StoredEvent
from cqrskit.messaging import Envelope, Relay, Transport
from cqrskit.messaging.partitioning import partition_of
from cqrskit.projections.db import ReadDatabase

PARTITIONS = 4
STREAMS = 64
NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PIPELINE = [2]  # the relay's pipeline (--pipeline)
NOTE = "x" * 160  # brings the JSON payload to ~300 bytes


@dataclass(frozen=True, slots=True)
class Deposited(Event):
    """The benchmark event."""

    account: str
    amount: int
    reference: str
    note: str


@dataclass
class Case:
    """Throughputs per round (messages/s) of a baseline and a candidate."""

    case: str
    what: str
    target: str
    baseline: list[float] = field(default_factory=list)
    candidate: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    baseline_cpu: list[float] = field(default_factory=list)  # µs of this process per message
    candidate_cpu: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Median per-round throughput ratio candidate / baseline."""
        return statistics.median(self.ratios)

    def row(self) -> str:
        """One markdown table row."""
        b, c = self.baseline, self.candidate
        return (
            f"| {self.case} | {self.what} | {statistics.median(b):,.0f} "
            f"({min(b):,.0f}–{max(b):,.0f}) | {statistics.median(c):,.0f} "
            f"({min(c):,.0f}–{max(c):,.0f}) | **{self.ratio:.2f}×** | {self.target} | "
            f"{statistics.median(self.baseline_cpu):.1f} / "
            f"{statistics.median(self.candidate_cpu):.1f} |"
        )


HEADER = (
    "| case | what | client msgs/s median (min–max) | relay msgs/s median (min–max) "
    "| throughput ratio | target | client / relay process CPU µs per msg |\n"
    "|---|---|---|---|---|---|---|"
)


@dataclass
class Lag:
    """Commit → broker-acked samples (milliseconds) of one lag run."""

    broker: str
    rate: float
    from_done: list[float]
    from_start: list[float]
    batches: list[int]
    to_read: list[float]  # commit done → first read by the relay (the log's visibility)
    read_to_ack: list[float]  # first read → acknowledged (the relay and the broker)
    retries: int = 0  # commands the writer retried after a ConcurrencyError

    def row(self) -> str:
        """One markdown table row."""

        def pct(xs: list[float], q: float) -> float:
            s = sorted(xs)
            return s[min(len(s) - 1, int(q * len(s)))]

        d, s, r, a = self.from_done, self.from_start, self.to_read, self.read_to_ack
        return (
            f"| {self.broker} | {self.rate:,.0f} | {len(d):,} | {pct(d, 0.5):.1f} | "
            f"**{pct(d, 0.99):.1f}** | {max(d):.1f} | {pct(s, 0.5):.1f} / {pct(s, 0.99):.1f} | "
            f"{pct(r, 0.5):.1f} / {pct(r, 0.99):.1f} | {pct(a, 0.5):.1f} / {pct(a, 0.99):.1f} | "
            f"{statistics.mean(self.batches):.1f} | {self.retries} | < 20 ms (p99) |"
        )


LAG_HEADER = (
    "| broker | commands/s achieved | samples | p50 ms | p99 ms | max ms "
    "| from commit start p50 / p99 ms | commit → read by the relay p50 / p99 ms "
    "| read → acked p50 / p99 ms | events per publish call | retried commands | target |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _write(path: str, data: Any) -> None:
    Path(path).write_text(json.dumps(data))


def _read(path: str) -> Any:
    return json.loads(Path(path).read_text())


def make_event(i: int) -> tuple[str, Deposited]:
    account = f"acct-{i % STREAMS}"
    return account, Deposited(account, i, uuid.uuid4().hex, NOTE)


# -- an own PostgreSQL cluster (--own-pg) -----------------------------------------------------


class OwnPostgres:
    """A PostgreSQL cluster of this benchmark's own (temp dir, free port, default durability
    settings), so other sessions of a shared server cannot hold back the event log's
    visibility horizon. Needs initdb/pg_ctl and, as root, the ``postgres`` user."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cqrskit-bench-pg-")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.data = os.path.join(self.dir, "data")

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *cmd], check=True, stdout=subprocess.DEVNULL)

    def start(self) -> str:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", self.data, "--no-sync", "-A", "trust", "-U", "postgres")
        with open(os.path.join(self.data, "postgresql.conf"), "a", encoding="utf-8") as f:
            f.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\nmax_connections = 200\n"
            )
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "pg.log"), "-w", "start")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


# -- event logs ------------------------------------------------------------------------------


class Log:
    """The event log and relay state database for one benchmark, and how to fill it."""

    def __init__(self, kind: str, dsn: str) -> None:
        self.kind = kind
        self.dsn = dsn
        self.schema = f"bench_relay_{uuid.uuid4().hex[:10]}"
        self.dir = tempfile.mkdtemp(prefix="cqrskit-bench-relay-")
        self.store: EventStore
        self.state: ReadDatabase
        self.counter = 0
        self.read_to = 0  # the last position fill() returned

    async def open(self, *, notify: bool = False) -> None:
        if self.kind == "postgres":
            from cqrskit.postgres import PostgresEventStore, PostgresReadDatabase

            self.store = await PostgresEventStore.open(
                self.dsn, schema=self.schema, notify=notify, max_size=4
            )
            self.state = PostgresReadDatabase(self.dsn, schema=self.schema)
        else:
            from cqrskit.sqlite import SqliteEventStore, SqliteReadDatabase

            path = os.path.join(self.dir, "log.db")
            self.store = SqliteEventStore(path)
            self.state = SqliteReadDatabase(path)

    async def fill(self, count: int) -> list[StoredEvent]:
        """Append ``count`` events, 500 per transaction; return them as stored."""
        for start in range(0, count, 500):
            uow = await self.store.begin()
            for _ in range(start, min(count, start + 500)):
                stream, event = make_event(self.counter)
                self.counter += 1
                uow.record(stream, event)
            await uow.commit()
        out: list[StoredEvent] = []
        while len(out) < count:
            got = await self.store.read_after(self.read_to, 2000)
            if not got:
                await asyncio.sleep(0.01)  # PostgreSQL: wait for the horizon to pass
                continue
            out.extend(got)
            self.read_to = got[-1].position
        return out

    async def close(self) -> None:
        await self.state.close()
        closing = self.store.close()
        if asyncio.iscoroutine(closing):
            await closing
        if self.kind == "postgres":
            import asyncpg

            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            finally:
                await conn.close()


def wire(events: Sequence[StoredEvent]) -> list[tuple[int, dict[str, str], bytes]]:
    """(partition, headers, body) of each event, as the relay would put it on the wire."""
    seqs: dict[int, int] = {}
    out = []
    for e in events:
        p = partition_of(e.stream, PARTITIONS)
        seqs[p] = seqs.get(p, 0) + 1
        env = Envelope.from_stored(e, p, PARTITIONS, seqs[p])
        out.append((p, env.headers(), env.payload))
    return out


# -- brokers: the client's own publish, the transport, purging ----------------------------


class Broker:
    """One broker: its raw-client baseline, a transport for the relay, and clean-up."""

    name = ""

    async def setup(self, tag: str) -> None: ...

    def transport(self) -> Transport:
        raise NotImplementedError

    async def baseline(self, msgs: list[tuple[int, dict[str, str], bytes]]) -> None: ...

    async def purge(self) -> None: ...

    async def publish_one(self, p: int, headers: dict[str, str], body: bytes) -> None:
        """Publish one message with the client alone; return once the broker acked it."""

    async def teardown(self) -> None: ...


class Nats(Broker):
    name = "nats"

    async def setup(self, tag: str) -> None:
        import nats

        self.base, self.relay = f"benchb_{tag}", f"benchr_{tag}"
        self.nc = await nats.connect(NATS_URL)
        self.js = self.nc.jetstream(publish_async_max_pending=4000)
        for name in (self.base, self.relay):
            await self.js.add_stream(
                name=name.upper(), subjects=[f"{name}.*"], duplicate_window=120
            )
        self.subjects = [f"{self.base}.{p}" for p in range(PARTITIONS)]

    def transport(self) -> Transport:
        from cqrskit.nats import NatsTransport

        return NatsTransport(NATS_URL, stream=self.relay.upper(), subject_prefix=self.relay)

    async def baseline(self, msgs: list[tuple[int, dict[str, str], bytes]]) -> None:
        js, subjects = self.js, self.subjects
        futures = []
        for p, headers, body in msgs:
            h = dict(headers)
            h["Nats-Msg-Id"] = h["cqrskit-id"]
            futures.append(await js.publish_async(subjects[p], body, headers=h))
        for f in futures:
            await f  # every PubAck, errors raised

    async def publish_one(self, p: int, headers: dict[str, str], body: bytes) -> None:
        h = dict(headers)
        h["Nats-Msg-Id"] = h["cqrskit-id"]
        await self.js.publish(self.subjects[p], body, headers=h)

    async def purge(self) -> None:
        for name in (self.base, self.relay):
            await self.js.purge_stream(name.upper())

    async def teardown(self) -> None:
        for name in (self.base, self.relay):
            with contextlib.suppress(Exception):
                await self.js.delete_stream(name.upper())
        await self.nc.close()


class Redis(Broker):
    name = "redis"

    def __init__(self, batch: int) -> None:
        self.batch = batch

    async def setup(self, tag: str) -> None:
        import redis.asyncio as aioredis

        self.base, self.relay = f"benchb:{tag}", f"benchr:{tag}"
        self.client = aioredis.from_url(REDIS_URL, max_connections=4096)
        self.keys = [f"{self.base}:{p}" for p in range(PARTITIONS)]

    def transport(self) -> Transport:
        from cqrskit.redis import RedisTransport

        return RedisTransport(REDIS_URL, key_prefix=self.relay)

    async def baseline(self, msgs: list[tuple[int, dict[str, str], bytes]]) -> None:
        keys = self.keys
        for start in range(0, len(msgs), self.batch):
            pipe = self.client.pipeline(transaction=False)
            for p, headers, body in msgs[start : start + self.batch]:
                fields: dict[str, Any] = dict(headers)
                fields["body"] = body
                pipe.xadd(keys[p], fields)
            for reply in await pipe.execute(raise_on_error=False):
                if isinstance(reply, Exception):
                    raise reply

    async def publish_one(self, p: int, headers: dict[str, str], body: bytes) -> None:
        fields: dict[str, Any] = dict(headers)
        fields["body"] = body
        await self.client.xadd(self.keys[p], fields)

    async def purge(self) -> None:
        await self.client.delete(*self.keys, *(f"{self.relay}:{p}" for p in range(PARTITIONS)))

    async def teardown(self) -> None:
        await self.purge()
        await self.client.aclose()


class Rabbit(Broker):
    name = "rabbitmq"

    async def setup(self, tag: str) -> None:
        import aio_pika

        self.base, self.relay = f"benchb_{tag}", f"benchr_{tag}"
        self.conn = await aio_pika.connect(AMQP_URL)
        self.ch = await self.conn.channel(publisher_confirms=True, on_return_raises=True)
        self.exchange = await self.ch.declare_exchange(
            self.base, aio_pika.ExchangeType.DIRECT, durable=True
        )
        self.queues = []
        for p in range(PARTITIONS):
            q = await self.ch.declare_queue(
                f"{self.base}.{p}", durable=True, arguments={"x-queue-type": "quorum"}
            )
            await q.bind(self.base, routing_key=f"{self.base}.{p}")
            self.queues.append(q)
        self.keys = [f"{self.base}.{p}" for p in range(PARTITIONS)]

    def transport(self) -> Transport:
        from cqrskit.rabbitmq import RabbitMQTransport

        return RabbitMQTransport(AMQP_URL, exchange=self.relay)

    async def baseline(self, msgs: list[tuple[int, dict[str, str], bytes]]) -> None:
        import aio_pika

        ex, keys = self.exchange, self.keys
        for start in range(0, len(msgs), 1000):
            tasks = [
                asyncio.ensure_future(
                    ex.publish(
                        aio_pika.Message(
                            body,
                            headers=headers,  # type: ignore[arg-type]
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            message_id=headers["cqrskit-id"],
                            content_type="application/json",
                        ),
                        keys[p],
                        mandatory=True,
                    )
                )
                for p, headers, body in msgs[start : start + 1000]
            ]
            await asyncio.gather(*tasks)

    async def publish_one(self, p: int, headers: dict[str, str], body: bytes) -> None:
        import aio_pika

        await self.exchange.publish(
            aio_pika.Message(
                body,
                headers=headers,  # type: ignore[arg-type]
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=headers["cqrskit-id"],
                content_type="application/json",
            ),
            self.keys[p],
            mandatory=True,
        )

    async def purge(self) -> None:
        for q in self.queues:
            await q.purge()
        for p in range(PARTITIONS):
            with contextlib.suppress(Exception):
                q = await self.ch.get_queue(f"{self.relay}.{p}", ensure=True)
                await q.purge()

    async def teardown(self) -> None:
        for name in (self.base, self.relay):
            for p in range(PARTITIONS):
                with contextlib.suppress(Exception):
                    await self.ch.queue_delete(f"{name}.{p}")
            with contextlib.suppress(Exception):
                await self.ch.exchange_delete(name)
        await self.conn.close()


def broker(name: str, batch: int) -> Broker:
    return {"nats": Nats, "redis": lambda: Redis(batch), "rabbitmq": Rabbit}[name]()  # type: ignore[no-any-return]


# -- P6 throughput -----------------------------------------------------------------------


async def throughput(b: Broker, store_kind: str, dsn: str, n: int, rounds: int, batch: int) -> Case:
    log = Log(store_kind, dsn)
    await log.open()
    tag = uuid.uuid4().hex[:8]
    await b.setup(tag)
    transport = b.transport()
    case = Case(
        f"P6 {b.name}",
        f"{store_kind} log → {b.name}, {n:,} events, batch {batch} × pipeline {PIPELINE[0]}",
        "≥ 0.8×",
    )

    async def run_relay(head: int) -> None:
        relay = Relay(
            log.store,
            log.state,
            transport,
            partitions=PARTITIONS,
            batch_size=batch,
            pipeline=PIPELINE[0],
        )
        await relay.start()
        try:
            if not await relay.wait_published(head, 300):
                raise RuntimeError(f"relay stuck at {relay.checkpoint} < {head}")
        finally:
            await relay.stop()

    async def timed(fn: Callable[[], Awaitable[None]]) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        await fn()
        return n / (time.perf_counter() - start), (time.process_time() - cpu) / n * 1e6

    try:
        for i in range(rounds + 1):  # round 0 warms both up and is not counted
            events = await log.fill(n)
            msgs = wire(events)
            head = events[-1].position
            runs: dict[str, Callable[[], Awaitable[None]]] = {
                "baseline": lambda m=msgs: b.baseline(m),  # type: ignore[misc]
                "candidate": lambda h=head: run_relay(h),  # type: ignore[misc]
            }
            order = ["baseline", "candidate"] if i % 2 == 0 else ["candidate", "baseline"]
            got = {k: await timed(runs[k]) for k in order}
            await b.purge()
            if i == 0:
                continue
            (base, base_cpu), (cand, cand_cpu) = got["baseline"], got["candidate"]
            case.baseline.append(base)
            case.candidate.append(cand)
            case.ratios.append(cand / base)
            case.baseline_cpu.append(base_cpu)
            case.candidate_cpu.append(cand_cpu)
            print(
                f"  {case.case} round {i}: client {base:,.0f}/s ({base_cpu:.1f} µs CPU/msg), "
                f"relay {cand:,.0f}/s ({cand_cpu:.1f} µs), ratio {case.ratios[-1]:.2f}",
                file=sys.stderr,
            )
    finally:
        await transport.close()
        await b.teardown()
        await log.close()
    return case


# -- P6 lag ------------------------------------------------------------------------------


class Timed(Transport):
    """Wraps a transport; records when each message's acknowledgement was in: when the
    future of its batch resolved (its last ack arrived), or its publish call returned."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.name = inner.name
        self.broker_dedup = inner.broker_dedup
        self.acked: dict[int, int] = {}
        self.batches: list[int] = []

    def destination(self, partition: int) -> str:
        return self.inner.destination(partition)

    def _record(self, messages: Sequence[Envelope], results: list[str | None]) -> None:
        now = time.monotonic_ns()
        acked = self.acked
        for env, reason in zip(messages, results, strict=True):
            if reason is None and env.position not in acked:
                acked[env.position] = now

    async def publish(self, messages: Sequence[Envelope]) -> list[str | None]:
        results = await self.inner.publish(messages)
        self._record(messages, results)
        return results

    async def send(self, messages: Sequence[Envelope]) -> asyncio.Future[list[str | None]]:
        future = await self.inner.send(messages)
        self.batches.append(len(messages))

        def done(f: asyncio.Future[list[str | None]]) -> None:
            if not f.cancelled() and f.exception() is None:
                self._record(messages, f.result())

        future.add_done_callback(done)  # when the batch's last acknowledgement came in
        return future

    async def close(self) -> None:
        await self.inner.close()


async def writer_child(
    dsn: str, schema: str, rate: float, seconds: float, out: str, conns: int, notify: bool
) -> None:
    """The writer process: commits at a steady ``rate``; writes (position, start, done)."""
    from cqrskit.errors import ConcurrencyError
    from cqrskit.postgres import PostgresEventStore

    store = await PostgresEventStore.open(
        dsn, schema=schema, notify=notify, create_tables=False, min_size=conns, max_size=conns
    )
    total = int(rate * seconds)
    samples: list[tuple[int, int, int]] = []
    retries: list[int] = []
    counter = iter(range(total))
    t0 = time.monotonic() + 0.2

    async def worker() -> None:
        for i in counter:
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the open-loop schedule, not synchronization
            stream, event = make_event(i)
            for _ in range(10):
                uow = await store.begin()
                uow.record(stream, event)
                start = time.monotonic_ns()
                try:
                    position = await uow.commit()
                except ConcurrencyError:
                    # a slow commit of the same stream (64 streams, 32 connections): the
                    # retry a RetryBehavior would make
                    retries.append(i)
                    continue
                samples.append((int(position or 0), start, time.monotonic_ns()))
                break
            else:
                raise RuntimeError(f"command {i}: 10 conflicts in a row")

    await asyncio.gather(*(worker() for _ in range(conns)))
    elapsed = time.monotonic() - t0
    await store.close()
    _write(out, {"rate": total / elapsed, "samples": samples, "retries": len(retries)})


async def lag(
    b: Broker, dsn: str, rate: float, seconds: float, batch: int, conns: int, notify: bool
) -> Lag:
    log = Log("postgres", dsn)
    await log.open(notify=notify)
    await log.fill(1)  # the tables exist before the writer starts
    tag = uuid.uuid4().hex[:8]
    await b.setup(tag)
    timed = Timed(b.transport())
    out = os.path.join(log.dir, "writer.json")
    seen: dict[int, int] = {}  # position -> when the relay first read it
    read_after = log.store.read_after

    async def reading(position: int, limit: int = 1000) -> list[StoredEvent]:
        events = await read_after(position, limit)
        now = time.monotonic_ns()
        for e in events:
            seen.setdefault(e.position, now)
        return events

    log.store.read_after = reading  # type: ignore[method-assign]
    relay = Relay(
        log.store,
        log.state,
        timed,
        partitions=PARTITIONS,
        batch_size=batch,
        pipeline=PIPELINE[0],
        poll_interval=1.0 if notify else 0.002,
    )
    try:
        await relay.start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "_writer", dsn, log.schema, str(rate), str(seconds), out,
            str(conns), "notify" if notify else "poll",
        )  # fmt: skip
        if await proc.wait() != 0:
            raise RuntimeError("the writer process failed")
        written = _read(out)
        samples = written["samples"]
        last = max(p for p, _, _ in samples)
        if not await relay.wait_published(last, 120):
            raise RuntimeError(f"relay stuck at {relay.checkpoint} < {last}")
    finally:
        await relay.stop()
        await timed.close()
        await b.teardown()
        await log.close()
    first = min(s for _, s, _ in samples) + 1_000_000_000  # leave the first second out
    kept = [(p, s, d) for p, s, d in samples if s >= first]
    acked, read = timed.acked, seen
    return Lag(
        b.name,
        written["rate"],
        [(acked[p] - d) / 1e6 for p, s, d in kept],
        [(acked[p] - s) / 1e6 for p, s, d in kept],
        timed.batches,
        [(read[p] - d) / 1e6 for p, s, d in kept],
        [(acked[p] - read[p]) / 1e6 for p, s, d in kept],
        int(written.get("retries", 0)),
    )


@dataclass
class ClientLag:
    """The broker client alone, open loop at the same rate, under the same writer load."""

    broker: str
    rate: float
    samples: list[float]  # scheduled send → acked, milliseconds

    def row(self) -> str:
        s = sorted(self.samples)

        def pct(q: float) -> float:
            return s[min(len(s) - 1, int(q * len(s)))]

        return (
            f"| {self.broker} (client alone) | {self.rate:,.0f} | {len(s):,} | {pct(0.5):.1f} | "
            f"**{pct(0.99):.1f}** | {s[-1]:.1f} |"
        )


CLIENT_LAG_HEADER = (
    "| broker | messages/s | samples | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|"
)


async def client_lag(
    b: Broker, dsn: str, rate: float, seconds: float, conns: int, notify: bool
) -> ClientLag:
    """The baseline of the lag: the broker's client publishing one message at a time at
    ``rate`` per second (open loop, each awaited for its ack) while the same writer process
    commits to PostgreSQL, without a relay. Lag = acked minus the scheduled send time."""
    log = Log("postgres", dsn)
    await log.open(notify=notify)
    msgs = wire(await log.fill(500))
    tag = uuid.uuid4().hex[:8]
    await b.setup(tag)
    out = os.path.join(log.dir, "writer.json")
    samples: list[tuple[float, float]] = []
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "_writer", dsn, log.schema, str(rate), str(seconds), out,
            str(conns), "notify" if notify else "poll",
        )  # fmt: skip
        total = int(rate * seconds)
        t0 = time.monotonic() + 0.3

        async def one(i: int) -> None:
            at = t0 + i / rate
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the open-loop schedule, not synchronization
            p, headers, body = msgs[i % len(msgs)]
            headers = dict(headers)
            headers["cqrskit-id"] = str(uuid.uuid4())
            await b.publish_one(p, headers, body)
            samples.append((at, time.monotonic()))

        await asyncio.gather(*(one(i) for i in range(total)))
        elapsed = time.monotonic() - t0
        if await proc.wait() != 0:
            raise RuntimeError("the writer process failed")
    finally:
        await b.teardown()
        await log.close()
    first = t0 + 1.0  # leave the first second out, as for the relay
    kept = [(d - at) * 1000 for at, d in samples if at >= first]
    return ClientLag(b.name, total / elapsed, kept)


# -- main ------------------------------------------------------------------------------------


async def main() -> None:
    """Run the cases and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", default="nats,redis,rabbitmq")
    parser.add_argument("--store", default="postgres", choices=["postgres", "sqlite"])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per broker")
    parser.add_argument("--events", type=int, default=20_000, help="events per round")
    parser.add_argument("--rabbit-events", type=int, default=5_000, help="RabbitMQ: per round")
    parser.add_argument("--batch", type=int, default=500, help="relay batch_size")
    parser.add_argument("--pipeline", type=int, default=2, help="relay pipeline")
    parser.add_argument("--rate", type=float, default=1000.0, help="lag: commands per second")
    parser.add_argument("--lag-seconds", type=float, default=15.0)
    parser.add_argument("--writer-connections", type=int, default=16)
    parser.add_argument(
        "--poll",
        action="store_true",
        help="lag: writers do not NOTIFY; the relay polls every 2 ms when idle",
    )
    parser.add_argument("--no-lag", action="store_true")
    parser.add_argument(
        "--client-lag",
        action="store_true",
        help="lag: also measure the broker's client alone at the same rate under the same "
        "writer load (the lag's baseline)",
    )
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument(
        "--own-pg", action="store_true", help="run PostgreSQL cases on a cluster of its own"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    PIPELINE[0] = args.pipeline
    own = OwnPostgres() if args.own_pg else None
    if own is not None:
        args.pg = own.start()
    try:
        await run(args)
    finally:
        if own is not None:
            own.stop()


async def run(args: argparse.Namespace) -> None:
    """The cases of one run (see the module docstring)."""
    names = [s for s in args.brokers.split(",") if s]
    cases: list[Case] = []
    lags: list[Lag] = []
    clients: list[ClientLag] = []
    if not args.no_throughput:
        for name in names:
            n = args.rabbit_events if name == "rabbitmq" else args.events
            cases.append(
                await throughput(broker(name, args.batch), args.store, args.pg, n, args.rounds,
                                 args.batch)
            )  # fmt: skip
    if not args.no_lag:
        for name in names:
            lags.append(
                await lag(broker(name, args.batch), args.pg, args.rate, args.lag_seconds,
                          args.batch, args.writer_connections, not args.poll)
            )  # fmt: skip
            if args.client_lag:
                clients.append(
                    await client_lag(broker(name, args.batch), args.pg, args.rate,
                                     args.lag_seconds, args.writer_connections, not args.poll)
                )  # fmt: skip
    print(f"\n### Relay (P6)\n\nPython {sys.version.split()[0]} on {sys.platform}\n")
    if cases:
        print(HEADER)
        for c in cases:
            print(c.row())
        print()
    if lags:
        print(LAG_HEADER)
        for lg in lags:
            print(lg.row())
    if clients:
        print("\nThe broker's client alone, one message at a time at the same rate, while the")
        print("same writer process commits (no relay):\n")
        print(CLIENT_LAG_HEADER)
        for cl in clients:
            print(cl.row())
    if args.json:
        result = {
            "throughput": [asdict(c) | {"ratio": c.ratio} for c in cases],
            "lag": [asdict(lg) for lg in lags],
            "client_lag": [asdict(cl) for cl in clients],
        }
        _write(args.json, result)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_writer"]:
        dsn, schema, rate, seconds, out, conns, wake = sys.argv[2:9]
        asyncio.run(
            writer_child(
                dsn, schema, float(rate), float(seconds), out, int(conns), wake == "notify"
            )
        )
    else:
        asyncio.run(main())
