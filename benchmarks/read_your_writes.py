"""P9: read-your-writes on PostgreSQL while other sessions hold a transaction open.

Commands are sent at a fixed rate (open loop: each one starts on its schedule, whatever the
previous ones do) with ``send_tracked``; each is followed by a query with its consistency
token (``ask_consistent``, policy "wait", timeout 5 s) served from an async read model kept
by an in-process projector. The latency of one sample is from the command's start to the
query's answer. Phases, in one run:

* ``quiet``: nothing else open;
* ``held``: for ``--hold`` seconds (default 60) two other sessions hold a transaction id
  open — one in a throwaway database created for the run (dropped after), one in the same
  database that never touches the event log (it creates a table);
* ``quiet`` again.

The table shows p50, p99 and max per phase, the number of stale reads (StaleReadError after
5 s), the CPU this process used per second of the phase (application, projector and
gate share one event loop: near 1.0 means it is saturated and latency is queueing) and the
machine's load average, and the ratio of the held phase's p99 to the quiet phases' p99
(target: p99 < 50 ms at 200 commands/s with the transactions held).

Run it on a server nobody else uses: the held transactions hold back the readers of every
other application on that server that still use a cluster-wide horizon.

    python benchmarks/read_your_writes.py --dsn postgresql://postgres@127.0.0.1:PORT/test \\
        [--rate 200] [--hold 60] [--quiet 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import asyncpg

from cqrskit import Command, Dependencies, Event, Mediator, Query, Registry, for_queries
from cqrskit.errors import StaleReadError
from cqrskit.eventlog import UnitOfWork
from cqrskit.postgres import PostgresEventStore, PostgresReadDatabase, PostgresUnitOfWork
from cqrskit.projections import (
    ConsistencyGate,
    Projection,
    ProjectionContext,
    Projector,
    ReadSession,
    ask_consistent,
    reads,
)
from cqrskit.serialization import EventTypes, JsonSerializer


@dataclass(frozen=True, slots=True)
class Deposit(Command[None]):
    account: str
    amount: int


@dataclass(frozen=True, slots=True)
class Deposited(Event):
    account: str
    amount: int


@reads("balances")
@dataclass(frozen=True, slots=True)
class GetBalance(Query[int | None]):
    account: str


types = EventTypes()
types.register(Deposited, "bench.deposited")
serializer = JsonSerializer(types)

balances = Projection(
    "balances",
    tables={"accounts": ("CREATE TABLE {accounts} (id TEXT PRIMARY KEY, balance BIGINT)",)},
)


@balances.on
async def deposited(e: Deposited, ctx: ProjectionContext) -> None:
    await ctx.execute(
        f"INSERT INTO {ctx.table('accounts')} (id, balance) VALUES (?, ?) ON CONFLICT (id) "
        f"DO UPDATE SET balance = {ctx.table('accounts')}.balance + excluded.balance",
        e.account,
        e.amount,
    )


@dataclass
class Phase:
    """Latencies (ms) of one phase and its stale reads."""

    name: str
    latencies: list[float] = field(default_factory=list)
    #: per command: (seconds into the phase, send_tracked ms, whole ms), for --json
    series: list[tuple[float, float, float]] = field(default_factory=list)
    stale: int = 0
    cpu: float = 0.0  # this process's CPU seconds per wall-clock second during the phase
    load: float = 0.0  # the machine's 1-minute load average at the phase's end

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

    def row(self) -> str:
        return (
            f"| {self.name} | {len(self.latencies)} | {self.pct(0.5):.1f} | "
            f"{self.pct(0.99):.1f} | {max(self.latencies, default=0):.1f} | {self.stale} | "
            f"{self.cpu:.2f} | {self.load:.1f} |"
        )


@contextlib.asynccontextmanager
async def held_transactions(dsn: str, schema: str, where: str) -> AsyncIterator[None]:
    """Sessions holding an xid: one in a throwaway database, one in this database that
    never touches the event log (``where``: "both", "other" or "same")."""
    name = f"cqrskit_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    conns: list[asyncpg.Connection] = []
    try:
        if where in ("both", "other"):
            other = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/" + name)
            conns.append(other)
            await other.execute("BEGIN; CREATE TABLE report (x int)")
        if where in ("both", "same"):
            same = await asyncpg.connect(dsn)
            conns.append(same)
            await same.execute(f'BEGIN; CREATE TABLE "{schema}".report (x int)')
        yield
    finally:
        for c in conns:
            await c.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def run_phase(mediator: Mediator, phase: Phase, rate: float, seconds: float) -> None:
    """Send ``rate`` commands per second for ``seconds``, each followed by its query."""
    loop = asyncio.get_running_loop()
    count = int(rate * seconds)
    start = loop.time()
    cpu0 = time.process_time()

    async def one(i: int) -> None:
        account = f"acc-{i % 50}"
        t0 = time.perf_counter()
        receipt = await mediator.send_tracked(Deposit(account, 1))
        sent = time.perf_counter()
        assert receipt.token is not None
        try:
            await ask_consistent(
                mediator, GetBalance(account), receipt.token, policy="wait", timeout=5.0
            )
        except StaleReadError:
            phase.stale += 1
        whole = (time.perf_counter() - t0) * 1000
        phase.latencies.append(whole)
        phase.series.append((loop.time() - start, (sent - t0) * 1000, whole))

    tasks = []
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # the schedule of an open-loop load, not a wait
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    phase.cpu = (time.process_time() - cpu0) / max(loop.time() - start, 1e-9)
    phase.load = os.getloadavg()[0]


async def reader_cost(store: PostgresEventStore, n: int, rounds: int) -> str:
    """``store.head()`` against the former single statement (the snapshot's xmin as the
    horizon, no lock table), on the same pool, interleaved: µs per call and the median of
    the per-round ratios."""
    table = f'"{store.schema}"."{store.table}"'
    former = (
        f"SELECT coalesce(max(position), 0) FROM {table} "
        "WHERE position < (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 20)"
    )

    async def old(count: int) -> None:
        for _ in range(count):
            async with store.pool.acquire() as conn:
                await conn.fetchval(former)

    async def new(count: int) -> None:
        for _ in range(count):
            await store.head()

    ratios: list[float] = []
    per_call: dict[str, list[float]] = {"old": [], "new": []}
    await old(n // 10)
    await new(n // 10)
    for i in range(rounds):
        took = {}
        for fn in (old, new) if i % 2 == 0 else (new, old):
            t0 = time.perf_counter()
            await fn(n)
            took[fn] = time.perf_counter() - t0
        ratios.append(took[new] / took[old])
        per_call["old"].append(took[old] / n * 1e6)
        per_call["new"].append(took[new] / n * 1e6)
    return (
        f"**{statistics.median(ratios):.2f}×** ({statistics.median(per_call['new']):.0f} µs "
        f"against {statistics.median(per_call['old']):.0f} µs per call)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rate", type=float, default=200.0, help="commands per second")
    parser.add_argument("--hold", type=float, default=60.0, help="seconds held open")
    parser.add_argument("--quiet", type=float, default=20.0, help="seconds per quiet phase")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument(
        "--read-models",
        choices=["schema", "database"],
        default="schema",
        help="read models in another schema of the log's database, or in another database",
    )
    parser.add_argument(
        "--held-in",
        choices=["both", "other", "same"],
        default="both",
        help="where the transactions are held: another database, this one, or both",
    )
    parser.add_argument(
        "--reads", type=int, default=2000, help="head() calls per round of the reader cost"
    )
    args = parser.parse_args()
    suffix = uuid.uuid4().hex[:10]
    ws, rs = f"bench_w_{suffix}", f"bench_r_{suffix}"
    store = await PostgresEventStore.open(args.dsn, schema=ws, encoder=serializer.encode)
    read_dsn, read_name = args.dsn, None
    if args.read_models == "database":
        read_name = f"cqrskit_bench_r_{suffix}"
        admin = await asyncpg.connect(args.dsn)
        await admin.execute(f'CREATE DATABASE "{read_name}"')
        await admin.close()
        read_dsn = args.dsn.rsplit("/", 1)[0] + "/" + read_name
    read_db = PostgresReadDatabase(read_dsn, schema=rs)
    registry = Registry()

    @registry.handler
    async def deposit(cmd: Deposit, uow: UnitOfWork) -> None:
        assert isinstance(uow, PostgresUnitOfWork)
        uow.record(cmd.account, Deposited(cmd.account, cmd.amount))

    @registry.handler
    async def get_balance(q: GetBalance, db: ReadSession) -> int | None:
        value = await db.fetchval("SELECT balance FROM accounts WHERE id = ?", q.account)
        return None if value is None else int(value)

    phases = [Phase("quiet"), Phase("held"), Phase("quiet again")]
    try:
        async with Projector(store, read_db, [balances], serializer) as projector:
            gate = ConsistencyGate(store, read_db, signal=projector.signal)
            deps = Dependencies()
            deps.scoped(ReadSession, read_db.session)
            mediator = Mediator(
                registry,
                resolver=[store.resolver(), deps],
                behaviors=[store.transaction(), for_queries(gate.behavior)],
            )
            await run_phase(mediator, Phase("warm-up"), args.rate, 2)
            quiet_cost = await reader_cost(store, args.reads, 5)
            await run_phase(mediator, phases[0], args.rate, args.quiet)
            async with held_transactions(args.dsn, ws, args.held_in):
                await run_phase(mediator, phases[1], args.rate, args.hold)
                held_cost = await reader_cost(store, args.reads, 5)
            await run_phase(mediator, phases[2], args.rate, args.quiet)
    finally:
        await read_db.close()
        await store.close()
        conn = await asyncpg.connect(args.dsn)
        for schema in (ws, rs):
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        if read_name is not None:
            await conn.execute(f'DROP DATABASE IF EXISTS "{read_name}" WITH (FORCE)')
        await conn.close()
    quiet = Phase("quiet", phases[0].latencies + phases[2].latencies)
    print("\n### P9 read-your-writes with other transactions held open\n")
    print(
        f"Python {sys.version.split()[0]}, {args.rate:g} commands/s, held {args.hold:g} s "
        f"({args.held_in}), quiet phases {args.quiet:g} s each, read models in another "
        f"{args.read_models}\n"
    )
    print(
        "| phase | samples | p50 ms | p99 ms | max ms | stale reads | client CPU | load |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for p in phases:
        print(p.row())
    ratio = phases[1].pct(0.99) / quiet.pct(0.99) if quiet.latencies else float("nan")
    median = statistics.median(quiet.latencies) if quiet.latencies else float("nan")
    print(f"\nheld p99 / quiet p99: **{ratio:.2f}×** (quiet median {median:.1f} ms)")
    print(
        "\nreader cost, head() / the former xmin-only statement, median of 5 rounds of "
        f"{args.reads}: quiet {quiet_cost}, with the transactions held {held_cost} (the "
        "former one then reads nothing new)"
    )
    if args.json:
        _write_json(args.json, phases)


def _write_json(path: str, phases: list[Phase]) -> None:
    rows = [
        {
            "phase": p.name,
            "samples": len(p.latencies),
            "p50_ms": p.pct(0.5),
            "p99_ms": p.pct(0.99),
            "stale": p.stale,
            "series": [[round(x, 4) for x in row] for row in p.series],
        }
        for p in phases
    ]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    asyncio.run(main())
