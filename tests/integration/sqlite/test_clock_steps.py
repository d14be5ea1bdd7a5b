"""Wall-clock steps and skew never make a second projector leader.

A lease is judged on the standby's monotonic clock (has the leader's heartbeat counter moved
within ``lease_ttl``?), never by comparing wall-clock times. Here the leader runs in this
process, the standby in another whose wall clock is an hour ahead of the leader's, and both
wall clocks are stepped by hours and by a year, forwards and backwards (an NTP step, a VM
resumed from a snapshot). Through every step the leader keeps the lease (same owner, same
epoch) and applies everything; when it stops, the standby takes over at once.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from tests.support.bank import Deposited, balances, serializer
from tests.support.faults import check_invariants
from tests.support.processes import invariants, start_projector, stop, until_state
from tests.support.sqlite_log import SqliteTestLog
from tests.support.waiting import until

from cqrskit.projections import Projector
from cqrskit.sqlite import SqliteReadDatabase

pytestmark = pytest.mark.slow

LEASE_TTL = 0.3
SKEW = 3600.0  # the standby's wall clock is an hour ahead of the leader's
HOUR, YEAR = 3600.0, 366 * 86400.0
# seconds added to both wall clocks, one step after another: many small forward steps (each
# may land between two lease checks of the standby that see the same heartbeat), backward
# steps, and a year each way
STEPS = (HOUR,) * 12 + (-2 * HOUR,) * 6 + (YEAR, -YEAR, -YEAR, YEAR)


async def write(log: SqliteTestLog, rng: random.Random, count: int) -> int:
    last = 0
    for _ in range(count):
        account = f"acc-{rng.randrange(4)}"
        [e] = await log.append(account, Deposited(account, rng.randrange(1, 100)))
        last = e.position
    return last


def lease(read_path: Path) -> tuple[str | None, int, int]:
    """(owner, epoch, heartbeat counter) of the balances projection."""
    conn = sqlite3.connect(read_path, timeout=10)
    try:
        row = conn.execute(
            "SELECT lease_owner, lease_epoch, lease_beat FROM cqrskit_projections "
            "WHERE name = 'balances'"
        ).fetchone()
    finally:
        conn.close()
    return (row[0], int(row[1]), int(row[2]))


async def test_wall_clock_steps_and_skew_never_make_a_second_leader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    offset = 0.0
    clock_file = tmp_path / "standby-clock"
    clock_file.write_text(repr(SKEW))

    def step(seconds: float) -> None:
        # both processes' wall clocks jump at once (the standby's keeps its skew)
        nonlocal offset
        offset += seconds
        tmp = clock_file.with_suffix(".tmp")
        tmp.write_text(repr(offset + SKEW))
        tmp.replace(clock_file)

    real_time, real_time_ns = time.time, time.time_ns
    monkeypatch.setattr(time, "time", lambda: real_time() + offset)
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + int(offset * 1e9))
    rng = random.Random(23)
    log = SqliteTestLog(tmp_path / "write.db")
    read_path = tmp_path / "read.db"
    read_db = SqliteReadDatabase(str(read_path))
    leader = Projector(
        log, read_db, [balances], serializer, batch_size=7, lease_ttl=LEASE_TTL, owner="leader"
    )
    standby: subprocess.Popen[bytes] | None = None

    async def caught_up(head: int) -> None:
        async def check() -> bool:
            return leader.checkpoint("balances") >= head

        await until(check, leader.signal, timeout=30)

    async def beats(count: int) -> None:
        # the idle leader beats every lease_ttl / 3: `count` beats span count / 3 lease_ttls,
        # long enough for a standby that misjudged the lease to take it
        start = lease(read_path)[2]

        async def check() -> bool:
            return lease(read_path)[2] >= start + count

        await until(check, leader.signal, timeout=30)

    try:
        async with leader:
            await caught_up(await write(log, rng, 30))
            owner, epoch, _ = lease(read_path)
            assert owner == "leader"
            standby = start_projector(
                str(log.path),
                str(read_path),
                owner="standby",
                lease_ttl=LEASE_TTL,
                wall_clock=clock_file,
            )
            await beats(9)  # the standby is up and watching
            for i, seconds in enumerate(STEPS):
                step(seconds)
                if i % 4 == 0:
                    await caught_up(await write(log, rng, 10))
                await beats(2)
                assert lease(read_path)[:2] == ("leader", epoch), f"after a step of {seconds:+g}s"
                assert leader.leading("balances")
                assert standby.poll() is None
        # the leader stopped and released the lease: the standby takes over at once
        head = await write(log, rng, 10)
        _, owner, new_epoch = await until_state(
            str(read_path), lambda s: s[0] >= head and s[1] == "standby"
        )
        assert new_epoch == epoch + 1
    finally:
        if standby is not None:
            stop(standby, signal.SIGTERM)
        await read_db.close()
        log.close()
    result = check_invariants("sqlite-wall-clock-steps", invariants(str(log.path), str(read_path)))
    assert result == {"lost": 0, "double": 0, "reordered": 0, "wrong_sum": 0}
