"""Projector processes: SIGKILLed at named points of a batch, competing, paused past the lease."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from tests.support.bank import Deposited
from tests.support.faults import check_invariants, send_signal
from tests.support.processes import (
    invariants,
    read_state,
    read_trace,
    start_projector,
    stop,
    until_refused_or_committed,
    until_state,
    until_stopped,
    until_trace,
)
from tests.support.sqlite_log import SqliteTestLog

from cqrskit.sqlite.readdb import _write_lock_holder

pytestmark = pytest.mark.slow

CLEAN = {"lost": 0, "double": 0, "reordered": 0, "wrong_sum": 0}


async def write(log: SqliteTestLog, rng: random.Random, count: int) -> int:
    last = 0
    for _ in range(count):
        account = f"acc-{rng.randrange(6)}"
        [e] = await log.append(account, Deposited(account, rng.randrange(1, 100)))
        last = e.position
    return last


POINTS = (
    "projector.applied",  # inside the read-database transaction: batch applied
    "projector.checkpointed",  # inside: checkpoint raised, COMMIT not yet sent
    "projector.before_commit",  # batch read, transaction not begun
    "projector.committed",  # transaction committed, nothing announced yet
)
COMMITTED = {"projector.committed"}


async def test_sigkill_at_crash_points(tmp_path: Path) -> None:
    """SIGKILL projector processes held at named points of a batch (most of them inside the
    read-database transaction, with the batch applied and not committed); each kill is
    checked to have landed there, and the read model is exact afterwards."""
    rng = random.Random(int(os.environ.get("CQRSKIT_SEED", "20261126")))
    log = SqliteTestLog(tmp_path / "write.db")
    read_path = str(tmp_path / "read.db")
    landed: Counter[str] = Counter()
    deadline = time.monotonic() + 90
    try:
        for i in range(32):
            if time.monotonic() > deadline:
                break
            point, nth = POINTS[i % len(POINTS)], rng.randrange(1, 4)
            await write(log, rng, rng.randrange(22, 30))  # >= 3 batches of 7 to apply
            trace = tmp_path / f"trace-{i}"
            proc = start_projector(
                log.path,
                read_path,
                owner=f"p{i}",
                lease_ttl=0.1,  # one process at a time: the dead one's lease expires soon
                failpoint=f"{point}:{nth}:hold",
                trace=trace,
            )
            try:
                _, _, first, last = await until_trace(proc, trace, point, nth)
            finally:
                stop(proc)
            checkpoint = read_state(read_path)[0]
            if point in COMMITTED:
                assert checkpoint >= last, (point, checkpoint, last)
            else:  # the kill landed before this batch committed: none of it is visible
                assert checkpoint < first, (point, checkpoint, first)
            landed[point] += 1
        head = await write(log, rng, 50)
        final = start_projector(log.path, read_path, owner="final")
        try:
            await until_state(read_path, lambda s: s[0] >= head)
        finally:
            assert stop(final, signal.SIGTERM) == 0
    finally:
        log.close()
    assert landed["projector.applied"] >= 5, landed
    assert landed["projector.checkpointed"] >= 5, landed
    assert sum(landed.values()) >= 20, landed
    result = check_invariants("sqlite-sigkill-crash-points", invariants(log.path, read_path))
    assert result == CLEAN


async def test_competing_processes_one_leader_and_takeover(tmp_path: Path) -> None:
    rng = random.Random(7)
    log = SqliteTestLog(tmp_path / "write.db")
    read_path = str(tmp_path / "read.db")
    procs = {
        name: start_projector(log.path, read_path, owner=name, lease_ttl=0.5) for name in ("a", "b")
    }
    try:
        head = await write(log, rng, 150)
        _, leader, epoch = await until_state(read_path, lambda s: s[0] >= head and s[1])
        assert leader in procs
        other = "b" if leader == "a" else "a"
        # pause the leader past its lease: the standby takes over, the paused one is fenced
        send_signal(procs[leader], signal.SIGSTOP)
        head = await write(log, rng, 60)
        await until_state(read_path, lambda s: s[0] >= head and s[1] == other)
        send_signal(procs[leader], signal.SIGCONT)
        head = await write(log, rng, 60)
        _, owner, epoch2 = await until_state(read_path, lambda s: s[0] >= head)
        assert epoch2 > epoch
        assert invariants(log.path, read_path) == CLEAN
        # kill whoever leads now; the other one finishes the work
        current = owner or other
        stop(procs[current])
        survivor = "b" if current == "a" else "a"
        head = await write(log, rng, 60)
        await until_state(read_path, lambda s: s[0] >= head and s[1] == survivor)
    finally:
        for proc in procs.values():
            send_signal(proc, signal.SIGCONT)
            stop(proc, signal.SIGTERM)
        log.close()
    assert check_invariants("sqlite-competing", invariants(log.path, read_path)) == CLEAN


async def test_paused_leader_is_fenced_at_commit(tmp_path: Path) -> None:
    """A leader stopped (SIGSTOP) with a batch in hand, before its commit transaction, is
    resumed after a standby took over: its commit is refused by the fence, nothing is
    applied twice."""
    rng = random.Random(3)
    log = SqliteTestLog(tmp_path / "write.db")
    read_path = str(tmp_path / "read.db")
    trace = tmp_path / "trace-leader"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        head = await write(log, rng, 40)
        leader = start_projector(
            log.path,
            read_path,
            owner="L",
            lease_ttl=0.5,
            failpoint="projector.before_commit:2:stop",
            trace=trace,
        )
        procs.append(leader)
        await until_stopped(leader)
        _, epoch, first, _ = [t for t in read_trace(trace) if t[0] == "projector.before_commit"][1]
        assert read_state(read_path)[:3] == (first - 1, "L", epoch)  # batch 1 committed only
        procs.append(start_projector(log.path, read_path, owner="S", lease_ttl=0.5))
        _, _, taken = await until_state(read_path, lambda s: s[0] >= head and s[1] == "S")
        assert taken > epoch
        leader_log = Path(read_path).with_name("projector-L.log")
        since = leader_log.stat().st_size
        send_signal(leader, signal.SIGCONT)
        refused, steps = await until_refused_or_committed(leader_log, since, trace)
        assert steps == []  # nothing of the stale batch was applied, checkpointed, committed
        assert refused
        head = await write(log, rng, 20)
        await until_state(read_path, lambda s: s[0] >= head and s[1] == "S")
    finally:
        for proc in procs:
            send_signal(proc, signal.SIGCONT)
            stop(proc, signal.SIGTERM)
        log.close()
    result = check_invariants("sqlite-paused-leader-fenced", invariants(log.path, read_path))
    assert result == CLEAN

    assert invariants(log.path, read_path) == CLEAN


async def test_sigstop_mid_transaction_standby_takes_over(tmp_path: Path) -> None:
    """A leader frozen (SIGSTOP) inside its batch transaction holds SQLite's write lock,
    which nothing but its end frees: once the lease expired, the standby sees (in
    /proc/locks) that the lease holder holds the lock and ends it with SIGKILL, then takes
    over within lease_ttl + a poll; the frozen transaction never commits."""
    ttl = 1.0
    rng = random.Random(9)
    log = SqliteTestLog(tmp_path / "write.db")
    read_path = str(tmp_path / "read.db")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        slow = {"CQRSKIT_TEST_SLOW_APPLY": "0.05"}  # each event's handler awaits 50 ms
        procs["a"] = start_projector(log.path, read_path, owner="a", lease_ttl=ttl, env=slow)
        head = await write(log, rng, 10)
        await until_state(read_path, lambda s: s[0] >= head and s[1] == "a")
        procs["b"] = start_projector(log.path, read_path, owner="b", lease_ttl=ttl)
        head = await write(log, rng, 200)  # about 10 s of slowed batches for "a"
        deadline = time.monotonic() + 20
        while _write_lock_holder(read_path) != procs["a"].pid:
            assert time.monotonic() < deadline, "the leader never held a batch open"
            await asyncio.sleep(0.002)
        send_signal(procs["a"], signal.SIGSTOP)
        stopped = time.monotonic()
        # the fault landed mid-transaction: the frozen leader still holds the write lock
        assert _write_lock_holder(read_path) == procs["a"].pid, "SIGSTOP missed the batch"
        await until_state(read_path, lambda s: s[1] == "b", timeout=30)
        took = time.monotonic() - stopped
        print(f"takeover {took:.2f}s after SIGSTOP (lease_ttl {ttl}s)")
        assert took < ttl + ttl / 4 + 5.0, took  # the bound, plus slack for a loaded host
        assert procs["a"].wait(timeout=10) == -signal.SIGKILL  # ended by the standby
        await until_state(read_path, lambda s: s[0] >= head and s[1] == "b", timeout=60)
        head = await write(log, rng, 20)
        await until_state(read_path, lambda s: s[0] >= head, timeout=60)
    finally:
        for proc in procs.values():
            send_signal(proc, signal.SIGCONT)
            stop(proc, signal.SIGTERM)
        log.close()
    assert check_invariants("sqlite-sigstop-takeover", invariants(log.path, read_path)) == CLEAN
