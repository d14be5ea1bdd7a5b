"""The pause before a restart grows while failures repeat and goes back to its minimum once
a round succeeds — for the relay, the projector's worker, the partitioned projector's apply
loop and a consumer's partition loop. The pauses are recorded (not waited for) through the
runner's pause hook; the failures come from an event log whose reads fail on request, or
from an in-memory broker marked unavailable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cqrskit.eventlog import StoredEvent
from cqrskit.messaging import Consumer, InMemoryTransport, Relay
from cqrskit.messaging.consumer import _Partition
from cqrskit.projections import Projector
from cqrskit.projections.partitioned import PartitionedProjector
from cqrskit.sqlite import SqliteReadDatabase
from cqrskit.testing.transport import envelopes_for
from tests.support.bank import Deposited, balances, serializer
from tests.support.sqlite_log import SqliteTestLog

# 0.05 * 2**failures, capped at 5 s: the pauses after 1, 2, ... failures in a row
GROWING = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
SHORTEST = GROWING[0]


class FlakyLog(SqliteTestLog):
    """A SQLite log whose next ``fail`` reads raise (a database that went away)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.fail = 0

    async def read_after(self, position: int, limit: int = 1000) -> list[StoredEvent]:
        if self.fail:
            self.fail -= 1
            raise OSError("the event log's database is unreachable")
        return await super().read_after(position, limit)


async def until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not reached within {timeout}s: {what}"
        await asyncio.sleep(0.01)


def record_pauses(monkeypatch: pytest.MonkeyPatch, runner: Any, task: str) -> list[float]:
    """Replace ``runner._pause`` for the task named ``task``: record the pause, do not wait
    (every other task pauses for real)."""
    pauses: list[float] = []
    real = runner._pause

    async def pause(seconds: float) -> None:
        current = asyncio.current_task()
        if current is None or current.get_name() != task:
            await real(seconds)
            return
        pauses.append(seconds)
        await asyncio.sleep(0)

    monkeypatch.setattr(runner, "_pause", pause)
    return pauses


async def append(log: SqliteTestLog, count: int) -> int:
    last = 0
    for i in range(count):
        last = (await log.append(f"acct-{i % 3}", Deposited(f"acct-{i % 3}", 1)))[-1].position
    return last


async def test_the_relay_backs_off_from_the_start_again_after_a_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = FlakyLog(tmp_path / "w.db")
    db = SqliteReadDatabase(str(tmp_path / "w.db"))
    relay = Relay(log, db, InMemoryTransport(), partitions=2, poll_interval=0.05)
    pauses = record_pauses(monkeypatch, relay, "relay:relay")
    try:
        last = await append(log, 5)
        log.fail = len(GROWING)
        await relay.start()
        await until(lambda: relay.checkpoint == last, "published after the failures")
        assert pauses == GROWING
        log.fail = 1  # one more failure after successful rounds
        await until(lambda: len(pauses) > len(GROWING), "the next failure")
        assert pauses[-1] == SHORTEST
        last = await append(log, 3)
        await until(lambda: relay.checkpoint == last, "published after the next failure")
    finally:
        await relay.stop()
        await db.close()
        log.close()


async def test_the_projector_worker_backs_off_from_the_start_again_after_a_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = FlakyLog(tmp_path / "w.db")
    db = SqliteReadDatabase(str(tmp_path / "r.db"))
    projector = Projector(log, db, [balances], serializer, poll_interval=0.05)
    pauses = record_pauses(monkeypatch, projector, "projector:balances")
    try:
        last = await append(log, 5)
        log.fail = len(GROWING)
        await projector.start()
        await until(lambda: projector.checkpoint("balances") == last, "applied")
        assert pauses == GROWING
        log.fail = 1
        await until(lambda: len(pauses) > len(GROWING), "the next failure")
        assert pauses[-1] == SHORTEST
        last = await append(log, 3)
        await until(lambda: projector.checkpoint("balances") == last, "applied again")
    finally:
        await projector.stop()
        await db.close()
        log.close()


async def test_the_partitioned_projector_backs_off_from_the_start_again_after_a_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = FlakyLog(tmp_path / "w.db")
    db = SqliteReadDatabase(str(tmp_path / "r.db"))
    projector = PartitionedProjector(
        log, db, [balances], serializer, partitions=2, lease_ttl=2.0, poll_interval=0.05
    )
    pauses = record_pauses(monkeypatch, projector, "projector:balances")

    def caught_up(last: int) -> Callable[[], bool]:
        def check() -> bool:
            cps = projector.checkpoints("balances")
            return len(cps) == 2 and min(cps.values()) == last

        return check

    try:
        last = await append(log, 5)
        log.fail = len(GROWING)
        await projector.start()
        await until(caught_up(last), "applied on both partitions")
        assert pauses == GROWING
        log.fail = 1
        await until(lambda: len(pauses) > len(GROWING), "the next failure")
        assert pauses[-1] == SHORTEST
        last = await append(log, 3)
        await until(caught_up(last), "applied again")
    finally:
        await projector.stop()
        await db.close()
        log.close()


async def test_a_consumer_partition_backs_off_from_the_start_again_after_a_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = SqliteTestLog(tmp_path / "w.db")
    db = SqliteReadDatabase(str(tmp_path / "r.db"))
    broker = InMemoryTransport()
    growing = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]  # from 0.05, doubling, up to max_backoff
    rests: list[float] = []

    async def rest(self: _Partition, seconds: float) -> None:
        rests.append(seconds)
        if len(rests) == len(growing):
            broker.available = True  # the broker is back after that many failures
        await asyncio.sleep(0)

    monkeypatch.setattr(_Partition, "rest", rest)
    consumer = Consumer(broker.source(), db, [balances], serializer, partitions=1,
                        lease_ttl=2.0, poll_interval=0.05, max_backoff=2.0)  # fmt: skip
    try:
        await append(log, 5)
        assert await broker.publish(envelopes_for(await log.read_after(0, 100), 1)) == [None] * 5
        broker.available = False  # down from the start
        await consumer.start()
        await until(lambda: consumer.counts.get("applied") == 5, "applied after the outage")
        assert rests == growing
        broker.available = False  # one more failure after successful fetches
        await until(lambda: len(rests) > len(growing), "the next failure")
        assert rests[len(growing)] == growing[0]
    finally:
        broker.available = True
        await consumer.stop()
        await db.close()
        log.close()
