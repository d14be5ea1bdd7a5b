"""Async projections on SQLite: same file and separate file, checkpoints, status."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from tests.support.bank import Deposited, Unrelated, balances, decode
from tests.support.logs import AppendLog
from tests.support.waiting import visible

from cqrskit.projections import (
    ConsistencyGate,
    Projection,
    ProjectionContext,
    Projector,
    ReadDatabase,
    projection_status,
)


async def wait_checkpoint(gate: ConsistencyGate, position: int) -> None:
    await gate.check(["balances"], position, "wait", 5.0)


async def balances_of(db: ReadDatabase) -> dict[str, int]:
    async with db.read_only() as s:
        rows = await s.fetchall("SELECT id, balance FROM accounts ORDER BY id")
    return {r[0]: r[1] for r in rows}


async def test_catches_up_and_follows(log: AppendLog, read_db: ReadDatabase) -> None:
    for i in range(30):
        await log.append(f"acc-{i % 3}", Deposited(f"acc-{i % 3}", i))
    await log.append("misc", Unrelated("ignored"))
    async with Projector(log, read_db, [balances], decode, batch_size=7) as projector:
        gate = ConsistencyGate(log, read_db, signal=projector.signal)
        await wait_checkpoint(gate, await log.last_position())
        assert await balances_of(read_db) == {
            "acc-0": sum(range(0, 30, 3)),
            "acc-1": sum(range(1, 30, 3)),
            "acc-2": sum(range(2, 30, 3)),
        }
        last = (await log.append("acc-9", Deposited("acc-9", 5)))[-1]
        await wait_checkpoint(gate, last.position)
        assert (await balances_of(read_db))["acc-9"] == 5
        [status] = await projection_status(read_db, log)
    assert status.checkpoint == last.position
    assert status.lag_events == 0
    assert status.mode == "async"
    assert status.dead_letters == 0
    assert status.generation == 1


async def test_resumes_from_checkpoint_without_reapplying(
    log: AppendLog, read_db: ReadDatabase
) -> None:
    for _i in range(10):
        await log.append("a", Deposited("a", 1))
    async with Projector(log, read_db, [balances], decode, batch_size=4) as p:
        await wait_checkpoint(
            ConsistencyGate(log, read_db, signal=p.signal), await log.last_position()
        )
    for _i in range(5):
        await log.append("a", Deposited("a", 1))
    async with Projector(log, read_db, [balances], decode, batch_size=4) as p:
        await wait_checkpoint(
            ConsistencyGate(log, read_db, signal=p.signal), await log.last_position()
        )
    async with read_db.read_only() as s:
        row = await s.fetchone("SELECT balance, applied, last_version FROM accounts WHERE id = 'a'")
        errors = await s.fetchval("SELECT count(*) FROM order_errors")
    assert tuple(row or ()) == (15, 15, 15)
    assert errors == 0


async def test_lag_reported_while_stopped(log: AppendLog, read_db: ReadDatabase) -> None:
    async with Projector(log, read_db, [balances], decode) as p:
        first = (await log.append("a", Deposited("a", 1)))[-1]
        await wait_checkpoint(ConsistencyGate(log, read_db, signal=p.signal), first.position)
    for _ in range(4):
        [last] = await log.append("a", Deposited("a", 1))
    await visible(log, last.position)
    [status] = await projection_status(read_db, log)
    assert status.checkpoint == first.position
    assert status.lag_events == 4
    assert status.lag_seconds >= 0.0
    assert status.lease_owner is None


async def test_query_session_is_read_only(
    read_db: ReadDatabase, log: AppendLog, read_only_error: type[Exception]
) -> None:
    async with Projector(log, read_db, [balances], decode) as p:
        [e] = await log.append("a", Deposited("a", 1))
        await wait_checkpoint(ConsistencyGate(log, read_db, signal=p.signal), e.position)
    async with read_db.read_only() as s:
        with pytest.raises(read_only_error, match=r"read.?only"):
            await s.execute("DELETE FROM accounts__g1")


async def test_second_projector_stands_by_and_takes_over(
    log: AppendLog, read_db: ReadDatabase, open_read_db: Callable[..., ReadDatabase]
) -> None:
    other_db = open_read_db()
    first = Projector(log, read_db, [balances], decode, lease_ttl=0.4, owner="first")
    second = Projector(log, other_db, [balances], decode, lease_ttl=0.4, owner="second")
    await first.start()
    try:
        gate = ConsistencyGate(log, read_db, signal=first.signal)
        [e] = await log.append("a", Deposited("a", 1))
        await wait_checkpoint(gate, e.position)
        await second.start()
        [e] = await log.append("a", Deposited("a", 2))
        await wait_checkpoint(gate, e.position)
        assert first.leading("balances")
        assert not second.leading("balances")
        await first.stop()
        gate2 = ConsistencyGate(log, other_db, signal=second.signal)
        last = (await log.append("a", Deposited("a", 4)))[-1]
        await wait_checkpoint(gate2, last.position)
        assert second.leading("balances")
    finally:
        await first.stop()
        await second.stop()
        await other_db.close()
    assert (await balances_of(read_db))["a"] == 7


async def test_fenced_projector_cannot_commit(log: AppendLog, read_db: ReadDatabase) -> None:
    from cqrskit.projections import schema

    async with read_db.transaction() as s:
        await schema.ensure_projection(s, balances, "async")
        row = await schema.load(s, "balances")
        assert row is not None
        epoch = await schema.take_lease(s, "balances", "old", row)
    assert epoch is not None
    async with read_db.transaction() as s:
        row = await schema.load(s, "balances")
        assert row is not None
        assert await schema.take_lease(s, "balances", "new", row) == epoch + 1
    async with read_db.transaction() as s:
        assert not await schema.fence(s, "balances", epoch)
        assert await schema.fence(s, "balances", epoch + 1)


async def test_a_fence_that_does_not_beat_still_fences_and_locks(
    log: AppendLog, read_db: ReadDatabase, open_read_db: Callable[[], ReadDatabase]
) -> None:
    """``fence(beat=False)``: a stale epoch is refused, the holder's row stays locked for
    the transaction (a standby's take waits, then gives up), no new version is written."""
    from cqrskit.projections import schema

    async with read_db.transaction() as s:
        await schema.ensure_projection(s, balances, "async")
        row = await schema.load(s, "balances")
        assert row is not None
        epoch = await schema.take_lease(s, "balances", "holder", row)
        assert epoch is not None
        row = await schema.load(s, "balances")
    assert row is not None
    other_db = open_read_db()
    try:
        async with read_db.transaction() as s:
            assert not await schema.fence(s, "balances", epoch - 1, beat=False)
            assert await schema.fence(s, "balances", epoch, hold=5.0, beat=False)
            with pytest.raises(Exception) as caught:
                async with other_db.transaction(lock_timeout=0.2) as o:
                    await schema.take_lease(o, "balances", "standby", row)
            assert "lock" in str(caught.value).lower()
        async with read_db.read_only() as s:
            after = await schema.load(s, "balances")
        assert after is not None
        assert (after.lease_owner, after.lease_epoch, after.lease_beat) == (
            "holder",
            epoch,
            row.lease_beat,
        )
    finally:
        await other_db.close()


async def test_a_busy_leader_beats_its_lease_every_so_often_not_per_batch(
    log: AppendLog, read_db: ReadDatabase
) -> None:
    """40 batches in well under lease_ttl / 8 write the lease row a few times, not 40
    (under a long transaction elsewhere, every version of that row stays on disk)."""
    from cqrskit.projections import schema

    async with Projector(log, read_db, [balances], decode, lease_ttl=60.0) as projector:
        gate = ConsistencyGate(log, read_db, signal=projector.signal)
        [first] = await log.append("a", Deposited("a", 1))
        await wait_checkpoint(gate, first.position)
        async with read_db.read_only() as s:
            before = await schema.load(s, "balances")
        for _ in range(40):
            [e] = await log.append("a", Deposited("a", 1))
            await wait_checkpoint(gate, e.position)  # one batch per event
        async with read_db.read_only() as s:
            after = await schema.load(s, "balances")
    assert before is not None
    assert after is not None
    assert after.lease_epoch == before.lease_epoch
    assert after.lease_beat - before.lease_beat <= 3
    assert (await balances_of(read_db))["a"] == 41


async def test_stop_is_prompt_when_idle(log: AppendLog, read_db: ReadDatabase) -> None:
    p = Projector(log, read_db, [balances], decode, lease_ttl=30.0)
    await p.start()
    [e] = await log.append("a", Deposited("a", 1))
    await wait_checkpoint(ConsistencyGate(log, read_db, signal=p.signal), e.position)
    await asyncio.wait_for(p.stop(), 2.0)


async def test_catch_up_leaves_the_event_loop_running(
    log: AppendLog, read_db: ReadDatabase
) -> None:
    for i in range(30):
        await log.append(f"s-{i}", *[Deposited(f"s-{i}", 1) for _ in range(50)])
    head = await log.last_position()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        for _ in range(1_000_000):
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        async with Projector(log, read_db, [balances], decode, batch_size=50) as p:
            await wait_checkpoint(ConsistencyGate(log, read_db, signal=p.signal), head)
    finally:
        task.cancel()
    # 1500 events in batches of 50: the projector hands the loop back after each batch
    assert ticks >= 20


# -- a lease holder hung inside a batch: bounded, taken over --------------------------------

hanging = Projection(
    "hanging",
    tables={"seen": ("CREATE TABLE {seen} (position BIGINT PRIMARY KEY, account TEXT)",)},
)


class _Hang:
    """The ``hanging`` projection's handler awaits, inside its batch, something that never
    comes — for the ``times`` first events of account ``"hang"``."""

    times = 0
    entered: asyncio.Event | None = None
    cancelled = 0


@hanging.on
async def _hanging_deposit(e: Deposited, ctx: ProjectionContext) -> None:
    if e.account == "hang" and _Hang.times > 0:
        _Hang.times -= 1
        assert _Hang.entered is not None
        _Hang.entered.set()
        try:
            await asyncio.Event().wait()  # never set
        except asyncio.CancelledError:
            _Hang.cancelled += 1
            raise
    assert ctx.stored is not None
    await ctx.execute(
        f"INSERT INTO {ctx.table('seen')} (position, account) VALUES (?, ?)",
        ctx.stored.position,
        e.account,
    )


def _arm(times: int) -> asyncio.Event:
    _Hang.times, _Hang.cancelled, _Hang.entered = times, 0, asyncio.Event()
    return _Hang.entered


async def _seen(db: ReadDatabase) -> list[tuple[object, ...]]:
    async with db.read_only() as s:
        return [tuple(r) for r in await s.fetchall("SELECT position, account FROM seen")]


async def test_a_leader_hung_in_a_handler_is_taken_over(
    log: AppendLog, read_db: ReadDatabase, open_read_db: Callable[..., ReadDatabase]
) -> None:
    ttl = 1.0
    entered = _arm(1)
    other_db = open_read_db()
    first = Projector(log, read_db, [hanging], decode, lease_ttl=ttl, owner="first")
    second = Projector(log, other_db, [hanging], decode, lease_ttl=ttl, owner="second")
    loop = asyncio.get_running_loop()
    try:
        await first.start()
        gate = ConsistencyGate(log, other_db)
        [e0] = await log.append("x", Deposited("x", 1))
        await gate.check(["hanging"], e0.position, "wait", 10.0)
        await second.start()
        assert first.leading("hanging")
        [stuck] = await log.append("hang", Deposited("hang", 1))
        await asyncio.wait_for(entered.wait(), 10)
        hung_at = loop.time()
        # the leader's handler never returns: its transaction is rolled back after
        # lease_ttl, it hands the lease over and the standby applies the event
        await gate.check(["hanging"], stuck.position, "wait", 20.0)
        took = loop.time() - hung_at
        assert second.leading("hanging")
        assert not first.leading("hanging")
        assert _Hang.cancelled == 1  # the hung handler was cancelled, never completed
        # generous slack for a loaded machine; the bound itself is lease_ttl + a poll
        assert took < ttl + ttl / 4 + 5.0, took
        [e2] = await log.append("x", Deposited("x", 2))
        await gate.check(["hanging"], e2.position, "wait", 10.0)
    finally:
        await asyncio.wait_for(first.stop(), ttl + 5)
        await asyncio.wait_for(second.stop(), ttl + 5)
        await other_db.close()
    # each event applied once: the hung batch never committed
    assert sorted(await _seen(read_db)) == [
        (e0.position, "x"),
        (stuck.position, "hang"),
        (e2.position, "x"),
    ]


async def test_stop_is_bounded_while_a_leader_hangs(
    log: AppendLog, read_db: ReadDatabase, open_read_db: Callable[..., ReadDatabase]
) -> None:
    ttl = 1.0
    entered = _arm(1_000)  # hangs on every attempt
    other_db = open_read_db()
    first = Projector(log, read_db, [hanging], decode, lease_ttl=ttl, owner="first")
    standby = Projector(log, other_db, [hanging], decode, lease_ttl=ttl, owner="standby")
    try:
        await first.start()
        gate = ConsistencyGate(log, read_db)
        [e0] = await log.append("x", Deposited("x", 1))
        await gate.check(["hanging"], e0.position, "wait", 10.0)
        await standby.start()
        await log.append("hang", Deposited("hang", 1))
        await asyncio.wait_for(entered.wait(), 10)
        # neither the standby (waiting for the lease) nor the hung leader may hang stop()
        await asyncio.wait_for(standby.stop(), ttl + 5)
        await asyncio.wait_for(first.stop(), 2 * ttl + 5)
    finally:
        _Hang.times = 0
        await asyncio.wait_for(first.stop(), ttl + 5)
        await asyncio.wait_for(standby.stop(), ttl + 5)
        await other_db.close()
    assert sorted(await _seen(read_db)) == [(e0.position, "x")]
