"""Projector processes on PostgreSQL: SIGKILLed at random points, and two competing."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from tests.support.bank import Deposited
from tests.support.pg_log import PgTestLog, open_pg_log
from tests.support.processes import spawn
from tests.support.waiting import visible

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CLEAN = {"lost": 0, "double": 0, "reordered": 0, "wrong_sum": 0}


def start(
    dsn: str,
    write: str,
    read: str,
    owner: str,
    tmp: Path,
    *,
    ttl: float = 0.5,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    return spawn(
        ["--store", "tests.support.pg_log:from_env", "--read", dsn, "--schema", read, "--listen"],
        {"CQRSKIT_TEST_PG_DSN": dsn, "CQRSKIT_TEST_PG_SCHEMA": write, **(env or {})},
        tmp / f"projector-{owner}.log",
        owner,
        lease_ttl=ttl,
        batch_size=7,
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=20)


async def state(dsn: str, read: str) -> tuple[int, str | None, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            f'SELECT c.position, p.lease_owner, p.lease_epoch FROM "{read}".cqrskit_projections p '
            f'JOIN "{read}".cqrskit_checkpoints c ON c.projection = p.name '
            "AND c.generation = p.active_generation WHERE p.name = 'balances'"
        )
    except asyncpg.UndefinedTableError:
        return (0, None, 0)
    finally:
        await conn.close()
    return (int(row[0]), row[1], int(row[2])) if row else (0, None, 0)


async def until(
    dsn: str, read: str, check: Callable[[tuple[int, str | None, int]], bool], timeout: float = 30
) -> tuple[int, str | None, int]:
    deadline = time.monotonic() + timeout
    while True:
        s = await state(dsn, read)
        if check(s):
            return s
        assert time.monotonic() < deadline, f"state {s} not reached in {timeout}s"
        await asyncio.sleep(0.02)


async def write(log: PgTestLog, rng: random.Random, count: int) -> int:
    last = 0
    for _ in range(count):
        account = f"acc-{rng.randrange(6)}"
        [e] = await log.append(account, Deposited(account, rng.randrange(1, 100)))
        last = e.position
    await visible(log, last)
    return last


async def invariants(dsn: str, write_schema: str, read: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        expected = {
            r[0]: (int(r[1]), int(r[2]))
            for r in await conn.fetch(
                "SELECT stream, sum((data::jsonb ->> 'amount')::bigint), count(*) "
                f'FROM "{write_schema}".cqrskit_events GROUP BY stream'
            )
        }
        got = {
            r[0]: (int(r[1]), int(r[2]))
            for r in await conn.fetch(f'SELECT id, balance, applied FROM "{read}".accounts')
        }
        reordered = await conn.fetchval(f'SELECT count(*) FROM "{read}".order_errors')
    finally:
        await conn.close()
    lost = sum(max(0, e[1] - got.get(s, (0, 0))[1]) for s, e in expected.items())
    double = sum(max(0, g[1] - expected.get(s, (0, 0))[1]) for s, g in got.items())
    wrong = sum(1 for s, e in expected.items() if got.get(s, (0, 0))[0] != e[0])
    return {"lost": lost, "double": double, "reordered": int(reordered), "wrong_sum": wrong}


async def test_sigkill_and_competition(
    postgres_dsn: str, schemas: Callable[[str], str], tmp_path: Path
) -> None:
    write_schema, read = schemas("w"), schemas("r")
    # the writer NOTIFYs, the projector processes LISTEN (--listen): cross-process wake-ups
    log = await open_pg_log(postgres_dsn, write_schema, notify=True)
    try:
        await run_scenario(postgres_dsn, write_schema, read, log, tmp_path)
    finally:
        await log.close()
    assert await invariants(postgres_dsn, write_schema, read) == CLEAN


async def run_scenario(
    postgres_dsn: str, write_schema: str, read: str, log: PgTestLog, tmp_path: Path
) -> None:
    rng = random.Random(11)
    await write(log, rng, 100)
    kills = 0
    deadline = time.monotonic() + 60
    for i in range(8):
        if time.monotonic() > deadline:
            break
        owner = f"p{i}"
        proc = start(postgres_dsn, write_schema, read, owner, tmp_path)
        try:
            before = (await until(postgres_dsn, read, lambda s: True))[0]
            await write(log, rng, rng.randrange(20, 60))
            await until(postgres_dsn, read, lambda s, b=before, o=owner: s[0] > b and s[1] == o)
            time.sleep(rng.uniform(0, 0.02))
        finally:
            stop(proc)
        kills += 1
    # two competing processes: one leads, the other takes over when it is killed
    procs = {n: start(postgres_dsn, write_schema, read, n, tmp_path) for n in ("a", "b")}
    try:
        head = await write(log, rng, 40)
        _, leader, _ = await until(postgres_dsn, read, lambda s: s[0] >= head and s[1] in procs)
        assert leader is not None
        stop(procs[leader])
        survivor = "b" if leader == "a" else "a"
        head = await write(log, rng, 40)
        await until(postgres_dsn, read, lambda s: s[0] >= head and s[1] == survivor)
    finally:
        for proc in procs.values():
            stop(proc, signal.SIGTERM)
    assert kills >= 4


async def _in_transaction(dsn: str, read: str) -> set[int]:
    """Backends holding a write transaction open on the read schema (idle inside it)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction' "
            "AND backend_xid IS NOT NULL AND query LIKE $1",
            f'%"{read}"%',
        )
    finally:
        await conn.close()
    return {int(r[0]) for r in rows}


async def test_sigstop_mid_transaction_standby_takes_over(
    postgres_dsn: str, schemas: Callable[[str], str], tmp_path: Path
) -> None:
    """A leader frozen (SIGSTOP) inside its batch transaction holds the lease row's lock:
    the server ends its session after lease_ttl idle, the standby takes over within
    lease_ttl + a poll, and the frozen one, resumed, commits nothing (0 double-applied)."""
    write_schema, read = schemas("w"), schemas("r")
    ttl = 1.0
    log = await open_pg_log(postgres_dsn, write_schema, notify=True)
    slow = {"CQRSKIT_TEST_SLOW_APPLY": "0.05"}  # each event's handler awaits 50 ms
    procs: dict[str, subprocess.Popen[bytes]] = {}
    rng = random.Random(5)
    try:
        procs["a"] = start(postgres_dsn, write_schema, read, "a", tmp_path, ttl=ttl, env=slow)
        head = await write(log, rng, 10)
        await until(postgres_dsn, read, lambda s: s[0] >= head and s[1] == "a")
        procs["b"] = start(postgres_dsn, write_schema, read, "b", tmp_path, ttl=ttl)
        head = await write(log, rng, 200)  # about 10 s of slowed batches for "a"
        deadline = time.monotonic() + 20
        while not await _in_transaction(postgres_dsn, read):
            assert time.monotonic() < deadline, "the leader never held a batch open"
            await asyncio.sleep(0.005)
        procs["a"].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        # the fault landed mid-transaction: the frozen leader's transaction is still open
        assert await _in_transaction(postgres_dsn, read), "SIGSTOP missed the transaction"
        await until(postgres_dsn, read, lambda s: s[1] == "b", timeout=30)
        took = time.monotonic() - stopped
        print(f"takeover {took:.2f}s after SIGSTOP (lease_ttl {ttl}s)")
        assert took < ttl + ttl / 4 + 5.0, took  # the bound, plus slack for a loaded host
        await until(postgres_dsn, read, lambda s: s[0] >= head and s[1] == "b", timeout=60)
        procs["a"].send_signal(signal.SIGCONT)
        head = await write(log, rng, 20)
        await until(postgres_dsn, read, lambda s: s[0] >= head, timeout=60)
        assert (await state(postgres_dsn, read))[1] == "b"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            stop(proc, signal.SIGTERM)
        await log.close()
    assert await invariants(postgres_dsn, write_schema, read) == CLEAN
