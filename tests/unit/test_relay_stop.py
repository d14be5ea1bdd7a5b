"""``Relay.stop``: batches that do not finish in time (a publish that never returns, acks
that never come) are abandoned unmarked, and the lease is released all the same: a standby
takes over at once (not after ``lease_ttl``) and publishes them with the same numbers."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from cqrskit.messaging import Envelope, InMemoryTransport, Relay, Transport
from cqrskit.sqlite import SqliteReadDatabase
from tests.support.bank import Deposited
from tests.support.sqlite_log import SqliteTestLog


class HungTransport(Transport):
    """A broker that takes the messages and never answers: ``publish`` never returns."""

    name = "hung"

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    def destination(self, partition: int) -> str:
        return f"hung.{partition}"

    async def publish(self, messages: Sequence[Envelope]) -> list[str | None]:
        self.entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class StubbornTransport(HungTransport):
    """``publish`` never returns, and swallows the first cancellation to hang again (a
    client whose clean-up waits on a dead broker)."""

    async def publish(self, messages: Sequence[Envelope]) -> list[str | None]:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.Event().wait()
        raise AssertionError("unreachable")


def lease(path: Path) -> tuple[str | None, int]:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(
            "SELECT p.lease_owner, c.position FROM cqrskit_projections p JOIN "
            "cqrskit_checkpoints c ON c.projection = p.name AND c.generation = "
            "p.active_generation WHERE p.name = 'relay'"
        ).fetchone()
    finally:
        conn.close()
    return row[0], int(row[1])


async def until(check: asyncio.Event | None, transport: InMemoryTransport | None) -> None:
    deadline = time.monotonic() + 20
    while not (check is not None and check.is_set()) and not (
        transport is not None and transport.published
    ):
        assert time.monotonic() < deadline, "the relay never published"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("hang", ["publish never returns", "acks never come"])
async def test_a_hung_publish_is_abandoned_and_the_lease_released(
    hang: str, tmp_path: Path
) -> None:
    path = tmp_path / "w.db"
    log = SqliteTestLog(path)
    db = SqliteReadDatabase(str(path))
    last = 0
    for i in range(6):
        last = (await log.append(f"acct-{i % 3}", Deposited(f"acct-{i % 3}", i)))[-1].position
    hung: Transport
    if hang == "publish never returns":
        hung = HungTransport()
        entered, memory = hung.entered, None
    else:
        hung = memory = InMemoryTransport()
        memory.hold_acks()  # never set
        entered = None
    relay = Relay(log, db, hung, partitions=2, lease_ttl=30.0, stop_timeout=0.2)
    standby = InMemoryTransport()
    try:
        await relay.start()
        await until(entered, memory)
        assert relay.leading
        assert lease(path)[0] == relay.owner
        # returns (bounded by stop_timeout; without it, it waits for the hang forever)
        await asyncio.wait_for(relay.stop(), 20)
        owner, checkpoint = lease(path)
        assert owner is None  # released at once, though lease_ttl is 30 s
        assert checkpoint == 0  # nothing unacknowledged was marked published
        assert not relay.leading
        # a standby (same lease_ttl) takes over at once and publishes everything, with
        # the sequence numbers the abandoned batch carried
        async with Relay(log, db, standby, partitions=2, lease_ttl=30.0) as second:
            assert await second.wait_published(last, 10)
        got = sorted((p, e.sequence, e.position) for p in range(2) for e in standby.messages(p))
        assert [pos for _p, _s, pos in sorted(got, key=lambda g: g[2])] == list(range(1, last + 1))
        for p in range(2):
            seqs = [s for q, s, _pos in got if q == p]
            assert seqs == list(range(1, len(seqs) + 1))
    finally:
        await relay.stop()
        await db.close()
        log.close()


async def test_a_batch_acknowledged_within_the_timeout_is_committed(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    log = SqliteTestLog(path)
    db = SqliteReadDatabase(str(path))
    last = 0
    for i in range(4):
        last = (await log.append(f"acct-{i}", Deposited(f"acct-{i}", i)))[-1].position
    transport = InMemoryTransport()
    gate = transport.hold_acks()
    relay = Relay(log, db, transport, partitions=2, batch_size=10, stop_timeout=30.0)
    try:
        await relay.start()
        await until(None, transport)
        stopping = asyncio.ensure_future(relay.stop())
        await asyncio.sleep(0)
        gate.set()  # the acks come while stop() waits
        await asyncio.wait_for(stopping, 30)
        assert lease(path) == (None, last)
        assert relay.published == last
    finally:
        await relay.stop()
        await db.close()
        log.close()


async def test_a_publish_whose_unwinding_hangs_is_left_behind_and_the_lease_released(
    tmp_path: Path,
) -> None:
    """stop() cancels again, then leaves the relay's task behind (fenced) and releases the
    lease within a bound; before, it waited for ever on the second hang."""
    path = tmp_path / "w.db"
    log = SqliteTestLog(path)
    db = SqliteReadDatabase(str(path))
    await log.append("acct-1", Deposited("acct-1", 1))
    hung = StubbornTransport()
    relay = Relay(log, db, hung, partitions=2, lease_ttl=30.0, stop_timeout=0.2)
    try:
        await relay.start()
        await until(hung.entered, None)
        started = time.monotonic()
        await asyncio.wait_for(relay.stop(), 20)
        assert time.monotonic() - started < 15
        owner, checkpoint = lease(path)
        assert owner is None
        assert checkpoint == 0
    finally:
        await db.close()
        log.close()
