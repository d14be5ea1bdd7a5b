"""P2a / P2b: a command through the mediator with the transaction behavior vs the raw driver.

Each operation writes 1 state row and 1 event row in one transaction.

* P2a-u (SQLite, the shape the docs teach): ``mediator.send`` with
  ``SqliteEventStore.transaction()``, the handler inserting its state row with
  ``uow.connection.execute`` and recording one event into a new stream
  (``expected_version=0``), vs raw ``sqlite3`` doing BEGIN IMMEDIATE, two INSERTs, COMMIT;
  all WAL with the same ``synchronous`` setting. Two baselines: plain two rows (the state
  row and an outbox-like row: integer id, type, JSON payload) and rows of the event table's
  own shape (``sqlite_ddl``: its columns and indexes, a fresh uuid and timestamp per row).
  The store checkpoints its WAL on a thread of its own (``background_checkpoints``), the
  raw loops in the commit that fills the WAL (SQLite's default); a third baseline gives the
  plain two rows the store's checkpointer too (its passive checkpoints, and the loop
  parking for its WAL restarts as the store's ``begin()`` does), which leaves the
  library's own cost.
* P2b (PostgreSQL): the same with ``PostgresEventStore`` vs raw asyncpg doing BEGIN, two
  INSERTs, COMMIT statement by statement, on 1 connection and on 8 concurrent ones. Also
  measured: ``send_tracked`` (positions read back: one more round trip), and raw psycopg 3
  statement by statement and pipelined, which informed the driver choice.
* P2b twin: the same ``send`` against raw asyncpg in cqrskit's own two round trips — the
  state INSERT, then the event INSERT (literal values) with ``COMMIT; BEGIN`` in one
  string, so the next command's BEGIN rides on this COMMIT.

Rounds alternate baseline and candidate (A B B A ...); the table shows throughput (median,
min, max over rounds) and the median per-round throughput ratio candidate/baseline.

    python benchmarks/write_path.py [--rounds 7] [--json out.json] [--dsn ...] [--no-pg]
        [--no-sqlite] [--only-lock]

``--only-lock`` measures what the appender lock (the read side's horizon, see
``cqrskit.postgres.eventlog``) costs the write path: the store as shipped against the same
store with the lock statement removed from its BEGIN strings, interleaved in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cqrskit import Command, Event, Mediator, Registry
from cqrskit.sqlite import SqliteEventStore, SqliteUnitOfWork, WalCheckpointer, sqlite_ddl
from cqrskit.sqlite._checkpoint import WRITER_AUTOCHECKPOINT

try:
    import asyncpg
    import psycopg

    from cqrskit.postgres import PostgresEventStore, PostgresUnitOfWork
except ImportError:  # the SQLite case still runs (--no-pg)
    pass

Run = Callable[[int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Deposit(Command[None]):
    """The benchmark command."""

    key: str
    amount: int


@dataclass(frozen=True, slots=True)
class Deposited(Event):
    """The benchmark event."""

    key: str
    amount: int


@dataclass
class Case:
    """Throughputs per round (ops/s) of a baseline and a candidate."""

    case: str
    what: str
    target: str
    baseline: list[float] = field(default_factory=list)
    candidate: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

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
            f"({min(c):,.0f}–{max(c):,.0f}) | **{self.ratio:.2f}×** | {self.target} |"
        )


HEADER = (
    "| case | what | baseline ops/s median (min–max) | candidate ops/s median (min–max) "
    "| throughput ratio | target |\n|---|---|---|---|---|---|"
)


async def measure(case: Case, baseline: Run, candidate: Run, n: int, rounds: int) -> Case:
    """Interleave rounds of ``n`` operations; record throughputs and ratios."""
    await baseline(max(n // 10, 1))
    await candidate(max(n // 10, 1))
    for i in range(rounds):
        order = (baseline, candidate) if i % 2 == 0 else (candidate, baseline)
        got: dict[Run, float] = {}
        for fn in order:
            start = time.perf_counter()
            await fn(n)
            got[fn] = n / (time.perf_counter() - start)
        case.baseline.append(got[baseline])
        case.candidate.append(got[candidate])
        case.ratios.append(got[candidate] / got[baseline])
        print(f"  {case.case} round {i + 1}: ratio {case.ratios[-1]:.2f}", file=sys.stderr)
    return case


_keys = itertools.count()


def _key() -> str:
    return f"k{next(_keys)}"


# -- P2a: SQLite -----------------------------------------------------------------------------


def _raw_sqlite(path: Path, synchronous: str) -> sqlite3.Connection:
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA journal_mode = WAL")
    raw.execute(f"PRAGMA synchronous = {synchronous}")
    raw.execute("CREATE TABLE state (key TEXT PRIMARY KEY, amount INTEGER)")
    return raw


async def p2a(n: int, rounds: int, synchronous: str) -> list[Case]:
    """SQLite: mediator + transaction behavior vs raw sqlite3 (two baselines)."""
    tmp = Path(tempfile.mkdtemp(prefix="cqrskit-bench-"))
    plain = _raw_sqlite(tmp / "plain.db", synchronous)
    plain.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, type TEXT NOT NULL, payload TEXT)")
    raw = _raw_sqlite(tmp / "raw.db", synchronous)
    raw.executescript(sqlite_ddl("events"))
    # plain two rows, the WAL checkpointed as the store does it
    same = _raw_sqlite(tmp / "same.db", synchronous)
    same.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, type TEXT NOT NULL, payload TEXT)")
    same.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT}")
    checkpointer = WalCheckpointer(str(tmp / "same.db"), synchronous=synchronous, busy_ms=5000)
    left = [checkpointer.every]

    async def plain_rows_same_checkpoints(count: int) -> None:
        for _ in range(count):
            key = _key()
            if checkpointer.pause is not None:  # the WAL restart, as the store's begin()
                await checkpointer.park()
            same.execute("BEGIN IMMEDIATE")
            same.execute("INSERT INTO state VALUES (?, ?)", (key, 5))
            same.execute(
                "INSERT INTO outbox (type, payload) VALUES (?, ?)",
                ("Deposited", json.dumps({"key": key, "amount": 5})),
            )
            same.execute("COMMIT")
            left[0] -= 1
            if not left[0]:
                left[0] = checkpointer.every
                checkpointer.poke()

    async def plain_rows(count: int) -> None:
        # the least one writes by hand: a state row and an outbox-like row
        for _ in range(count):
            key = _key()
            plain.execute("BEGIN IMMEDIATE")
            plain.execute("INSERT INTO state VALUES (?, ?)", (key, 5))
            plain.execute(
                "INSERT INTO outbox (type, payload) VALUES (?, ?)",
                ("Deposited", json.dumps({"key": key, "amount": 5})),
            )
            plain.execute("COMMIT")

    async def baseline(count: int) -> None:
        # a hand-written outbox row: same columns, a fresh id and timestamp, JSON payload
        for _ in range(count):
            key = _key()
            raw.execute("BEGIN IMMEDIATE")
            raw.execute("INSERT INTO state VALUES (?, ?)", (key, 5))
            raw.execute(
                "INSERT INTO events (stream, version, type, schema_version, data, message_id, "
                "correlation_id, causation_id, recorded_at) VALUES (?, 1, ?, 1, ?, ?, ?, ?, ?)",
                (
                    key,
                    "Deposited",
                    json.dumps({"key": key, "amount": 5}),
                    uuid.uuid4().hex,
                    None,
                    None,
                    datetime.now(UTC).isoformat(),
                ),
            )
            raw.execute("COMMIT")

    store = SqliteEventStore(tmp / "cqrskit.db", synchronous=synchronous)  # type: ignore[arg-type]
    store._writer.execute("CREATE TABLE state (key TEXT PRIMARY KEY, amount INTEGER)")
    registry = Registry()

    @registry.handler
    async def deposit(cmd: Deposit, uow: SqliteUnitOfWork) -> None:
        uow.connection.execute("INSERT INTO state VALUES (?, ?)", (cmd.key, cmd.amount))
        uow.record(cmd.key, Deposited(cmd.key, cmd.amount), expected_version=0)

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    send = mediator.send

    async def candidate(count: int) -> None:
        for _ in range(count):
            await send(Deposit(_key(), 5))

    what = f"SQLite WAL synchronous={synchronous}: 1 state row + 1 event per command"
    try:
        return [
            await measure(
                Case("P2a-u", f"{what}; baseline: plain two rows", "≥ 0.8×"),
                plain_rows,
                candidate,
                n,
                rounds,
            ),
            await measure(
                Case("P2a-u", f"{what}; baseline: rows of the event table's shape", "≥ 0.8×"),
                baseline,
                candidate,
                n,
                rounds,
            ),
            await measure(
                Case(
                    "P2a-u",
                    f"{what}; baseline: plain two rows, WAL checkpointed as the store does",
                    "(the library's own cost)",
                ),
                plain_rows_same_checkpoints,
                candidate,
                n,
                rounds,
            ),
        ]
    finally:
        checkpointer.close()
        plain.close()
        raw.close()
        same.close()
        store.close()


# -- P2b: PostgreSQL -------------------------------------------------------------------------


async def p2b(
    dsn: str, n: int, rounds: int, *, only_lock: bool = False, send_only: bool = False
) -> list[Case]:
    """PostgreSQL: mediator + transaction behavior vs raw asyncpg (and psycopg for reference)."""
    schema = f"cqrskit_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dsn)
    store = await PostgresEventStore.open(dsn, schema=schema, min_size=8, max_size=8)
    await admin.execute(
        f'CREATE TABLE "{schema}".state (key text PRIMARY KEY, amount int); '
        f'CREATE TABLE "{schema}".raw_state (key text PRIMARY KEY, amount int); '
        f'CREATE TABLE "{schema}".raw_events (LIKE "{schema}".cqrskit_events INCLUDING ALL); '
        f'ALTER TABLE "{schema}".raw_events ALTER position ADD GENERATED ALWAYS AS IDENTITY'
    )
    raw_conns = [await asyncpg.connect(dsn) for _ in range(8)]
    st = f'"{schema}".state'
    raw_st = f'"{schema}".raw_state'
    raw_ev = f'"{schema}".raw_events'
    registry = Registry()

    @registry.handler
    async def deposit(cmd: Deposit, uow: PostgresUnitOfWork) -> None:
        await uow.connection.execute(f"INSERT INTO {st} VALUES ($1, $2)", cmd.key, cmd.amount)
        uow.record(cmd.key, Deposited(cmd.key, cmd.amount), expected_version=0)

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())

    insert_raw_event = (
        f"INSERT INTO {raw_ev} (stream, version, type, schema_version, data, message_id, "
        "correlation_id, causation_id, recorded_at) VALUES ($1, 1, $2, 1, $3, $4, NULL, NULL, "
        "now())"
    )

    async def raw_one(conn: asyncpg.Connection) -> None:
        # a hand-written outbox row: same table shape, a fresh id, JSON payload
        key = _key()
        await conn.execute("BEGIN")
        await conn.execute(f"INSERT INTO {raw_st} VALUES ($1, $2)", key, 5)
        await conn.execute(
            insert_raw_event,
            key,
            "Deposited",
            json.dumps({"key": key, "amount": 5}),
            uuid.uuid4().hex,
        )
        await conn.execute("COMMIT")

    def spread(conc: int, one: Callable[[int], Awaitable[None]]) -> Run:
        async def run(count: int) -> None:
            async def worker(w: int) -> None:
                for _ in range(count // conc):
                    await one(w)

            await asyncio.gather(*(worker(w) for w in range(conc)))

        return run

    async def raw_asyncpg(w: int) -> None:
        await raw_one(raw_conns[w])

    async def cqrs_send(w: int) -> None:
        await mediator.send(Deposit(_key(), 5))

    async def cqrs_tracked(w: int) -> None:
        await mediator.send_tracked(Deposit(_key(), 5))

    pconns = [await psycopg.AsyncConnection.connect(dsn) for _ in range(8)]
    twin_conns = [await asyncpg.connect(dsn) for _ in range(8)]
    twin_event = (
        f"INSERT INTO {raw_ev} (stream, version, type, schema_version, data, message_id, "
        "correlation_id, causation_id, recorded_at) VALUES ('{key}', 1, 'Deposited', 1, "
        "'{data}', '{mid}', NULL, NULL, now()); COMMIT; BEGIN"
    )

    async def raw_twin(w: int) -> None:
        # what cqrskit sends, by hand: 2 round trips, BEGIN riding on the previous COMMIT
        conn = twin_conns[w]
        if not conn.is_in_transaction():
            await conn.execute("BEGIN")
        key = _key()
        await conn.execute(f"INSERT INTO {raw_st} VALUES ($1, $2)", key, 5)
        data = json.dumps({"key": key, "amount": 5}).replace("'", "''")
        await conn.execute(twin_event.format(key=key, data=data, mid=uuid.uuid4().hex))

    async def raw_psycopg(w: int) -> None:
        conn = pconns[w]
        key = _key()
        await conn.execute(f"INSERT INTO {raw_st} VALUES (%s, %s)", (key, 5))
        await conn.execute(
            f"INSERT INTO {raw_ev} (stream, version, type, schema_version, data, message_id, "
            "recorded_at) VALUES (%s, 1, %s, 1, %s, %s, now())",
            (key, "Deposited", json.dumps({"key": key, "amount": 5}), uuid.uuid4().hex),
        )
        await conn.commit()

    async def psycopg_pipeline(w: int) -> None:
        conn = pconns[w]
        key = _key()
        await conn.execute(f"INSERT INTO {raw_st} VALUES (%s, %s)", (key, 5))
        async with conn.pipeline():
            await conn.execute(
                f"INSERT INTO {raw_ev} (stream, version, type, schema_version, data, "
                "message_id, recorded_at) VALUES (%s, 1, %s, 1, %s, %s, now()) "
                "RETURNING position",
                (key, "Deposited", json.dumps({"key": key, "amount": 5}), uuid.uuid4().hex),
            )
            await conn.commit()

    # the same store without the appender lock in its BEGIN strings (the read side's horizon
    # then has no proof; measured only to show what the lock costs the write path)
    unlocked = await PostgresEventStore.open(dsn, schema=schema, min_size=8, max_size=8)
    lock = "; " + unlocked.appender_lock_sql
    for attr in ("_sql_begin", "_sql_commit", "_sql_end", "_sql_rollback"):
        setattr(unlocked, attr, getattr(unlocked, attr).replace(lock, ""))
    unlocked_mediator = Mediator(
        registry, behaviors=[unlocked.transaction()], resolver=unlocked.resolver()
    )

    async def cqrs_send_unlocked(w: int) -> None:
        await unlocked_mediator.send(Deposit(_key(), 5))

    async def cqrs_tracked_unlocked(w: int) -> None:
        await unlocked_mediator.send_tracked(Deposit(_key(), 5))

    cases: list[Case] = []
    try:
        for conc in (1, 8):
            if only_lock:
                for what, without, with_lock in (
                    ("send", cqrs_send_unlocked, cqrs_send),
                    ("send_tracked", cqrs_tracked_unlocked, cqrs_tracked),
                ):
                    cases.append(
                        await measure(
                            Case(
                                "lock",
                                f"PostgreSQL, {conc} conn., {what}: with the appender lock "
                                "/ without",
                                "≈ 1.0×",
                            ),
                            spread(conc, without),
                            spread(conc, with_lock),
                            n,
                            rounds,
                        )
                    )
                continue
            base = spread(conc, raw_asyncpg)
            cases.append(
                await measure(
                    Case("P2b", f"PostgreSQL, {conc} connection(s), send", "≥ 1.0×"),
                    base,
                    spread(conc, cqrs_send),
                    n,
                    rounds,
                )
            )
            cases.append(
                await measure(
                    Case(
                        "P2b twin",
                        f"PostgreSQL, {conc} connection(s), send; baseline: raw asyncpg in "
                        "the same 2 round trips",
                        "≥ 0.9×",
                    ),
                    spread(conc, raw_twin),
                    spread(conc, cqrs_send),
                    n,
                    rounds,
                )
            )
            if send_only:
                continue
            cases.append(
                await measure(
                    Case("P2b'", f"PostgreSQL, {conc} connection(s), send_tracked", "—"),
                    base,
                    spread(conc, cqrs_tracked),
                    n,
                    rounds,
                )
            )
            cases.append(
                await measure(
                    Case("driver", f"raw psycopg 3 statement by statement, {conc} conn.", "—"),
                    base,
                    spread(conc, raw_psycopg),
                    n,
                    rounds,
                )
            )
            cases.append(
                await measure(
                    Case("driver", f"raw psycopg 3, INSERT+COMMIT pipelined, {conc} conn.", "—"),
                    base,
                    spread(conc, psycopg_pipeline),
                    n,
                    rounds,
                )
            )
    finally:
        for c in raw_conns:
            await c.close()
        for p in pconns:
            await p.close()
        await unlocked.close()
        for c in twin_conns:
            await c.close()
        await store.close()
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()
    return cases


async def lock_statement(dsn: str, rounds: int, n: int = 2000) -> str:
    """The appender lock's own price: ``COMMIT; BEGIN`` round trips of an empty transaction
    with and without the lock statement, on one connection, interleaved."""
    conn = await asyncpg.connect(dsn)
    plain = "COMMIT; BEGIN"
    locked = f"{plain}; SELECT pg_advisory_xact_lock_shared(1129402963, 42)"
    took: dict[str, list[float]] = {plain: [], locked: []}
    try:
        await conn.execute("BEGIN")
        for i in range(rounds):
            for sql in (plain, locked) if i % 2 == 0 else (locked, plain):
                start = time.perf_counter()
                for _ in range(n):
                    await conn.execute(sql)
                took[sql].append((time.perf_counter() - start) / n * 1e6)
        await conn.execute("ROLLBACK")
    finally:
        await conn.close()
    ratios = [b / a for a, b in zip(took[plain], took[locked], strict=True)]
    return (
        f"`COMMIT; BEGIN` round trip: {statistics.median(took[plain]):.1f} µs; with the "
        f"appender lock: {statistics.median(took[locked]):.1f} µs (ratio "
        f"{statistics.median(ratios):.2f}×, median of {rounds} rounds of {n})"
    )


async def main() -> None:
    """Run the cases and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case")
    parser.add_argument("--n-sqlite", type=int, default=3000, help="commands per SQLite round")
    parser.add_argument("--n-pg", type=int, default=1600, help="commands per PostgreSQL round")
    parser.add_argument("--synchronous", default="NORMAL", choices=["NORMAL", "FULL"])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL cases")
    parser.add_argument(
        "--only-lock",
        action="store_true",
        help="only the cost of the appender lock: the store with it against without it",
    )
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite cases")
    parser.add_argument(
        "--send-only", action="store_true", help="PostgreSQL: only send (P2b and its twin)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    cases = [] if args.no_sqlite else await p2a(args.n_sqlite, args.rounds, args.synchronous)
    if not args.no_pg:
        cases += await p2b(
            args.dsn, args.n_pg, args.rounds, only_lock=args.only_lock, send_only=args.send_only
        )
    only_lock = args.only_lock and not args.no_pg
    lock_line = await lock_statement(args.dsn, 10) if only_lock else None
    print("\n### Write path\n")
    print(f"Python {sys.version.split()[0]} on {sys.platform}, {args.rounds} rounds\n")
    print(HEADER)
    for c in cases:
        print(c.row())
    if lock_line:
        print(f"\n{lock_line}")
    if args.json:
        _write_json(args.json, cases)


def _write_json(path: str, cases: list[Case]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([asdict(c) | {"ratio": c.ratio} for c in cases], f, indent=2)


if __name__ == "__main__":
    asyncio.run(main())
