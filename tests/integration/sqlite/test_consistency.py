"""Read-your-writes through the mediator: each policy, tokens from the future, read-only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from tests.support.bank import Deposited, Poison, balances, decode
from tests.support.logs import AppendLog

from cqrskit import Command, Dependencies, Event, Mediator, Query, Registry, for_queries
from cqrskit.errors import (
    ConfigurationError,
    StaleReadError,
    TokenFromFutureError,
    ValidationError,
)
from cqrskit.eventlog import EventStore, UnitOfWork
from cqrskit.projections import (
    ConsistencyGate,
    InlineProjections,
    Projector,
    ReadDatabase,
    ReadSession,
    ask_consistent,
    read_after,
    reads,
    request_retry,
)


@dataclass(frozen=True, slots=True)
class Deposit(Command[None]):
    account: str
    amount: int


@reads("balances")
@dataclass(frozen=True, slots=True)
class GetBalance(Query[int | None]):
    account: str


@dataclass(frozen=True, slots=True)
class Undeclared(Query[int]):
    pass


@dataclass(frozen=True, slots=True)
class WritingQuery(Query[None]):
    pass


def build(log: AppendLog, read_db: ReadDatabase, gate: ConsistencyGate | None) -> Mediator:
    registry = Registry()

    @registry.handler
    async def deposit(cmd: Deposit, uow: UnitOfWork) -> None:
        uow.record(cmd.account, Deposited(cmd.account, cmd.amount))

    @registry.handler
    async def get_balance(q: GetBalance, db: ReadSession) -> int | None:
        value = await db.fetchval("SELECT balance FROM accounts WHERE id = ?", q.account)
        return None if value is None else int(value)

    @registry.handler
    async def undeclared(q: Undeclared) -> int:
        return 1

    @registry.handler
    async def writing(q: WritingQuery, db: ReadSession) -> None:
        await db.execute("DELETE FROM accounts__g1")

    deps = Dependencies()
    deps.scoped(ReadSession, read_db.session)
    behaviors = [log.transaction(), *([for_queries(gate.behavior)] if gate else [])]
    return Mediator(registry, resolver=[log.resolver(), deps], behaviors=behaviors)


@pytest.fixture
async def projector(log: AppendLog, read_db: ReadDatabase) -> AsyncIterator[Projector]:
    async with Projector(log, read_db, [balances], decode) as p:
        yield p


async def test_wait_policy_reads_own_write(
    log: AppendLog, read_db: ReadDatabase, projector: Projector
) -> None:
    gate = ConsistencyGate(log, read_db, signal=projector.signal)
    mediator = build(log, read_db, gate)
    for i in range(1, 20):
        receipt = await mediator.send_tracked(Deposit("a", 1))
        assert receipt.token is not None
        read = await ask_consistent(mediator, GetBalance("a"), receipt.token, timeout=5.0)
        assert read.value == i
        assert read.stale is False
        assert read.positions["balances"] >= receipt.token


class _NoReads:
    """A read database the gate must not touch."""

    def __init__(self, db: ReadDatabase) -> None:
        self.db = db
        self.routes_tokens = False
        self.reads = 0

    def read_only(self) -> object:
        self.reads += 1
        return self.db.read_only()


async def test_a_token_this_process_applied_needs_no_read_database_round_trip(
    log: AppendLog, read_db: ReadDatabase, projector: Projector
) -> None:
    """The leading projector in this process tells the gate what it committed: an applied
    token (nothing parked near it) is answered without a query; once the projector
    stops, the gate asks the read database again."""
    gate = ConsistencyGate(log, read_db, signal=projector.signal)
    [e] = await log.append("a", Deposited("a", 1))
    await gate.check(["balances"], e.position, "wait", 5.0)  # applied (either way)
    counting = _NoReads(read_db)
    gate.read_db = counting  # type: ignore[assignment]
    assert await gate.check(["balances"], e.position, "fail", 0) is False
    assert counting.reads == 0
    await projector.stop()
    assert await gate.check(["balances"], e.position, "fail", 0) is False
    assert counting.reads == 1


async def test_read_after_context(
    log: AppendLog, read_db: ReadDatabase, projector: Projector
) -> None:
    gate = ConsistencyGate(log, read_db, signal=projector.signal)
    mediator = build(log, read_db, gate)
    receipt = await mediator.send_tracked(Deposit("b", 7))
    async with read_after(receipt.token, policy="wait", timeout=5.0) as consistency:
        assert await mediator.ask(GetBalance("b")) == 7
    assert consistency.stale is False


async def stopped_projector_setup(log: AppendLog, read_db: ReadDatabase) -> int:
    """Project one deposit, stop the projector, commit another: return its token."""
    async with Projector(log, read_db, [balances], decode) as p:
        first = (await log.append("c", Deposited("c", 1)))[-1]
        await ConsistencyGate(log, read_db, signal=p.signal).check(
            ["balances"], first.position, "wait", 5.0
        )
    return (await log.append("c", Deposited("c", 10)))[-1].position


async def test_stale_policy_flags_old_data(log: AppendLog, read_db: ReadDatabase) -> None:
    token = await stopped_projector_setup(log, read_db)
    mediator = build(log, read_db, ConsistencyGate(log, read_db))
    async with read_after(token, policy="stale", timeout=0.05) as consistency:
        assert await mediator.ask(GetBalance("c")) == 1
    assert consistency.stale is True
    read = await ask_consistent(mediator, GetBalance("c"), token, policy="stale", timeout=0)
    assert (read.value, read.stale) == (1, True)


async def test_fail_policy_raises_at_once(log: AppendLog, read_db: ReadDatabase) -> None:
    token = await stopped_projector_setup(log, read_db)
    mediator = build(log, read_db, ConsistencyGate(log, read_db))
    started = time.monotonic()
    with pytest.raises(StaleReadError, match="balances"):
        await ask_consistent(mediator, GetBalance("c"), token, policy="fail", timeout=10.0)
    assert time.monotonic() - started < 2.0


async def test_wait_policy_times_out(log: AppendLog, read_db: ReadDatabase) -> None:
    token = await stopped_projector_setup(log, read_db)
    mediator = build(log, read_db, ConsistencyGate(log, read_db))
    started = time.monotonic()
    with pytest.raises(StaleReadError):
        await ask_consistent(mediator, GetBalance("c"), token, policy="wait", timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 5.0


async def test_token_from_future_fails_fast(
    log: AppendLog, read_db: ReadDatabase, projector: Projector
) -> None:
    mediator = build(log, read_db, ConsistencyGate(log, read_db, signal=projector.signal))
    await mediator.send(Deposit("d", 1))
    started = time.monotonic()
    with pytest.raises(TokenFromFutureError):
        await ask_consistent(
            mediator, GetBalance("d"), await log.last_position() + (1 << 40), timeout=30.0
        )
    assert time.monotonic() - started < 2.0


async def test_no_token_means_no_check(log: AppendLog, read_db: ReadDatabase) -> None:
    await stopped_projector_setup(log, read_db)
    mediator = build(log, read_db, ConsistencyGate(log, read_db))
    read = await ask_consistent(mediator, GetBalance("c"), None, policy="fail")
    assert (read.value, read.stale) == (1, False)


async def test_misconfigurations_are_loud(
    log: AppendLog, read_db: ReadDatabase, projector: Projector
) -> None:
    receipt = await build(log, read_db, None).send_tracked(Deposit("e", 1))
    with pytest.raises(ConfigurationError, match="ConsistencyGate"):
        await ask_consistent(build(log, read_db, None), GetBalance("e"), receipt.token)
    gated = build(log, read_db, ConsistencyGate(log, read_db, signal=projector.signal))
    with pytest.raises(ConfigurationError, match="does not declare"):
        await ask_consistent(gated, Undeclared(), receipt.token)
    read = await ask_consistent(
        gated, Undeclared(), receipt.token, projections=["balances"], timeout=5.0
    )
    assert read.value == 1
    with pytest.raises(ConfigurationError, match="policy"):
        async with read_after(1, policy="maybe"):  # type: ignore[arg-type]
            pass


async def test_query_that_writes_fails(
    log: AppendLog, read_db: ReadDatabase, projector: Projector, read_only_error: type[Exception]
) -> None:
    mediator = build(log, read_db, ConsistencyGate(log, read_db, signal=projector.signal))
    with pytest.raises(read_only_error, match=r"read.?only"):
        await mediator.ask(WritingQuery())


async def test_inline_mode_is_never_stale(
    log: AppendLog, open_read_db: Callable[..., ReadDatabase]
) -> None:
    read_db = open_read_db(write=True)
    try:
        inline = InlineProjections(read_db, [balances], decode)
        await inline.setup()
        inline.attach(log)
        mediator = build(log, read_db, ConsistencyGate(log, read_db))
        for i in range(1, 6):
            receipt = await mediator.send_tracked(Deposit("f", 2))
            read = await ask_consistent(
                mediator, GetBalance("f"), receipt.token, policy="fail", timeout=0
            )
            assert (read.value, read.stale) == (2 * i, False)
    finally:
        await read_db.close()


BAD_TIMEOUTS = [float("nan"), float("inf"), float("-inf"), -1.0]


@pytest.mark.parametrize("bad", BAD_TIMEOUTS, ids=["nan", "inf", "-inf", "negative"])
async def test_bad_timeouts_are_refused(log: AppendLog, read_db: ReadDatabase, bad: float) -> None:
    token = await stopped_projector_setup(log, read_db)
    mediator = build(log, read_db, ConsistencyGate(log, read_db))
    with pytest.raises(ValidationError, match="timeout"):
        await asyncio.wait_for(ask_consistent(mediator, GetBalance("c"), token, timeout=bad), 10)
    with pytest.raises(ValidationError, match="timeout"):
        async with read_after(token, timeout=bad):
            pass
    with pytest.raises(ValidationError, match="timeout"):
        await asyncio.wait_for(
            ConsistencyGate(log, read_db).check(["balances"], token, "wait", bad), 10
        )
    with pytest.raises(ConfigurationError, match="timeout"):
        reads("balances", timeout=bad)
    with pytest.raises(ConfigurationError, match="max_timeout"):
        ConsistencyGate(log, read_db, max_timeout=bad)


async def test_a_nan_timeout_cannot_delay_another_querys_deadline(
    log: AppendLog, read_db: ReadDatabase
) -> None:
    # a NaN deadline used to reach the event loop's timer heap (breaking its order, so
    # other queries' deadlines fired late) and to spin forever; now it is refused at once
    token = await stopped_projector_setup(log, read_db)
    mediator = build(log, read_db, ConsistencyGate(log, read_db))
    loop = asyncio.get_running_loop()

    async def on_time() -> float:
        started = loop.time()
        with pytest.raises(StaleReadError):
            await ask_consistent(mediator, GetBalance("c"), token, policy="wait", timeout=0.3)
        return loop.time() - started

    bad = asyncio.ensure_future(
        ask_consistent(mediator, GetBalance("c"), token, policy="wait", timeout=float("nan"))
    )
    good = asyncio.ensure_future(on_time())
    try:
        outcome = await asyncio.wait_for(asyncio.gather(bad, good, return_exceptions=True), 15)
    finally:
        bad.cancel()
        good.cancel()
    assert isinstance(outcome[0], ValidationError)
    assert isinstance(outcome[1], float), outcome[1]
    assert 0.3 <= outcome[1] < 5.0  # its own deadline, not delayed


async def test_a_token_whose_event_is_parked_is_stale_not_missing(
    log: AppendLog, read_db: ReadDatabase, projector: Projector, poison_flag: Path
) -> None:
    # the checkpoint moves past a parked event, but the read model does not contain that
    # write: a query with its token is stale (or fails, by policy), never a silent miss
    poison_flag.touch()
    mediator = build(log, read_db, ConsistencyGate(log, read_db, signal=projector.signal))
    await log.append("p", Deposited("p", 1))
    [parked] = await log.append("p", Poison("p"))
    [other] = await log.append("q", Deposited("q", 5))
    gate = ConsistencyGate(log, read_db, signal=projector.signal)
    # the later, unrelated command is readable: the parked event is not its write
    read = await ask_consistent(mediator, GetBalance("q"), other.position, timeout=10.0)
    assert (read.value, read.stale) == (5, False)
    assert (await gate.positions(["balances"]))["balances"] >= parked.position
    read = await ask_consistent(
        mediator, GetBalance("p"), parked.position, policy="stale", timeout=0
    )
    assert read.stale is True
    with pytest.raises(StaleReadError, match="parked"):
        await ask_consistent(mediator, GetBalance("p"), parked.position, policy="fail")
    with pytest.raises(StaleReadError, match="parked"):
        await ask_consistent(mediator, GetBalance("p"), parked.position, timeout=0.1)
    # fixed and retried: the token is served, fresh
    poison_flag.unlink()
    await request_retry(read_db, "balances")
    read = await ask_consistent(mediator, GetBalance("p"), parked.position, timeout=10.0)
    assert (read.value, read.stale) == (1, False)


async def test_only_the_commands_own_parked_events_make_its_token_stale(
    log: AppendLog, read_db: ReadDatabase, projector: Projector, poison_flag: Path
) -> None:
    # positions are dense on SQLite and (xid << 20) + n on PostgreSQL: either way a parked
    # event makes a token stale only when it belongs to the token's own command
    poison_flag.touch()
    store = cast(EventStore, log)

    async def command(*events: tuple[str, Event]) -> int:
        uow = await store.begin()
        for stream, event in events:
            uow.record(stream, event)
        last = await uow.commit()
        assert last is not None
        return last

    gate = ConsistencyGate(log, read_db, signal=projector.signal)

    async def stale(token: int) -> bool:
        return await gate.check(["balances"], token, "stale", 10.0)

    before = await command(("a", Deposited("a", 1)))
    own = await command(("x", Poison("x")), ("y", Deposited("y", 2)))  # parked, then applied
    after = await command(("z", Deposited("z", 3)))  # right after the parked event
    pair = await command(("z", Deposited("z", 4)), ("w", Deposited("w", 5)))
    blocked = await command(("x", Deposited("x", 6)))  # behind the parked event of its stream
    last = await command(("v", Deposited("v", 7)), ("v", Deposited("v", 8)))
    assert [await stale(t) for t in (before, own, after, pair, blocked, last)] == [
        False,
        True,
        False,
        False,
        True,
        False,
    ]
    positions = await gate.positions(["balances"])
    assert positions["balances"] >= last
