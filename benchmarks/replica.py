"""P8 and the replication mode's other figures, on a throw-away primary with two streaming
standbys on loopback (tests/support/pg_replicas.py; needs the PostgreSQL server binaries).

tokens   Which proof that a standby replayed a command: for commits made while a background
         writer keeps the primary busy, the time from the commit's return until the standby
         proves it by (a) the event row being visible, (b) its replay LSN passing the LSN
         read right after the commit, (c) the xid being below the standby snapshot's xmin —
         without and with a write transaction left open on the primary. Also what a standby's
         ``pg_current_snapshot()`` says about an open transaction, and the write-path cost of
         carrying an LSN in the token (a tracked commit with one more NOTICE in its round
         trip, against the same commit without: ratio of times, interleaved rounds).
p8       Read-your-writes at a fixed command rate (default 500/s): each command's
         ``send_tracked`` is followed by its query with the token; latency from the
         command's return to the query's return, p50/p99, with the queries on 0 (the
         primary), 1 and 2 replicas.
mix      Query throughput of a read-heavy mix (default 90 % queries without a token, 10 %
         commands) from concurrent clients, with 0, 1 and 2 replicas beside the primary, in
         interleaved rounds; ratio to 0 replicas per round; and the router's own cost: the
         router with no replica against a plain PostgresReadDatabase on the primary.

Run: ``python benchmarks/replica.py [--rate 500] [--samples 2000] [--rounds 5] [--json f]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, ROOT)

import asyncpg  # noqa: E402
from tests.support.pg_replicas import PgCluster  # noqa: E402
from tests.support.replica_app import (  # noqa: E402
    Deposit,
    GetAccount,
    ReplicaApp,
    open_replica_app,
    registry,
)

from cqrskit import Dependencies, Mediator  # noqa: E402
from cqrskit.postgres import PostgresReadDatabase  # noqa: E402
from cqrskit.projections import ReadSession, ask_consistent  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(values: list[float]) -> str:
    return f"p50 {pct(values, 0.5) * 1e3:.2f} ms, p99 {pct(values, 0.99) * 1e3:.2f} ms"


# -- tokens --------------------------------------------------------------------------------


async def _busy(dsn: str, stop: asyncio.Event, first: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        n = first
        while not stop.is_set():
            n -= 1
            await conn.execute("INSERT INTO bench_t VALUES ($1, 0)", n)
    finally:
        await conn.close()


async def tokens(cluster: PgCluster, samples: int, out: dict[str, Any]) -> None:
    p = await asyncpg.connect(cluster.primary.dsn)
    s = await asyncpg.connect(cluster.standbys[0].dsn)
    await p.execute(
        "DROP TABLE IF EXISTS bench_t; CREATE TABLE bench_t (id bigint PRIMARY KEY, x int)"
    )
    # what a standby's snapshot says about a transaction still open on the primary
    holder = await asyncpg.connect(cluster.primary.dsn)
    await holder.execute("BEGIN")
    open_xid = await holder.fetchval(
        "INSERT INTO bench_t VALUES (-1, 0) RETURNING pg_current_xact_id()::text::bigint"
    )
    await p.execute("INSERT INTO bench_t VALUES (-2, 0)")
    lsn = await p.fetchval("SELECT pg_current_wal_insert_lsn()")
    for _ in range(10_000):  # waiting (bounded) for the standby to replay it
        if await s.fetchval("SELECT pg_last_wal_replay_lsn() >= $1", lsn):
            break
        await asyncio.sleep(0.001)
    snap_s = await s.fetchval("SELECT pg_current_snapshot()::text")
    snap_p = await p.fetchval("SELECT pg_current_snapshot()::text")
    says_visible = await s.fetchval(
        "SELECT pg_visible_in_snapshot($1::text::xid8, pg_current_snapshot())", str(open_xid)
    )
    row_visible = await s.fetchval("SELECT count(*) FROM bench_t WHERE id = -1")
    await holder.execute("ROLLBACK")
    print(
        f"\nopen transaction {open_xid} on the primary: primary snapshot {snap_p}, standby "
        f"snapshot {snap_s}; pg_visible_in_snapshot on the standby says {says_visible}, its "
        f"row visible there: {bool(row_visible)}"
    )
    out["snapshot"] = {
        "primary": snap_p,
        "standby": snap_s,
        "visible_in_snapshot": says_visible,
        "row_visible": bool(row_visible),
    }
    for long_open in (False, True):
        stop = asyncio.Event()
        first = -10_000_000 * (2 + long_open)
        busy = asyncio.ensure_future(_busy(cluster.primary.dsn, stop, first))
        if long_open:
            await holder.execute("BEGIN")
            await holder.execute("INSERT INTO bench_t VALUES (-3, 0)")
        found: dict[str, list[float]] = {"row": [], "lsn": [], "xmin": []}
        never = dict.fromkeys(found, 0)
        count = samples if not long_open else max(20, samples // 20)
        base = (1 + long_open) * 10_000_000
        for i in range(count):
            await p.execute("BEGIN")
            xid = await p.fetchval(
                "INSERT INTO bench_t VALUES ($1, 1) RETURNING pg_current_xact_id()::text::bigint",
                base + i,
            )
            await p.execute("COMMIT")
            t0 = time.perf_counter()
            lsn = await p.fetchval("SELECT pg_current_wal_insert_lsn()")
            got: dict[str, float] = {}
            while len(got) < 3 and time.perf_counter() - t0 < 0.2:
                row = await s.fetchrow(
                    "SELECT EXISTS (SELECT 1 FROM bench_t WHERE id = $1), "
                    "pg_last_wal_replay_lsn() >= $2, "
                    "$3 < pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                    base + i, lsn, xid,
                )  # fmt: skip
                now = time.perf_counter() - t0
                for key, ok in zip(("row", "lsn", "xmin"), row, strict=True):
                    if ok and key not in got:
                        got[key] = now
            for key in found:
                if key in got:
                    found[key].append(got[key])
                else:
                    never[key] += 1
        stop.set()
        await busy
        if long_open:
            await holder.execute("ROLLBACK")
        label = "with a write transaction open" if long_open else "no long transaction"
        print(f"\ncommit → provable on the standby ({label}, {count} commits, busy primary):")
        for key, values in found.items():
            text = ms(values) if values else "—"
            print(f"  {key:5s} {text}; not within 200 ms: {never[key]}")
        out[f"prove_{'long' if long_open else 'quiet'}"] = {
            k: {"p50": pct(v, 0.5) if v else None, "p99": pct(v, 0.99) if v else None,
                "never": never[k]} for k, v in found.items()
        }  # fmt: skip
    await holder.close()
    # the write-path cost of an LSN in the token: one more NOTICE in the commit round trip
    report = "DO $$BEGIN RAISE NOTICE 'x%', txid_current(); END$$; "
    lsn_notice = "; DO $$BEGIN RAISE NOTICE 'l%', pg_current_wal_insert_lsn(); END$$"
    conn = await asyncpg.connect(cluster.primary.dsn)
    conn.add_log_listener(lambda *a: None)
    counter = [0]

    async def commits(extra: str, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            counter[0] += 1
            await conn.execute(
                f"BEGIN; INSERT INTO bench_t VALUES ({30_000_000 + counter[0]}, 1); "
                f"{report}COMMIT{extra}"
            )
        return (time.perf_counter() - start) / n

    await commits("", 200)
    ratios = []
    for r in range(9):
        a, b = ("", lsn_notice) if r % 2 == 0 else (lsn_notice, "")
        ta, tb = await commits(a, 300), await commits(b, 300)
        base_t, with_t = (ta, tb) if a == "" else (tb, ta)
        ratios.append(with_t / base_t)
    await conn.close()
    print(
        f"\ntracked commit with the LSN carried too: {statistics.median(ratios):.2f}× the time "
        f"(median of {len(ratios)} interleaved rounds, min {min(ratios):.2f}, "
        f"max {max(ratios):.2f})"
    )
    out["lsn_write_cost_ratio"] = statistics.median(ratios)
    await p.close()
    await s.close()


# -- P8: read-your-writes at a fixed rate --------------------------------------------------


async def paced(app: ReplicaApp, rate: float, samples: int, clients: int) -> dict[str, Any]:
    visible: list[float] = []
    commands: list[float] = []
    sources: dict[str, int] = {}
    late = 0
    next_op = 0
    prefix = uuid.uuid4().hex[:6]
    start = time.perf_counter() + 0.05

    async def client(k: int) -> None:
        nonlocal next_op, late
        n = 0
        while True:
            op = next_op
            if op >= samples:
                return
            next_op += 1
            delay = start + op / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the command rate's schedule
            elif delay < -0.005:
                late += 1
            t0 = time.perf_counter()
            receipt = await app.mediator.send_tracked(Deposit(f"{prefix}{k}", 1))
            t1 = time.perf_counter()
            n += 1
            assert receipt.token is not None
            got = await ask_consistent(app.mediator, GetAccount(f"{prefix}{k}"), receipt.token)
            visible.append(time.perf_counter() - t1)
            commands.append(t1 - t0)
            if got.value is None or got.value[1] < n:
                raise AssertionError("stale read")

    began = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    elapsed = time.perf_counter() - began
    for r in app.router.status().replicas:
        sources[r.name] = r.queries
    sources["primary"] = app.router.status().primary_queries
    return {
        "visible": visible, "commands": commands, "rate": samples / elapsed, "late": late,
        "sources": sources,
    }  # fmt: skip


async def p8(cluster: PgCluster, rate: float, samples: int, out: dict[str, Any]) -> None:
    print(
        f"\nP8 read-your-writes at {rate:g} commands/s ({samples} commands per case; latency "
        "from send_tracked's return to the token query's return):\n"
    )
    print("| queries on | visible p50 | visible p99 | command p50 | achieved rate | sessions |")
    print("|---|---|---|---|---|---|")
    for count in (0, 1, 2):
        schema = f"bench_{uuid.uuid4().hex[:8]}"
        dsns = [s.dsn for s in cluster.standbys[:count]]
        app = await open_replica_app(cluster.primary.dsn, dsns, schema)
        try:
            await paced(app, rate, min(200, samples), 8)  # warm-up
            app.router._primary.queries = 0
            for r in app.router._replicas:
                r.queries = 0
            res = await paced(app, rate, samples, 8)
        finally:
            await app.close()
            await drop(cluster, schema)
        where = "the primary" if count == 0 else f"{count} replica{'s' * (count > 1)}"
        v = res["visible"]
        print(
            f"| {where} | {pct(v, 0.5) * 1e3:.2f} ms | {pct(v, 0.99) * 1e3:.2f} ms | "
            f"{pct(res['commands'], 0.5) * 1e3:.2f} ms | {res['rate']:.0f}/s | {res['sources']} |"
        )
        out[f"p8_{count}"] = {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "rate": res["rate"],
                              "late": res["late"], "sources": res["sources"]}  # fmt: skip


# -- read-heavy throughput -------------------------------------------------------------------


async def mix_round(
    mediator: Mediator, seconds: float, clients: int, writes: float, accounts: int
) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds
    rng = random.Random(7)

    async def client(k: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < stop_at:
            if rng.random() < writes:
                n += 1  # each client writes its own accounts: no write conflicts
                await mediator.send(Deposit(f"w{k}-{n % 20}", 1))
            else:
                await mediator.ask(GetAccount(f"a{rng.randrange(accounts)}"))
            done += 1

    results = await asyncio.gather(*(client(k) for k in range(clients)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return done / seconds


async def mix(
    cluster: PgCluster, rounds: int, seconds: float, clients: int, out: dict[str, Any]
) -> None:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    apps = {}
    for count in (0, 1, 2):
        dsns = [s.dsn for s in cluster.standbys[:count]]
        apps[count] = await open_replica_app(cluster.primary.dsn, dsns, schema, pool_size=clients)
    # the router's own cost: the same query handler on a plain PostgresReadDatabase
    plain_db = PostgresReadDatabase(cluster.primary.dsn, schema=schema, max_size=clients)
    deps = Dependencies()
    deps.scoped(ReadSession, plain_db.session)
    plain = Mediator(registry, behaviors=[apps[0].store.transaction()],
                     resolver=[apps[0].store.resolver(), deps])  # fmt: skip
    try:
        for i in range(200):
            await apps[0].mediator.send(Deposit(f"a{i}", 1))
        cases: dict[str, Callable[[], Awaitable[float]]] = {
            "plain": lambda: mix_round(plain, seconds, clients, 0.1, 200),
            **{str(c): (lambda c=c: mix_round(apps[c].mediator, seconds, clients, 0.1, 200))
               for c in (0, 1, 2)},
        }  # fmt: skip
        for fn in cases.values():
            await fn()  # warm-up: connections opened, statements prepared
        rates: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(rounds):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for key in order:
                rates[key].append(await cases[key]())
    finally:
        await plain_db.close()
        for app in apps.values():
            await app.close()
        await drop(cluster, schema)
    base = rates["0"]
    print(
        f"\nread-heavy mix (90 % queries without a token, 10 % commands; {clients} clients, "
        f"{rounds} interleaved rounds of {seconds:g} s):\n"
    )
    print("| queries on | operations/s median (min–max) | ratio to 0 replicas (median of rounds) |")
    print("|---|---|---|")
    labels = {
        "plain": "the primary, plain PostgresReadDatabase",
        "0": "the primary, through the router",
        "1": "1 replica",
        "2": "2 replicas",
    }
    for key, values in rates.items():
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        print(
            f"| {labels[key]} | {statistics.median(values):,.0f} ({min(values):,.0f}–"
            f"{max(values):,.0f}) | {ratio:.2f}× |"
        )
        out[f"mix_{key}"] = {"median": statistics.median(values), "ratio": ratio}


async def drop(cluster: PgCluster, schema: str) -> None:
    conn = await asyncpg.connect(cluster.primary.dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rate", type=float, default=500.0, help="P8 commands per second")
    parser.add_argument("--samples", type=int, default=2000, help="P8 commands per case")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved mix rounds")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of a mix round")
    parser.add_argument("--clients", type=int, default=16, help="mix clients")
    parser.add_argument("--only", choices=["tokens", "p8", "mix"], help="run one part")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    out: dict[str, Any] = {}
    try:
        cluster = PgCluster(standbys=2).start()
    except RuntimeError as exc:  # no server binaries on this machine
        print(f"benchmarks/replica.py skipped: {exc}")
        return
    try:
        if args.only in (None, "tokens"):
            await tokens(cluster, min(args.samples, 500), out)
        if args.only in (None, "p8"):
            await p8(cluster, args.rate, args.samples, out)
        if args.only in (None, "mix"):
            await mix(cluster, args.rounds, args.seconds, args.clients, out)
    finally:
        cluster.close()
    print(
        f"\nPython {sys.version.split()[0]} on {sys.platform}, load average "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    if args.json:
        write_json(args.json, out)


def write_json(path: str, out: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    asyncio.run(main())
