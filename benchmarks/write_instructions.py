"""P2a-u as instruction counts: where a SQLite command's time goes, row by row.

Each line runs N commands (one transaction each: BEGIN IMMEDIATE, the writes, COMMIT; WAL,
synchronous=NORMAL, files on /dev/shm) under valgrind's callgrind, once with N and once
with N/10, and reports (count(N) - count(N/10)) / (0.9 N): instructions per command,
Python and SQLite together, independent of the machine's load.

* raw sqlite3 baselines: an empty transaction; the state row alone; the plain two rows
  (state + outbox-like row with a JSON payload); the event table's shape with fixed values,
  bare and with each of its costs added (the unique (stream, version) index, AUTOINCREMENT,
  the metadata columns); and with a fresh uuid4 and timestamp per row as written by hand;
* cqrskit: ``mediator.send`` with the transaction behavior, the handler inserting its state
  row with ``uow.connection.execute`` and recording one event into a new stream (callgrind
  counts every thread: the store's WAL checkpoints on its own thread are in); the same
  with ``background_checkpoints=False`` (SQLite's checkpoints in the commits, as in the raw
  lines); and with the connection replaced by a no-op object (the Python side alone).

``--pg`` counts P2b's twin instead: the client process of ``mediator.send`` with
``PostgresEventStore`` (the docs' handler: the state row with ``uow.connection.execute``,
one event into a new stream; one write connection, the store's defaults) against raw
asyncpg in the same two round trips (the state INSERT; the event INSERT with literal values
and ``COMMIT; BEGIN`` in one string). The server's work is not counted; the round trips
are equal, so the difference is the client's Python.

Run: ``python benchmarks/write_instructions.py [--n 3000] [--pg [--dsn ...]]`` (needs
valgrind; ``--pg`` a PostgreSQL server).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from cqrskit import Command, Event, Mediator, Registry
from cqrskit.sqlite import SqliteEventStore, SqliteUnitOfWork

try:
    import asyncpg

    from cqrskit.postgres import PostgresEventStore, PostgresUnitOfWork
except ImportError:  # the SQLite cases still run
    pass


@dataclass(frozen=True, slots=True)
class Deposit(Command[None]):
    key: str
    amount: int


@dataclass(frozen=True, slots=True)
class Deposited(Event):
    key: str
    amount: int


COLUMNS = (
    "stream TEXT NOT NULL, version INTEGER NOT NULL, type TEXT NOT NULL, "
    "schema_version INTEGER NOT NULL, data TEXT NOT NULL, message_id TEXT NOT NULL, "
    "correlation_id TEXT, causation_id TEXT, recorded_at TEXT NOT NULL"
)
INSERT_EVENT = (
    "INSERT INTO events (stream, version, type, schema_version, data, message_id, "
    "correlation_id, causation_id, recorded_at) VALUES (?, 1, ?, 1, ?, ?, NULL, NULL, ?)"
)
UNIQUE = "; CREATE UNIQUE INDEX events_sv ON events (stream, version)"


def _fixed(key: str) -> tuple[Any, ...]:
    data = '{"key":"' + key + '","amount":5}'  # the same text, without json.dumps
    return (
        key,
        "Deposited",
        data,
        "0123456789abcdef0123456789abcdef-0",
        "2026-01-01T00:00:00+00:00",
    )


def _by_hand(key: str) -> tuple[Any, ...]:
    data = json.dumps({"key": key, "amount": 5})
    return (key, "Deposited", data, uuid.uuid4().hex, datetime.now(UTC).isoformat())


# name -> (what, DDL or None, INSERT or None, values)
RAW: dict[str, tuple[str, str | None, str | None, Callable[[str], tuple[Any, ...]] | None]] = {
    "empty": ("raw: BEGIN IMMEDIATE + COMMIT, no row", None, None, None),
    "state": ("raw: the state row alone", None, None, None),
    "plain": (
        "raw: plain two rows (state + outbox row: integer id, type, JSON payload)",
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY, type TEXT NOT NULL, payload TEXT)",
        "INSERT INTO outbox (type, payload) VALUES (?, ?)",
        lambda k: ("Deposited", json.dumps({"key": k, "amount": 5})),
    ),
    "ev_min": (
        "raw: event row, 4 columns (stream, version, type, data), no index",
        "CREATE TABLE events (position INTEGER PRIMARY KEY, stream TEXT NOT NULL, "
        "version INTEGER NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL)",
        "INSERT INTO events (stream, version, type, data) VALUES (?, 1, ?, ?)",
        lambda k: _fixed(k)[:3],
    ),
    "ev_bare": (
        "raw: event row, all 9 columns, no index",
        f"CREATE TABLE events (position INTEGER PRIMARY KEY, {COLUMNS})",
        INSERT_EVENT,
        _fixed,
    ),
    "ev_v2": (
        "raw: + unique (stream, version) index = the v2 layout",
        f"CREATE TABLE events (position INTEGER PRIMARY KEY, {COLUMNS}){UNIQUE}",
        INSERT_EVENT,
        _fixed,
    ),
    "ev_v1": (
        "raw: + AUTOINCREMENT = the v1 layout",
        f"CREATE TABLE events (position INTEGER PRIMARY KEY AUTOINCREMENT, {COLUMNS}){UNIQUE}",
        INSERT_EVENT,
        _fixed,
    ),
    "ev_hand": (
        "raw: v2 layout, a fresh uuid4, timestamp and json.dumps per row (by hand)",
        f"CREATE TABLE events (position INTEGER PRIMARY KEY, {COLUMNS}){UNIQUE}",
        INSERT_EVENT,
        _by_hand,
    ),
}
CQRSKIT = {
    "cqrskit": "cqrskit: mediator.send, the docs' handler (v2 layout; both threads counted)",
    "cqrskit_inline": "cqrskit: the same, background_checkpoints=False",
    "cqrskit_python": "cqrskit: the same, the connection a no-op (Python side alone)",
}
PG = {
    "pg_twin": "raw asyncpg, cqrskit's 2 round trips (state INSERT; event INSERT + COMMIT; BEGIN)",
    "pg_send": "cqrskit: mediator.send with PostgresEventStore, the docs' handler",
}


class _NoOpConnection:
    """Stands for the write connection: every statement 'succeeds' without SQLite."""

    in_transaction = False
    rowcount = 1
    lastrowid = 1

    def execute(self, *args: Any) -> _NoOpConnection:
        return self

    def fetchone(self) -> tuple[int, int]:
        return (1, 1)


def _pg_child(case: str, n: int, dsn: str) -> None:
    keys = (f"k{i}" for i in itertools.count())
    schema = f"cqrskit_instr_{uuid.uuid4().hex[:12]}"

    async def run() -> None:
        admin = await asyncpg.connect(dsn)
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            if case == "pg_twin":
                await twin(admin)
            else:
                await send()
        finally:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await admin.close()

    async def twin(admin: Any) -> None:
        state = f'"{schema}".state'
        events = f'"{schema}".events'
        await admin.execute(
            f"CREATE TABLE {state} (key text PRIMARY KEY, amount int); "
            f"CREATE TABLE {events} (position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            "stream text NOT NULL, version integer NOT NULL, type text NOT NULL, "
            "schema_version integer NOT NULL, data text NOT NULL, message_id text NOT NULL, "
            "correlation_id text, causation_id text, recorded_at timestamptz NOT NULL); "
            f"CREATE UNIQUE INDEX ON {events} (stream, version)"
        )
        insert_state = f"INSERT INTO {state} VALUES ($1, $2)"
        insert_event = (
            f"INSERT INTO {events} (stream, version, type, schema_version, data, message_id, "
            "correlation_id, causation_id, recorded_at) VALUES ('{key}', 1, 'Deposited', 1, "
            "'{data}', '{mid}', NULL, NULL, now()); COMMIT; BEGIN"
        )
        conn = await asyncpg.connect(dsn)
        for _ in range(n):  # as benchmarks/write_path.py's raw_twin
            if not conn.is_in_transaction():
                await conn.execute("BEGIN")
            key = next(keys)
            await conn.execute(insert_state, key, 5)
            data = json.dumps({"key": key, "amount": 5}).replace("'", "''")
            await conn.execute(insert_event.format(key=key, data=data, mid=uuid.uuid4().hex))
        await conn.close()

    async def send() -> None:
        store = await PostgresEventStore.open(dsn, schema=schema, min_size=1, max_size=1)
        state = f'"{schema}".state'
        await store.pool.execute(f"CREATE TABLE {state} (key text PRIMARY KEY, amount int)")
        registry = Registry()

        @registry.handler
        async def deposit(cmd: Deposit, uow: PostgresUnitOfWork) -> None:
            await uow.connection.execute(
                f"INSERT INTO {state} VALUES ($1, $2)", cmd.key, cmd.amount
            )
            uow.record(cmd.key, Deposited(cmd.key, cmd.amount), expected_version=0)

        mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
        send = mediator.send
        for _ in range(n):
            await send(Deposit(next(keys), 5))
        await store.close()

    asyncio.run(run())


def _child(case: str, n: int, directory: str) -> None:
    if case in PG:
        _pg_child(case, n, directory)
        return
    keys = (f"k{i}" for i in itertools.count())
    if case in RAW:
        _, ddl, insert, values = RAW[case]
        raw = sqlite3.connect(os.path.join(directory, "raw.db"), isolation_level=None)
        raw.execute("PRAGMA journal_mode = WAL")
        raw.execute("PRAGMA synchronous = NORMAL")
        raw.execute("CREATE TABLE state (key TEXT PRIMARY KEY, amount INTEGER)")
        if ddl:
            raw.executescript(ddl)
        for _ in range(n):
            key = next(keys)
            raw.execute("BEGIN IMMEDIATE")
            if case != "empty":
                raw.execute("INSERT INTO state VALUES (?, ?)", (key, 5))
            if insert and values:
                raw.execute(insert, values(key))
            raw.execute("COMMIT")
        raw.close()
        return

    async def run() -> None:
        store = SqliteEventStore(
            os.path.join(directory, "cqrskit.db"),
            background_checkpoints=case != "cqrskit_inline",
        )
        store._writer.execute("CREATE TABLE state (key TEXT PRIMARY KEY, amount INTEGER)")
        registry = Registry()

        @registry.handler
        async def deposit(cmd: Deposit, uow: SqliteUnitOfWork) -> None:
            uow.connection.execute("INSERT INTO state VALUES (?, ?)", (cmd.key, cmd.amount))
            uow.record(cmd.key, Deposited(cmd.key, cmd.amount), expected_version=0)

        mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
        if case == "cqrskit_python":  # the connection and the store's cursor
            real = store._writer, store._cursor
            store._writer = store._cursor = _NoOpConnection()  # type: ignore[assignment]
        send = mediator.send
        for _ in range(n):
            await send(Deposit(next(keys), 5))
        if case == "cqrskit_python":
            store._writer, store._cursor = real
        store.close()

    asyncio.run(run())


def _count(case: str, n: int, dsn: str = "") -> int:
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        child = [os.path.abspath(__file__), "--child", case, str(n), dsn if case in PG else d]
        proc = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                *child,
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
            if case in PG
            else None,
        )
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if match is None:
        raise RuntimeError(f"no callgrind total in:\n{proc.stderr}")
    return int(match.group(1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--pg", action="store_true", help="P2b's twin on PostgreSQL instead")
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed; skipping the instruction counts")
        return
    small = args.n // 10
    if args.pg:
        pg = {
            c: (_count(c, args.n, args.dsn) - _count(c, small, args.dsn)) / (args.n - small)
            for c in PG
        }
        print(
            f"\n### P2b twin in client instructions per command (callgrind), {args.n:,} "
            "commands, 1 connection\n"
        )
        print("| case | instructions / command | twin ÷ case |")
        print("|---|---|---|")
        for case, value in pg.items():
            print(f"| {PG[case]} | {value:,.0f} | {pg['pg_twin'] / value:.2f}× |")
        return
    per: dict[str, float] = {}
    for case in [*RAW, *CQRSKIT]:
        per[case] = (_count(case, args.n) - _count(case, small)) / (args.n - small)
    print(f"\n### P2a-u in instructions per command (callgrind), {args.n:,} commands\n")
    print("| case | instructions / command | plain ÷ case | ev_hand ÷ case |")
    print("|---|---|---|---|")
    for case, value in per.items():
        what = RAW[case][0] if case in RAW else CQRSKIT[case]
        print(
            f"| {what} | {value:,.0f} | {per['plain'] / value:.2f}× "
            f"| {per['ev_hand'] / value:.2f}× |"
        )


if __name__ == "__main__":
    main()
