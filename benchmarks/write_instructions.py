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
  row with ``uow.connection.execute`` and recording one event into a new stream; and the
  same with the connection replaced by a no-op object (the Python side alone).

Run: ``python benchmarks/write_instructions.py [--n 3000]`` (needs valgrind).
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
    "cqrskit": "cqrskit: mediator.send, the docs' handler (v2 layout)",
    "cqrskit_python": "cqrskit: the same, the connection a no-op (Python side alone)",
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


def _child(case: str, n: int, directory: str) -> None:
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
        store = SqliteEventStore(os.path.join(directory, "cqrskit.db"))
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


def _count(case: str, n: int) -> int:
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        child = [os.path.abspath(__file__), "--child", case, str(n), d]
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
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed; skipping the instruction counts")
        return
    small = args.n // 10
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
