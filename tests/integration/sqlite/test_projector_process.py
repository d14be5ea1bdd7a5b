"""Projector processes: SIGKILLed at random many times, competing, paused past the lease."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tests.support.bank import Deposited
from tests.support.processes import invariants, start_projector, until_state
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


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=20)


async def test_sigkill_at_random_points(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("CQRSKIT_SEED", "20261126")))
    log = SqliteTestLog(tmp_path / "write.db")
    read_path = str(tmp_path / "read.db")
    kills = 0
    deadline = time.monotonic() + 60
    try:
        await write(log, rng, 200)
        for i in range(12):
            if time.monotonic() > deadline:
                break
            owner = f"p{i}"
            proc = start_projector(log.path, read_path, owner=owner)
            try:
                before = (await until_state(read_path, lambda s: True))[0]
                await write(log, rng, rng.randrange(20, 80))
                # kill once it made progress, at a random moment inside its work
                await until_state(read_path, lambda s, b=before, o=owner: s[0] > b and s[1] == o)
                time.sleep(rng.uniform(0, 0.02))
            finally:
                stop(proc)
            kills += 1
        head = await write(log, rng, 50)
        final = start_projector(log.path, read_path, owner="final")
        try:
            await until_state(read_path, lambda s: s[0] >= head)
        finally:
            assert stop(final, signal.SIGTERM) == 0
    finally:
        log.close()
    assert kills >= 5
    assert invariants(log.path, read_path) == CLEAN


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
        procs[leader].send_signal(signal.SIGSTOP)
        head = await write(log, rng, 60)
        await until_state(read_path, lambda s: s[0] >= head and s[1] == other)
        procs[leader].send_signal(signal.SIGCONT)
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
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            stop(proc, signal.SIGTERM)
        log.close()
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
        procs["a"].send_signal(signal.SIGSTOP)
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
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            stop(proc, signal.SIGTERM)
        log.close()
    assert invariants(log.path, read_path) == CLEAN
