"""P3u: projection catch-up with the handler the docs teach, against a batched loop.

The candidate is a ``Projector`` running the handler of docs/projections.md: one
``ctx.execute`` upsert per event. The baseline is what one writes by hand to go fast: read
a batch by position (``store.read_after``), decode, one ``executemany`` upsert for the whole
batch, write the checkpoint, commit. Same event log, same decoder, same batch size, same
kind of read database (a separate SQLite file; a separate PostgreSQL schema). The
projector's start-up (lease, views) and its fencing update per batch are included.

Rounds alternate (loop, projector), (projector, loop), ...; the ratio of a round is loop
time / projector time (projector throughput / loop throughput, higher is better); the
table shows the median over rounds.

    python benchmarks/catch_up.py [--events 100000] [--rounds 5] [--batch 500]
        [--dsn postgresql://postgres@127.0.0.1:5432/test] [--no-pg] [--no-sqlite]

``--instructions`` counts instructions instead (valgrind's callgrind; SQLite only, both
databases on /dev/shm): each side catches up over the same prepared log in its own
process, once over N events and once over none; (count(N) - count(0)) / N per side: fixed
costs (interpreter, imports, the projector's start-up) cancel out, the per-batch
bookkeeping (fencing, checkpoint) stays in. Counts do not move with the machine's load,
wall-clock ratios on a shared machine do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from _harness import Result

from cqrskit import Event
from cqrskit.eventlog import EventStore
from cqrskit.projections import ConsistencyGate, Projection, ProjectionContext, Projector
from cqrskit.projections.db import ReadDatabase
from cqrskit.serialization import EventTypes, JsonSerializer
from cqrskit.sqlite import SqliteEventStore, SqliteReadDatabase


@dataclass(frozen=True, slots=True)
class Deposited(Event):
    """The benchmark event."""

    account: str
    amount: int


types = EventTypes()
types.register(Deposited, "bench.deposited")
serializer = JsonSerializer(types)

balances = Projection(
    "balances",
    tables={"accounts": ("CREATE TABLE {accounts} (id TEXT PRIMARY KEY, balance BIGINT)",)},
)


# the handler exactly as docs/projections.md writes it
@balances.on
async def on_deposited(e: Deposited, ctx: ProjectionContext) -> None:
    t = ctx.table("accounts")
    await ctx.execute(
        f"INSERT INTO {t} (id, balance) VALUES (?, ?) "
        f"ON CONFLICT (id) DO UPDATE SET balance = {t}.balance + excluded.balance",
        e.account,
        e.amount,
    )


# a second shape: two different statements per event (an upsert and a history row)
ledger = Projection(
    "ledger",
    tables={
        "accounts": ("CREATE TABLE {accounts} (id TEXT PRIMARY KEY, balance BIGINT)",),
        "entries": (
            "CREATE TABLE {entries} (position BIGINT PRIMARY KEY, account TEXT, amount BIGINT)",
        ),
    },
)


@ledger.on
async def on_deposited_two(e: Deposited, ctx: ProjectionContext) -> None:
    t, h = ctx.table("accounts"), ctx.table("entries")
    await ctx.execute(
        f"INSERT INTO {t} (id, balance) VALUES (?, ?) "
        f"ON CONFLICT (id) DO UPDATE SET balance = {t}.balance + excluded.balance",
        e.account,
        e.amount,
    )
    assert ctx.stored is not None
    await ctx.execute(
        f"INSERT INTO {h} (position, account, amount) VALUES (?, ?, ?)",
        ctx.stored.position,
        e.account,
        e.amount,
    )


ENTRIES = "CREATE TABLE {s}entries (position BIGINT PRIMARY KEY, account TEXT, amount BIGINT)"


def entry(table: str, placeholder: Callable[[int], str]) -> str:
    p = placeholder
    return f"INSERT INTO {table} (position, account, amount) VALUES ({p(1)}, {p(2)}, {p(3)})"


def upsert(table: str, placeholder: Callable[[int], str]) -> str:
    return (
        f"INSERT INTO {table} (id, balance) VALUES ({placeholder(1)}, {placeholder(2)}) "
        f"ON CONFLICT (id) DO UPDATE SET balance = {table}.balance + excluded.balance"
    )


async def projector_catch_up(
    store: EventStore, db: ReadDatabase, batch: int, two: bool = False
) -> None:
    """The candidate: a Projector started, run until caught up, stopped. It is watched
    through its in-memory checkpoint (a consistency gate would add a read-database query
    per batch that the loop does not pay); the gate confirms the end once."""
    head = await store.head()
    projection = ledger if two else balances
    name = projection.name
    async with Projector(store, db, [projection], serializer, batch_size=batch) as p:
        deadline = time.monotonic() + 900
        while p.checkpoint(name) < head:
            assert time.monotonic() < deadline, "the projector did not catch up"
            await p.signal.wait(1.0)
        await ConsistencyGate(store, db, signal=p.signal).check([name], head, "fail", 0)


# -- SQLite --------------------------------------------------------------------------------


def sqlite_log(path: Path, events: int) -> SqliteEventStore:
    """A log of ``events`` deposits over 1,000 accounts, bulk-inserted."""
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


async def sqlite_loop(store: EventStore, read_path: str, batch: int, two: bool = False) -> None:
    """The baseline on SQLite: executemany per batch (per table), checkpoint, commit."""
    conn = sqlite3.connect(read_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE accounts (id TEXT PRIMARY KEY, balance BIGINT)")
    conn.execute("CREATE TABLE checkpoint (name TEXT PRIMARY KEY, position BIGINT)")
    conn.execute("INSERT INTO checkpoint VALUES ('balances', 0)")
    if two:
        conn.execute(ENTRIES.format(s=""))
    sql = upsert("accounts", lambda n: "?")
    history = entry("entries", lambda n: "?")
    decode = serializer.decode_stored
    position = 0
    while True:
        events = await store.read_after(position, batch)
        if not events:
            break
        rows = []
        entries = []
        for stored in events:
            e = decode(stored)
            assert isinstance(e, Deposited)
            rows.append((e.account, e.amount))
            if two:
                entries.append((stored.position, e.account, e.amount))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows)
        if two:
            conn.executemany(history, entries)
        position = events[-1].position
        conn.execute("UPDATE checkpoint SET position = ? WHERE name = 'balances'", (position,))
        conn.execute("COMMIT")
    conn.close()


def _result(db: str, events: int, batch: int, two: bool) -> Result:
    if two:
        return Result(
            f"P3u-2 {db}",
            f"catch-up of {events:,} events, batch {batch}, two statements per event (upsert + "
            "history row) vs two executemany per batch",
            "—",
        )
    return Result(
        f"P3u {db}",
        f"catch-up of {events:,} events, batch {batch}, per-event ctx.execute vs executemany loop",
        "≥ 0.8×",
    )


async def p3u_sqlite(tmp: Path, events: int, rounds: int, batch: int, two: bool) -> Result:
    store = sqlite_log(tmp / f"log-{two}.db", events)
    result = _result("SQLite", events, batch, two)
    counter = iter(range(10**6))

    async def loop() -> None:
        await sqlite_loop(store, str(tmp / f"loop-{two}-{next(counter)}.db"), batch, two)

    async def projector() -> None:
        db = SqliteReadDatabase(str(tmp / f"proj-{two}-{next(counter)}.db"))
        try:
            await projector_catch_up(store, db, batch, two)
        finally:
            await db.close()

    try:
        return await interleave(result, loop, projector, events, rounds)
    finally:
        store.close()


# -- PostgreSQL ----------------------------------------------------------------------------


async def p3u_postgres(dsn: str, events: int, rounds: int, batch: int, two: bool) -> Result:
    import asyncpg

    from cqrskit.postgres import PostgresEventStore, PostgresReadDatabase

    suffix = uuid.uuid4().hex[:10]
    write_schema = f"bench_cu_w_{suffix}"
    schemas = [write_schema]
    store = await PostgresEventStore.open(dsn, schema=write_schema, encoder=serializer.encode)
    admin = await asyncpg.connect(dsn)
    result = _result("PostgreSQL", events, batch, two)
    counter = iter(range(10**6))
    try:
        for start in range(0, events, 1000):
            uow = await store.begin()
            for i in range(start, min(events, start + 1000)):
                uow.record(f"acc-{i % 1000}", Deposited(f"acc-{i % 1000}", i % 7))
            await uow.commit()

        async def loop() -> None:
            schema = f"bench_cu_l_{suffix}_{next(counter)}"
            schemas.append(schema)
            await admin.execute(
                f'CREATE SCHEMA "{schema}"; '
                f'CREATE TABLE "{schema}".accounts (id TEXT PRIMARY KEY, balance BIGINT); '
                f'CREATE TABLE "{schema}".checkpoint (name TEXT PRIMARY KEY, position BIGINT); '
                f"INSERT INTO \"{schema}\".checkpoint VALUES ('balances', 0); "
                + ENTRIES.format(s=f'"{schema}".')
            )
            conn = await asyncpg.connect(dsn)
            try:
                await pg_loop(store, conn, schema, batch, two)
            finally:
                await conn.close()

        async def projector() -> None:
            schema = f"bench_cu_p_{suffix}_{next(counter)}"
            schemas.append(schema)
            db = PostgresReadDatabase(dsn, schema=schema)
            try:
                await projector_catch_up(store, db, batch, two)
            finally:
                await db.close()

        return await interleave(result, loop, projector, events, rounds)
    finally:
        await store.close()
        for schema in schemas:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


async def pg_loop(store: EventStore, conn: Any, schema: str, batch: int, two: bool) -> None:
    """The baseline on PostgreSQL: one executemany per batch (per table), checkpoint, commit."""
    sql = upsert(f'"{schema}".accounts', lambda n: f"${n}")
    history = entry(f'"{schema}".entries', lambda n: f"${n}")
    checkpoint = f"UPDATE \"{schema}\".checkpoint SET position = $1 WHERE name = 'balances'"
    decode = serializer.decode_stored
    position = 0
    while True:
        events = await store.read_after(position, batch)
        if not events:
            break
        rows = []
        entries = []
        for stored in events:
            e = decode(stored)
            assert isinstance(e, Deposited)
            rows.append((e.account, e.amount))
            if two:
                entries.append((stored.position, e.account, e.amount))
        position = events[-1].position
        async with conn.transaction():
            await conn.executemany(sql, rows)
            if two:
                await conn.executemany(history, entries)
            await conn.execute(checkpoint, position)


# -- harness -------------------------------------------------------------------------------


async def interleave(
    result: Result,
    loop: Callable[[], Awaitable[None]],
    projector: Callable[[], Awaitable[None]],
    events: int,
    rounds: int,
) -> Result:
    result.higher_is_better = True
    for i in range(rounds):
        times: dict[str, float] = {}
        order = (("loop", loop), ("projector", projector))
        for who, run in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter_ns()
            await run()
            times[who] = (time.perf_counter_ns() - start) / events
        result.baseline_ns.append(times["loop"])
        result.candidate_ns.append(times["projector"])
        result.ratios.append(times["loop"] / times["projector"])
        print(f"  {result.case} round {i + 1}: ratio {result.ratios[-1]:.2f}", file=sys.stderr)
    return result


def row(r: Result) -> str:
    b, c = r.baseline_ns, r.candidate_ns
    return (
        f"| {r.case} | {r.what} | {1e9 / statistics.median(b):,.0f} "
        f"({1e9 / max(b):,.0f}–{1e9 / min(b):,.0f}) | {1e9 / statistics.median(c):,.0f} "
        f"({1e9 / max(c):,.0f}–{1e9 / min(c):,.0f}) | **{r.ratio:.2f}×** | {r.target} |"
    )


# -- instruction counts (SQLite) ----------------------------------------------------------


def _child(side: str, log_path: str, read_path: str, batch: int) -> None:
    async def run() -> None:
        store = SqliteEventStore(log_path, encoder=serializer.encode)
        if side == "loop":
            await sqlite_loop(store, read_path, batch)
        else:
            db = SqliteReadDatabase(read_path)
            await projector_catch_up(store, db, batch)
            await db.close()
        store.close()

    asyncio.run(run())


def _instructions(side: str, log_path: str, tmp: str, batch: int) -> int:
    read_path = os.path.join(tmp, f"read-{side}-{os.path.basename(log_path)}")
    child = [os.path.abspath(__file__), "--child", side, log_path, read_path, str(batch)]
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, *child],
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if match is None:
        raise RuntimeError(f"no callgrind total in:\n{proc.stderr}")
    return int(match.group(1))


def instructions(events: int, batch: int) -> None:
    if shutil.which("valgrind") is None:
        print("valgrind is not installed; skipping the instruction counts")
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        full, empty = os.path.join(d, "full.db"), os.path.join(d, "empty.db")
        sqlite_log(Path(full), events).close()
        sqlite_log(Path(empty), 0).close()
        per = {
            side: (_instructions(side, full, d, batch) - _instructions(side, empty, d, batch))
            / events
            for side in ("loop", "projector")
        }
    print(f"\n### P3u SQLite in instructions (callgrind), {events:,} events, batch {batch}\n")
    print("| case | loop instr/event | projector instr/event | ratio (loop / projector) |")
    print("|---|---|---|---|")
    print(
        f"| P3u SQLite | {per['loop']:,.0f} | {per['projector']:,.0f} | "
        f"**{per['loop'] / per['projector']:.2f}×** |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--no-pg", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--instructions", action="store_true", help="callgrind, SQLite only")
    parser.add_argument(
        "--two", action="store_true", help="also two statements per event (P3u-2, no target)"
    )
    args = parser.parse_args()
    if args.instructions:
        instructions(args.events, args.batch)
        return
    results = []
    shapes = [False, True] if args.two else [False]
    for two in shapes:
        if not args.no_sqlite:
            with tempfile.TemporaryDirectory() as d:
                results.append(await p3u_sqlite(Path(d), args.events, args.rounds, args.batch, two))
        if not args.no_pg:
            results.append(await p3u_postgres(args.dsn, args.events, args.rounds, args.batch, two))
    print(f"\n### Catch-up in the docs' shape (P3u), {args.rounds} rounds\n")
    print(f"Python {sys.version.split()[0]} on {sys.platform}\n")
    print(
        "| case | what | loop events/s median (min–max) | projector events/s median (min–max) "
        "| ratio | target |\n|---|---|---|---|---|---|"
    )
    for r in results:
        print(row(r))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:  # noqa: ASYNC230 - after the runs
            json.dump([{"case": r.case, "ratios": r.ratios, "ratio": r.ratio} for r in results], f)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        asyncio.run(main())
