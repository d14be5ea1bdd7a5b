"""P3–P5: asynchronous projections against a hand-written loop (see shared PERFORMANCE.md).

P3  catch-up throughput over N events (default 100k) from a SQLite event log into a
    separate SQLite read database: the Projector vs a hand-written loop doing the same work
    (read a batch by position, decode, upsert, write the checkpoint, commit). Both use the
    same decoder (cqrskit.serialization.JsonSerializer) and batch size; ratio = throughput
    of the Projector / throughput of the loop (higher is better).
P4  end-to-end latency on loopback: command committed (mediator + transaction behavior)
    until the async read model shows it (the consistency gate returns); p50 and p99.
P5  memory during a catch-up: tracemalloc peak and the growth of peak RSS, at two sizes.

Run: ``python benchmarks/projections.py [--events 100000] [--rounds 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from _harness import HEADER, Result

from cqrskit import Command, Event, Mediator, Registry
from cqrskit.eventlog import StoredEvent, UnitOfWork
from cqrskit.projections import (
    ConsistencyGate,
    Projection,
    ProjectionContext,
    Projector,
)
from cqrskit.serialization import EventTypes, JsonSerializer
from cqrskit.sqlite import SqliteEventStore, SqliteReadDatabase

BATCH = 500


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

balances = Projection(
    "balances",
    tables={"accounts": ("CREATE TABLE {accounts} (id TEXT PRIMARY KEY, balance BIGINT)",)},
)


_sql: dict[str, str] = {}


@balances.on
async def deposited(e: Deposited, ctx: ProjectionContext) -> None:
    table = ctx.table("accounts")
    sql = _sql.get(table)
    if sql is None:
        sql = _sql[table] = UPSERT.format(t=table)
    await ctx.execute(sql, e.account, e.amount)


UPSERT = (
    "INSERT INTO {t} (id, balance) VALUES (?, ?) "
    "ON CONFLICT (id) DO UPDATE SET balance = {t}.balance + excluded.balance"
)


def make_log(path: Path, events: int) -> SqliteEventStore:
    """A log of ``events`` deposits over 1000 accounts, bulk-inserted."""
    store = SqliteEventStore(path, encoder=serializer.encode)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO cqrskit_events (stream, version, type, schema_version, data, message_id, "
        "recorded_at) VALUES (?, ?, 'bench.deposited', 1, ?, ?, '2026-01-01T00:00:00+00:00')",
        (
            (
                f"acc-{i % 1000}",
                i // 1000 + 1,
                json.dumps({"account": f"acc-{i % 1000}", "amount": i % 7}),
                f"m{i}",
            )
            for i in range(events)
        ),
    )
    conn.execute("COMMIT")
    conn.close()
    return store


def plain_decode(stored: StoredEvent) -> Event:
    """A minimal decoder (no limits, no registry) to expose the projector's own overhead."""
    return Deposited(**json.loads(stored.data))


async def hand_loop(store: SqliteEventStore, read_path: str, decoder: Any) -> None:
    """The baseline: what one would write by hand with sqlite3."""
    conn = sqlite3.connect(read_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE accounts (id TEXT PRIMARY KEY, balance BIGINT)")
    conn.execute("CREATE TABLE checkpoint (name TEXT PRIMARY KEY, position BIGINT)")
    conn.execute("INSERT INTO checkpoint VALUES ('balances', 0)")
    upsert = UPSERT.format(t="accounts")
    position = 0
    decode = getattr(decoder, "decode_stored", decoder)
    while True:
        batch = await store.read_after(position, BATCH)
        if not batch:
            break
        conn.execute("BEGIN IMMEDIATE")
        for stored in batch:
            e = decode(stored)
            assert isinstance(e, Deposited)
            conn.execute(upsert, (e.account, e.amount))
        position = batch[-1].position
        conn.execute("UPDATE checkpoint SET position = ? WHERE name = 'balances'", (position,))
        conn.execute("COMMIT")
    conn.close()


async def projector_catch_up(
    store: SqliteEventStore, read_path: str, decoder: Any = serializer
) -> None:
    """The candidate: a Projector started, run until caught up, stopped."""
    db = SqliteReadDatabase(read_path)
    head = await store.head()
    async with Projector(store, db, [balances], decoder, batch_size=BATCH) as p:
        await ConsistencyGate(store, db, signal=p.signal).check(["balances"], head, "wait", 600)
    await db.close()


async def p3(tmp: Path, events: int, rounds: int, case: str, decoder: Any) -> Result:
    store = make_log(tmp / f"write-{case}.db", events)
    what = "JsonSerializer" if decoder is serializer else "plain json.loads decoder"
    result = Result(case, f"catch-up, {events:,} events, SQLite → SQLite, {what}", "≥ 0.8×")
    result.higher_is_better = True
    for i in range(rounds):
        times: dict[str, float] = {}
        order = ("loop", "projector") if i % 2 == 0 else ("projector", "loop")
        for who in order:
            read_path = str(tmp / f"read-{case}-{who}-{i}.db")
            start = time.perf_counter_ns()
            if who == "loop":
                await hand_loop(store, read_path, decoder)
            else:
                await projector_catch_up(store, read_path, decoder)
            times[who] = (time.perf_counter_ns() - start) / events
        result.baseline_ns.append(times["loop"])
        result.candidate_ns.append(times["projector"])
        result.ratios.append(times["loop"] / times["projector"])
    store.close()
    return result


async def p4(tmp: Path, samples: int) -> list[float]:
    """Latency (µs) from send_tracked() start to the read model showing the command."""
    store = SqliteEventStore(tmp / "p4-write.db", encoder=serializer.encode)
    db = SqliteReadDatabase(str(tmp / "p4-read.db"))
    registry = Registry()

    @registry.handler
    async def deposit(cmd: Deposit, uow: UnitOfWork) -> None:
        uow.record(cmd.account, Deposited(cmd.account, cmd.amount))

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    out: list[float] = []
    async with Projector(store, db, [balances], serializer) as p:
        gate = ConsistencyGate(store, db, signal=p.signal)
        for i in range(samples):
            start = time.perf_counter_ns()
            receipt = await mediator.send_tracked(Deposit(f"acc-{i % 50}", 1))
            assert receipt.token is not None
            await gate.check(["balances"], receipt.token, "wait", 10.0)
            out.append((time.perf_counter_ns() - start) / 1000)
    await db.close()
    store.close()
    return out


async def p4_postgres(dsn: str, samples: int) -> list[float]:
    """P4 on PostgreSQL: separate read schema, wake-ups in process (and NOTIFY)."""
    import uuid

    import asyncpg

    from cqrskit.postgres import PostgresEventStore, PostgresReadDatabase

    suffix = uuid.uuid4().hex[:10]
    ws, rs = f"bench_w_{suffix}", f"bench_r_{suffix}"
    store = await PostgresEventStore.open(dsn, schema=ws, encoder=serializer.encode)
    db = PostgresReadDatabase(dsn, schema=rs)
    registry = Registry()

    @registry.handler
    async def deposit(cmd: Deposit, uow: UnitOfWork) -> None:
        uow.record(cmd.account, Deposited(cmd.account, cmd.amount))

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    out: list[float] = []
    try:
        async with Projector(store, db, [balances], serializer) as p:
            gate = ConsistencyGate(store, db, signal=p.signal)
            for i in range(samples):
                start = time.perf_counter_ns()
                receipt = await mediator.send_tracked(Deposit(f"acc-{i % 50}", 1))
                assert receipt.token is not None
                await gate.check(["balances"], receipt.token, "wait", 10.0)
                out.append((time.perf_counter_ns() - start) / 1000)
    finally:
        await db.close()
        await store.close()
        conn = await asyncpg.connect(dsn)
        for schema in (ws, rs):
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    return out


async def p5(tmp: Path, events: int) -> tuple[float, float]:
    """(tracemalloc peak MiB, growth of peak RSS MiB) during one catch-up."""
    store = make_log(tmp / f"p5-{events}.db", events)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    await projector_catch_up(store, str(tmp / f"p5-read-{events}.db"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store.close()
    return peak / 2**20, (rss_after - rss_before) / 1024


def best_of(r: Result) -> str:
    """The ratio of the fastest rounds: less sensitive to a busy machine than the median."""
    loop, projector = min(r.baseline_ns), min(r.candidate_ns)
    return (
        f"{r.case} best rounds: loop {loop:,.0f} ns/event, projector {projector:,.0f} "
        f"ns/event, ratio {loop / projector:.2f}×"
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def show_p4(lat: list[float], lat_pg: list[float]) -> None:
    for name, values in (("SQLite", lat), ("PostgreSQL", lat_pg)):
        if values:
            print(
                f"\nP4 command → async read model ({name}, in-process projector, "
                f"{len(values)} samples): p50 {pct(values, 0.5):,.0f} µs, "
                f"p99 {pct(values, 0.99):,.0f} µs, max {max(values):,.0f} µs"
            )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--p5", type=int, nargs=2, default=[50_000, 500_000])
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--pg", metavar="DSN", help="also measure P4 on this PostgreSQL")
    parser.add_argument("--only-p4", action="store_true", help="skip P3 and P5")
    parser.add_argument("--only-p3", action="store_true", help="skip P4 and P5")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        small, large = args.p5
        if args.only_p3:
            results = [
                await p3(tmp, args.events, args.rounds, "P3", serializer),
                await p3(tmp, args.events, args.rounds, "P3b", plain_decode),
            ]
            print(HEADER.replace("ns/op", "ns/event"))
            for r in results:
                print(r.row())
            for r in results:
                print(best_of(r))
            return
        lat = await p4(tmp, args.samples)
        lat_pg = await p4_postgres(args.pg, args.samples) if args.pg else []
        if args.only_p4:
            show_p4(lat, lat_pg)
            return
        mem_small = await p5(tmp, small)
        mem_large = await p5(tmp, large)
        r3 = await p3(tmp, args.events, args.rounds, "P3", serializer)
        r3b = await p3(tmp, args.events, args.rounds, "P3b", plain_decode)
    print(f"\n### Projections (P3–P5)\n\nPython {sys.version.split()[0]} on {sys.platform}\n")
    print(HEADER.replace("ns/op", "ns/event"))
    print(r3.row())
    print(r3b.row())
    print()
    print(best_of(r3))
    print(best_of(r3b))
    for r in (r3, r3b):
        print(
            f"\n{r.case} throughput: loop {1e9 / statistics.median(r.baseline_ns):,.0f} "
            f"events/s, projector {1e9 / statistics.median(r.candidate_ns):,.0f} events/s "
            "(ratio = projector throughput / loop throughput)"
        )
    show_p4(lat, lat_pg)
    print(
        f"\nP5 catch-up memory: {small:,} events → tracemalloc peak {mem_small[0]:.1f} MiB, "
        f"peak RSS +{mem_small[1]:.1f} MiB; {large:,} events → tracemalloc peak "
        f"{mem_large[0]:.1f} MiB, peak RSS +{mem_large[1]:.1f} MiB"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:  # noqa: ASYNC230 - after the runs
            json.dump(
                {
                    "P3": {
                        "ratio": r3.ratio,
                        "baseline_ns": r3.baseline_ns,
                        "candidate_ns": r3.candidate_ns,
                    },
                    "P4_us": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99)},
                    "P4_pg_us": {"p50": pct(lat_pg, 0.5), "p99": pct(lat_pg, 0.99)}
                    if lat_pg
                    else None,
                    "P5": {str(small): mem_small, str(large): mem_large},
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    asyncio.run(main())
