"""Projector processes on PostgreSQL: SIGKILLed at named points of a batch, and two competing."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from tests.support.bank import Deposited
from tests.support.faults import check_invariants, send_signal
from tests.support.pg_log import PgTestLog, invariants, open_pg_log
from tests.support.processes import (
    read_trace,
    spawn,
    stop,
    until_refused_or_committed,
    until_stopped,
    until_trace,
)
from tests.support.waiting import visible

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CLEAN = {"lost": 0, "double": 0, "reordered": 0, "wrong_sum": 0}
POINTS = (
    "projector.applied",  # inside the read-database transaction: batch applied
    "projector.checkpointed",  # inside: checkpoint raised, COMMIT not yet sent
    "projector.before_commit",  # batch read, transaction not begun
    "projector.committed",  # transaction committed, nothing announced yet
)
COMMITTED = {"projector.committed"}


def start(
    dsn: str,
    write: str,
    read: str,
    owner: str,
    tmp: Path,
    *,
    lease_ttl: float = 0.5,
    failpoint: str | None = None,
    trace: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    return spawn(
        ["--store", "tests.support.pg_log:from_env", "--read", dsn, "--schema", read, "--listen"],
        {"CQRSKIT_TEST_PG_DSN": dsn, "CQRSKIT_TEST_PG_SCHEMA": write, **(env or {})},
        tmp / f"projector-{owner}.log",
        owner,
        lease_ttl=lease_ttl,
        batch_size=7,
        failpoint=failpoint,
        trace=trace,
    )


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
    """``count`` deposits over six accounts, a few per commit (fewer round trips)."""
    last = 0
    while count > 0:
        account, n = f"acc-{rng.randrange(6)}", min(count, rng.randrange(1, 6))
        stored = await log.append(
            account, *(Deposited(account, rng.randrange(1, 100)) for _ in range(n))
        )
        last, count = stored[-1].position, count - n
    await visible(log, last)
    return last


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
    result = await invariants(postgres_dsn, write_schema, read)
    assert check_invariants("postgres-sigkill-crash-points", result) == CLEAN


async def run_scenario(
    postgres_dsn: str, write_schema: str, read: str, log: PgTestLog, tmp_path: Path
) -> None:
    rng = random.Random(11)
    landed: Counter[str] = Counter()
    deadline = time.monotonic() + 90
    for i in range(20):
        if time.monotonic() > deadline:
            break
        point, nth = POINTS[i % len(POINTS)], rng.randrange(1, 4)
        await write(log, rng, rng.randrange(22, 30))  # >= 3 batches of 7 to apply
        trace = tmp_path / f"trace-{i}"
        proc = start(
            postgres_dsn,
            write_schema,
            read,
            f"p{i}",
            tmp_path,
            lease_ttl=0.1,  # one process at a time: the dead one's lease expires soon
            failpoint=f"{point}:{nth}:hold",
            trace=trace,
        )
        try:
            _, _, first, last = await until_trace(proc, trace, point, nth)
        finally:
            stop(proc)
        checkpoint = (await state(postgres_dsn, read))[0]
        if point in COMMITTED:
            assert checkpoint >= last, (point, checkpoint, last)
        else:  # the kill landed before this batch committed: none of it is visible
            assert checkpoint < first, (point, checkpoint, first)
        landed[point] += 1
    assert landed["projector.applied"] >= 3, landed
    assert landed["projector.checkpointed"] >= 3, landed
    assert sum(landed.values()) >= 12, landed
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


async def test_paused_leader_is_fenced_at_commit(
    postgres_dsn: str, schemas: Callable[[str], str], tmp_path: Path
) -> None:
    """A leader stopped (SIGSTOP) with a batch in hand, before its commit transaction, is
    resumed after a standby took over: its commit is refused by the fence, nothing is
    applied twice."""
    write_schema, read = schemas("w"), schemas("r")
    rng = random.Random(5)
    log = await open_pg_log(postgres_dsn, write_schema, notify=True)
    trace = tmp_path / "trace-leader"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        head = await write(log, rng, 40)
        leader = start(
            postgres_dsn,
            write_schema,
            read,
            "L",
            tmp_path,
            failpoint="projector.before_commit:2:stop",
            trace=trace,
        )
        procs.append(leader)
        await until_stopped(leader)
        _, epoch, first, _ = [t for t in read_trace(trace) if t[0] == "projector.before_commit"][1]
        checkpoint, owner, seen = await state(postgres_dsn, read)
        assert (owner, seen) == ("L", epoch)
        assert checkpoint < first  # batch 1 committed, the held batch not
        procs.append(start(postgres_dsn, write_schema, read, "S", tmp_path))
        _, _, taken = await until(postgres_dsn, read, lambda s: s[0] >= head and s[1] == "S")
        assert taken > epoch
        leader_log = tmp_path / "projector-L.log"
        since = leader_log.stat().st_size
        send_signal(leader, signal.SIGCONT)
        refused, steps = await until_refused_or_committed(leader_log, since, trace)
        assert steps == []  # nothing of the stale batch was applied, checkpointed, committed
        assert refused
        head = await write(log, rng, 20)
        await until(postgres_dsn, read, lambda s: s[0] >= head and s[1] == "S")
    finally:
        for proc in procs:
            send_signal(proc, signal.SIGCONT)
            stop(proc, signal.SIGTERM)
        await log.close()
    result = await invariants(postgres_dsn, write_schema, read)
    assert check_invariants("postgres-paused-leader-fenced", result) == CLEAN


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
        procs["a"] = start(postgres_dsn, write_schema, read, "a", tmp_path, lease_ttl=ttl, env=slow)
        head = await write(log, rng, 10)
        await until(postgres_dsn, read, lambda s: s[0] >= head and s[1] == "a")
        procs["b"] = start(postgres_dsn, write_schema, read, "b", tmp_path, lease_ttl=ttl)
        head = await write(log, rng, 200)  # about 10 s of slowed batches for "a"
        deadline = time.monotonic() + 20
        while not await _in_transaction(postgres_dsn, read):
            assert time.monotonic() < deadline, "the leader never held a batch open"
            await asyncio.sleep(0.005)
        send_signal(procs["a"], signal.SIGSTOP)
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
            send_signal(proc, signal.SIGCONT)
            stop(proc, signal.SIGTERM)
        await log.close()
    result = await invariants(postgres_dsn, write_schema, read)
    assert check_invariants("postgres-sigstop-takeover", result) == CLEAN
