"""Rebuild equals incremental; poison events parked and retried; inline <-> async moves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tests.support.bank import Deposited, Poison, Unrelated, balances, decode
from tests.support.logs import AppendLog
from tests.support.waiting import until

from cqrskit.errors import ConfigurationError, StaleReadError
from cqrskit.projections import (
    ConsistencyGate,
    InlineProjections,
    Projection,
    ProjectionContext,
    Projector,
    ReadDatabase,
    dead_letters,
    projection_status,
    request_rebuild,
    request_retry,
)
from cqrskit.serialization import EventTypes, JsonSerializer


async def rows(db: ReadDatabase) -> list[tuple[object, ...]]:
    async with db.read_only() as s:
        return [tuple(r) for r in await s.fetchall("SELECT * FROM accounts ORDER BY id")]


async def order_errors(db: ReadDatabase) -> int:
    async with db.read_only() as s:
        return int(await s.fetchval("SELECT count(*) FROM order_errors"))


async def test_rebuild_equals_incremental(
    log: AppendLog, read_db: ReadDatabase, open_read_db: Callable[..., ReadDatabase]
) -> None:
    for i in range(120):
        await log.append(f"acc-{i % 7}", Deposited(f"acc-{i % 7}", i))
    async with Projector(log, read_db, [balances], decode, batch_size=16) as p:
        await ConsistencyGate(log, read_db, signal=p.signal).check(
            ["balances"], await log.last_position(), "wait", 10.0
        )
    incremental = await rows(read_db)
    assert len(incremental) == 7

    assert await request_rebuild(read_db, balances) == 2
    # the old generation keeps serving while the new one is empty and building
    assert await rows(read_db) == incremental
    async with Projector(log, read_db, [balances], decode, batch_size=16, state_interval=0.01) as p:
        for i in range(30):
            await log.append(f"acc-{i % 7}", Deposited(f"acc-{i % 7}", 1000))

        async def switched() -> bool:
            [st] = await projection_status(read_db, log)
            return st.generation == 2 and st.rebuilding is None and st.lag_events == 0

        await until(switched, p.signal)
    rebuilt = await rows(read_db)
    assert [r[0] for r in rebuilt] == [r[0] for r in incremental]
    assert sum(int(r[1]) for r in rebuilt) == sum(range(120)) + 30 * 1000  # type: ignore[call-overload]
    # an incremental oracle: project the same log into a fresh database
    oracle_db = open_read_db("oracle")
    try:
        async with Projector(log, oracle_db, [balances], decode, batch_size=50) as p:
            await ConsistencyGate(log, oracle_db, signal=p.signal).check(
                ["balances"], await log.last_position(), "wait", 10.0
            )
        assert await rows(oracle_db) == rebuilt
    finally:
        await oracle_db.close()
    async with read_db.read_only() as s:
        with pytest.raises(Exception, match="accounts__g1"):
            await s.fetchall("SELECT * FROM accounts__g1")
    assert await order_errors(read_db) == 0


async def test_poison_parked_then_retried(
    log: AppendLog, read_db: ReadDatabase, poison_flag: Path
) -> None:
    poison_flag.touch()
    await log.append("a", Deposited("a", 1))
    await log.append("a", Poison("a"))
    await log.append("a", Deposited("a", 10))
    await log.append("b", Deposited("b", 5))
    async with Projector(
        log, read_db, [balances], decode, max_attempts=3, state_interval=0.01
    ) as p:
        gate = ConsistencyGate(log, read_db, signal=p.signal)
        await gate.check(["balances"], await log.last_position(), "wait", 10.0)
        parked = await dead_letters(read_db, "balances")
        assert [(d.stream, d.version, d.type) for d in parked] == [
            ("a", 2, "bank.poison"),
            ("a", 3, "bank.deposited"),
        ]
        assert parked[0].attempts == 3
        assert "cannot apply poison" in parked[0].error
        assert "earlier event" in parked[1].error
        assert {r[0]: r[1] for r in await rows(read_db)} == {"a": 1, "b": 5}
        # the rest keeps flowing, the parked stream stays parked
        [b2] = await log.append("b", Deposited("b", 5))
        [a100] = await log.append("a", Deposited("a", 100))
        await gate.check(["balances"], b2.position, "wait", 10.0)

        async def past_a100() -> bool:
            return (await gate.positions(["balances"]))["balances"] >= a100.position

        await until(past_a100, p.signal)
        assert len(await dead_letters(read_db, "balances")) == 3
        # the checkpoint is past a's new event, but it is parked: its token reads stale
        with pytest.raises(StaleReadError, match="parked"):
            await gate.check(["balances"], a100.position, "fail", 0)
        # a retry that fails again keeps them parked with more attempts
        assert await request_retry(read_db, "balances") == 3

        async def retried_once() -> bool:
            return all(not d.retry for d in await dead_letters(read_db, "balances"))

        await until(retried_once, p.signal)
        assert (await dead_letters(read_db, "balances"))[0].attempts == 6
        # fix the bug, retry: applied in stream order
        poison_flag.unlink()
        await request_retry(read_db, "balances", stream="a")

        async def drained() -> bool:
            return not await dead_letters(read_db, "balances")

        await until(drained, p.signal)
        [status] = await projection_status(read_db, log)
    assert {r[0]: r[1] for r in await rows(read_db)} == {"a": 111, "b": 10}
    assert await order_errors(read_db) == 0
    assert status.dead_letters == 0


async def test_inline_failure_fails_the_command(
    log: AppendLog, poison_flag: Path, open_read_db: Callable[..., ReadDatabase]
) -> None:
    read_db = open_read_db(write=True)
    try:
        inline = InlineProjections(read_db, [balances], decode)
        await inline.setup()
        inline.attach(log)
        [first] = await log.append("a", Deposited("a", 1))
        poison_flag.touch()
        with pytest.raises(RuntimeError, match="poison"):
            await log.append("a", Poison("a"))
        assert await log.last_position() == first.position
        assert [r[:2] for r in await rows(read_db)] == [("a", 1)]
    finally:
        await read_db.close()


async def test_move_inline_to_async_and_back(
    log: AppendLog, open_read_db: Callable[..., ReadDatabase]
) -> None:
    read_db = open_read_db(write=True)
    try:
        inline = InlineProjections(read_db, [balances], decode)
        await inline.setup()
        inline.attach(log)
        for _ in range(10):
            await log.append("a", Deposited("a", 1))
        [status] = await projection_status(read_db, log)
        assert (status.mode, status.checkpoint, status.lag_events) == (
            "inline",
            await log.last_position(),
            0,
        )
        # configuration change: the same projection object now runs asynchronously
        log.hooks.clear()
        for _ in range(5):
            await log.append("a", Deposited("a", 1))
        async with Projector(log, read_db, [balances], decode) as p:
            await ConsistencyGate(log, read_db, signal=p.signal).check(
                ["balances"], await log.last_position(), "wait", 10.0
            )
        [status] = await projection_status(read_db, log)
        assert status.mode == "async"
        # and back to inline once the projector is stopped and caught up
        inline = InlineProjections(read_db, [balances], decode)
        await log.append("a", Deposited("a", 1))
        with pytest.raises(ConfigurationError, match="behind the log"):
            await inline.setup(log)
        async with Projector(log, read_db, [balances], decode) as p:
            await ConsistencyGate(log, read_db, signal=p.signal).check(
                ["balances"], await log.last_position(), "wait", 10.0
            )
        await inline.setup(log)
        inline.attach(log)
        await log.append("a", Deposited("a", 1))
        assert list(await rows(read_db)) == [("a", 17, 17, 17)]
        assert await order_errors(read_db) == 0
    finally:
        await read_db.close()


class _Deadlock(Exception):
    """Shaped like a driver's deadlock error (SQLSTATE 40P01)."""

    sqlstate = "40P01"


async def test_database_faults_are_retried_not_parked(
    log: AppendLog, read_db: ReadDatabase
) -> None:
    flaky = Projection(
        "flaky",
        tables={"seen": ("CREATE TABLE {seen} (id TEXT PRIMARY KEY)",)},
    )
    faults = {"b": 2}  # the handler of b's event meets two deadlocks, then succeeds

    @flaky.on
    async def on_deposited(e: Deposited, ctx: ProjectionContext) -> None:
        if faults.get(e.account, 0) > 0:
            faults[e.account] -= 1
            raise _Deadlock("deadlock detected")
        await ctx.execute(f"INSERT INTO {ctx.table('seen')} (id) VALUES (?)", e.account)

    for account in ("a", "b", "c"):
        await log.append(account, Deposited(account, 1))
    async with Projector(log, read_db, [flaky], decode, max_attempts=1) as p:
        await ConsistencyGate(log, read_db, signal=p.signal).check(
            ["flaky"], await log.last_position(), "wait", 20.0
        )
        assert await dead_letters(read_db, "flaky") == []
    async with read_db.read_only() as s:
        seen = [r[0] for r in await s.fetchall("SELECT id FROM seen ORDER BY id")]
    assert seen == ["a", "b", "c"]
    assert faults == {"b": 0}


ledger = Projection(
    "ledger",
    tables={"entries": ("CREATE TABLE {entries} (position BIGINT PRIMARY KEY, kind TEXT)",)},
)


@ledger.on
async def _ledger_deposit(e: Deposited, ctx: ProjectionContext) -> None:
    assert ctx.stored is not None
    await ctx.execute(
        f"INSERT INTO {ctx.table('entries')} (position, kind) VALUES (?, 'deposit')",
        ctx.stored.position,
    )


@ledger.on
async def _ledger_note(e: Unrelated, ctx: ProjectionContext) -> None:
    assert ctx.stored is not None
    await ctx.execute(
        f"INSERT INTO {ctx.table('entries')} (position, kind) VALUES (?, 'note')",
        ctx.stored.position,
    )


def _older_decoder() -> JsonSerializer:
    """The decoder of an older release: it does not know ``bank.unrelated`` yet."""
    types = EventTypes()
    types.register(Deposited, "bank.deposited")
    types.register(Poison, "bank.poison")
    return JsonSerializer(types)


async def test_an_undecodable_event_type_is_parked_not_skipped(
    log: AppendLog, read_db: ReadDatabase
) -> None:
    # a rolling upgrade: a newer writer records a type the older projector cannot decode
    [d1] = await log.append("a", Deposited("a", 1))
    [note] = await log.append("a", Unrelated("hello"))
    [d2] = await log.append("a", Deposited("a", 2))
    [d3] = await log.append("b", Deposited("b", 3))
    async with Projector(log, read_db, [ledger], _older_decoder(), state_interval=0.01) as p:
        await ConsistencyGate(log, read_db, signal=p.signal).check(
            ["ledger"], d3.position, "wait", 10.0
        )
        parked = await dead_letters(read_db, "ledger")
    # parked with the reason (and, stream order mattering, a's later event behind it)
    assert [(d.position, d.type) for d in parked] == [
        (note.position, "bank.unrelated"),
        (d2.position, "bank.deposited"),
    ]
    assert "unknown event type" in parked[0].error
    assert "earlier event" in parked[1].error
    async with read_db.read_only() as s:
        kinds = [tuple(r) for r in await s.fetchall("SELECT position, kind FROM entries")]
    assert sorted(kinds) == [(d1.position, "deposit"), (d3.position, "deposit")]
    # the upgraded projector knows the type: a retry applies both, in stream order
    async with Projector(log, read_db, [ledger], decode, state_interval=0.01) as p:
        await request_retry(read_db, "ledger")

        async def drained() -> bool:
            return not await dead_letters(read_db, "ledger")

        await until(drained, p.signal)
    async with read_db.read_only() as s:
        kinds = [tuple(r) for r in await s.fetchall("SELECT position, kind FROM entries")]
    assert sorted(kinds) == sorted(
        [
            (d1.position, "deposit"),
            (note.position, "note"),
            (d2.position, "deposit"),
            (d3.position, "deposit"),
        ]
    )
