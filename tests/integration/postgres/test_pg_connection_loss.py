"""A lost connection surfaces as a typed error on every path, and a COMMIT waits a bounded
time for its reply.

* Before COMMIT (the key's claim, a handler statement, the event INSERT, a COMMIT that was
  never sent): :class:`ConnectionLostError` ("nothing was committed"), which the retry
  behavior retries; a keyed command then has exactly one effect.
* A COMMIT whose reply never comes (the proxy holds the reply, or black-holes the COMMIT):
  :class:`CommitOutcomeUnknownError` after ``commit_timeout``; the connection is discarded
  and a retry with the same key has exactly one effect.

Faults are real: ``pg_terminate_backend`` from an admin connection, and a TCP proxy between
the store and the server. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import pytest
from tests.support.proxy import FaultProxy, Mode

from cqrskit import Command, Event, Mediator, Registry
from cqrskit.dependencies import Dependencies
from cqrskit.errors import CommitOutcomeUnknownError, ConfigurationError, ConnectionLostError
from cqrskit.eventlog import StoredEvent, UnitOfWork
from cqrskit.idempotency import Idempotency, IdempotencyRecord, idempotency_key
from cqrskit.pipeline.retry import RetryBehavior
from cqrskit.postgres import PostgresEventStore, PostgresUnitOfWork
from cqrskit.postgres.idempotency import PostgresIdempotencyBackend

pytestmark = pytest.mark.postgres

BOUND = 10.0  # seconds any single step may take


@dataclass(frozen=True, slots=True)
class Put(Command[str]):
    key: str


@dataclass(frozen=True, slots=True)
class Stored(Event):
    key: str


Fault = Callable[[PostgresUnitOfWork], Awaitable[None]]


@dataclass
class Plan:
    """What the handler does on its first attempt, and what it saw."""

    fault: Fault | None = None
    calls: int = 0
    errors: list[BaseException] = field(default_factory=list)


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", 5432)
    await p.start()
    try:
        yield p
    finally:
        p.release_replies.set()
        await p.close()


@pytest.fixture
async def admin(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        yield conn
    finally:
        await conn.close()


class ClaimFaultStore(PostgresEventStore):
    """A store whose idempotency claim runs ``before_claim`` first (to reset the proxy)."""

    before_claim: Callable[[], None] | None = None

    def idempotency_backend(self, table: str, wait_timeout: float) -> PostgresIdempotencyBackend:
        store = self

        class Backend(PostgresIdempotencyBackend):
            async def claim(
                self, uow: UnitOfWork, key: str, scope: str
            ) -> IdempotencyRecord | None:
                hook, store.before_claim = store.before_claim, None
                if hook is not None:
                    hook()
                return await super().claim(uow, key, scope)

        return Backend(self, table, wait_timeout)


async def open_store(
    dsn: str, schema: str, *, hooks: bool = False, **kwargs: object
) -> ClaimFaultStore:
    store = await ClaimFaultStore.open(dsn, schema=schema, max_size=2, **kwargs)  # type: ignore[arg-type]
    assert isinstance(store, ClaimFaultStore)
    async with store.pool.acquire() as conn:
        await conn.execute(f'CREATE TABLE IF NOT EXISTS "{schema}".state (key text NOT NULL)')
    if hooks:

        async def inline(uow: UnitOfWork, stored: list[StoredEvent]) -> None:
            return None

        store.add_inline_hook(inline)  # the event INSERT then runs apart from COMMIT
    return store


async def app(store: PostgresEventStore, schema: str, plan: Plan, *, retry: bool) -> Mediator:
    registry = Registry()

    @registry.handler
    async def put(cmd: Put, uow: PostgresUnitOfWork) -> str:
        plan.calls += 1
        fault, plan.fault = plan.fault, None
        if fault is not None:
            await fault(uow)
        await uow.connection.execute(f'INSERT INTO "{schema}".state VALUES ($1)', cmd.key)
        uow.record(f"s-{cmd.key}", Stored(cmd.key))
        return cmd.key

    idem = await Idempotency.open(store)
    behaviors: list[object] = [idem.transaction()]
    if retry:
        behaviors.insert(0, RetryBehavior(attempts=3, base_delay=0.0))
    return Mediator(registry, behaviors=behaviors, resolver=[store.resolver(), Dependencies()])


async def counts(dsn: str, schema: str) -> tuple[int, int, int]:
    """(state rows, events, idempotency keys), read on a direct connection."""
    conn = await asyncpg.connect(dsn)
    try:
        return (
            await conn.fetchval(f'SELECT count(*) FROM "{schema}".state'),
            await conn.fetchval(f'SELECT count(*) FROM "{schema}".cqrskit_events'),
            await conn.fetchval(f'SELECT count(*) FROM "{schema}".cqrskit_idempotency'),
        )
    finally:
        await conn.close()


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while not await check():
        assert loop.time() < deadline, f"{what} not within {BOUND} s"
        await asyncio.sleep(0.01)


def terminate(admin: asyncpg.Connection, *, wait_closed: bool) -> Fault:
    """End the handler's own session from the admin connection; optionally wait until the
    client has seen it closed (the next statement then fails before being sent)."""

    async def fault(uow: PostgresUnitOfWork) -> None:
        await admin.execute("SELECT pg_terminate_backend($1)", uow.connection.get_server_pid())
        if wait_closed:

            async def closed() -> bool:
                return bool(uow.connection.is_closed())

            await until(closed, "the client seeing its connection closed")

    return fault


def terminate_during_statement(admin: asyncpg.Connection) -> Fault:
    """End the handler's session while one of its statements runs on the server."""

    async def fault(uow: PostgresUnitOfWork) -> None:
        pid = uow.connection.get_server_pid()
        sleeping = asyncio.ensure_future(uow.connection.execute("SELECT pg_sleep(60)"))

        async def running() -> bool:
            state = await admin.fetchval(
                "SELECT state FROM pg_stat_activity WHERE pid = $1 AND query LIKE '%pg_sleep%'",
                pid,
            )
            return state == "active"

        try:
            await until(running, "the handler's statement running")
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await asyncio.wait_for(sleeping, BOUND)  # raises the loss into the handler

    return fault


# -- lost before COMMIT: ConnectionLostError, retried, one effect -------------------------


@pytest.mark.parametrize(
    ("path", "hooks"),
    [
        ("handler statement running", False),
        ("handler statement after the close", False),
        ("event INSERT", True),
        ("COMMIT never sent", False),
    ],
)
async def test_loss_before_commit_is_typed_and_retried(
    postgres_dsn: str, pg_schema: str, admin: asyncpg.Connection, path: str, hooks: bool
) -> None:
    store = await open_store(postgres_dsn, pg_schema, hooks=hooks)
    try:
        fault = {
            "handler statement running": terminate_during_statement(admin),
            "handler statement after the close": terminate(admin, wait_closed=True),
            "event INSERT": terminate(admin, wait_closed=True),
            "COMMIT never sent": terminate(admin, wait_closed=True),
        }[path]
        if path in ("event INSERT", "COMMIT never sent"):
            # the handler's own statements run first, then the connection goes
            inner = fault

            async def late(uow: PostgresUnitOfWork) -> None:
                await uow.connection.execute(f'INSERT INTO "{pg_schema}".state VALUES ($1)', "x")
                await inner(uow)

            fault = late
        plan = Plan(fault)
        mediator = await app(store, pg_schema, plan, retry=False)
        with idempotency_key("k1"), pytest.raises(ConnectionLostError) as info:
            await asyncio.wait_for(mediator.send(Put("a")), BOUND)
        assert "nothing was committed" in str(info.value)
        assert not isinstance(info.value, CommitOutcomeUnknownError)
        assert isinstance(info.value.__cause__, asyncpg.PostgresError | asyncpg.InterfaceError)
        assert await counts(postgres_dsn, pg_schema) == (0, 0, 0)

        # the same fault under the retry behavior: retried (a ConnectionError), one effect
        retried = Plan(fault)
        mediator = await app(store, pg_schema, retried, retry=True)
        with idempotency_key("k2"):
            assert await asyncio.wait_for(mediator.send(Put("b")), BOUND) == "b"
        assert retried.calls == 2
        assert await counts(postgres_dsn, pg_schema) == (1, 1, 1)
    finally:
        await store.close()


async def test_loss_at_the_claim_is_typed_and_retried(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy
) -> None:
    store = await open_store(proxy.dsn(postgres_dsn), pg_schema)

    def reset() -> None:
        proxy.mode = Mode.RESET  # aborts every open connection through the proxy...
        proxy.mode = Mode.FORWARD  # ...and lets new ones through again

    try:
        plan = Plan()
        mediator = await app(store, pg_schema, plan, retry=False)
        store.before_claim = reset
        with idempotency_key("c1"), pytest.raises(ConnectionLostError):
            await asyncio.wait_for(mediator.send(Put("a")), BOUND)
        assert plan.calls == 0  # the claim failed: the handler never ran
        assert await counts(postgres_dsn, pg_schema) == (0, 0, 0)

        mediator = await app(store, pg_schema, plan, retry=True)
        store.before_claim = reset
        with idempotency_key("c2"):
            assert await asyncio.wait_for(mediator.send(Put("b")), BOUND) == "b"
        assert plan.calls == 1
        assert await counts(postgres_dsn, pg_schema) == (1, 1, 1)
    finally:
        await store.close()


# -- a COMMIT without a reply: bounded, CommitOutcomeUnknownError, one effect on retry ---


async def _server_sessions_ended(admin: asyncpg.Connection, schema: str) -> None:
    """Wait until no session is left inside a transaction that touched ``schema``'s log
    (a black-holed COMMIT's session ends when the proxy closes its upstream side)."""

    async def gone() -> bool:
        busy = await admin.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 "
            "AND l.pid <> pg_backend_pid()",
            schema,
        )
        return int(busy) == 0

    await until(gone, "the dropped session ending on the server")


@pytest.mark.parametrize("mode", [Mode.HOLD_COMMIT_REPLY, Mode.BLACKHOLE])
async def test_commit_without_reply_times_out(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy, admin: asyncpg.Connection, mode: Mode
) -> None:
    """HOLD_COMMIT_REPLY: the server commits, its reply never comes. BLACKHOLE (switched on
    by an inline hook, after the events were inserted): the COMMIT never reaches the
    server, and the connection stays open."""
    store = await open_store(proxy.dsn(postgres_dsn), pg_schema, commit_timeout=0.5)
    armed = [True]

    async def blackhole(uow: UnitOfWork, stored: list[StoredEvent]) -> None:
        if mode is Mode.BLACKHOLE and armed:
            armed.clear()
            proxy.mode = Mode.BLACKHOLE

    store.add_inline_hook(blackhole)

    async def hold(uow: PostgresUnitOfWork) -> None:
        if mode is Mode.HOLD_COMMIT_REPLY:
            proxy.mode = Mode.HOLD_COMMIT_REPLY

    try:
        plan = Plan(hold)
        mediator = await app(store, pg_schema, plan, retry=False)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with idempotency_key("t"), pytest.raises(CommitOutcomeUnknownError) as info:
            await asyncio.wait_for(mediator.send(Put("a")), BOUND)
        assert loop.time() - started < BOUND  # ended by commit_timeout, not by the test
        assert "within 0.5 s" in str(info.value)
        assert info.value.retry_safe  # the command carried a key
        proxy.mode = Mode.FORWARD
        proxy.release_replies.set()
        if mode is Mode.HOLD_COMMIT_REPLY:
            assert await counts(postgres_dsn, pg_schema) == (1, 1, 1)  # it did commit
        else:
            await _server_sessions_ended(admin, pg_schema)
            assert await counts(postgres_dsn, pg_schema) == (0, 0, 0)  # it never did
        with idempotency_key("t"):
            assert await asyncio.wait_for(mediator.send(Put("a")), BOUND) == "a"
        assert plan.calls == (1 if mode is Mode.HOLD_COMMIT_REPLY else 2)
        assert await counts(postgres_dsn, pg_schema) == (1, 1, 1)
        # the store goes on: the timed-out connection was discarded, not reused
        with idempotency_key("after"):
            assert await asyncio.wait_for(mediator.send(Put("b")), BOUND) == "b"
        assert await counts(postgres_dsn, pg_schema) == (2, 2, 2)
    finally:
        await store.close()


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "5", True])
async def test_commit_timeout_is_validated(postgres_dsn: str, pg_schema: str, bad: object) -> None:
    with pytest.raises(ConfigurationError, match="commit_timeout"):
        await PostgresEventStore.open(postgres_dsn, schema=pg_schema, commit_timeout=bad)  # type: ignore[arg-type]


async def test_an_error_after_commit_in_the_same_round_trip_is_an_unknown_outcome(
    postgres_dsn: str, pg_schema: str
) -> None:
    """The commit's string is "...; COMMIT; BEGIN; SELECT <appender lock>": an error raised
    after COMMIT (here a statement timeout, standing in for the lock table running out of
    shared memory) must not be reported as a refused commit: the command did commit."""
    store = await open_store(postgres_dsn, pg_schema)
    try:
        store._sql_commit += "; SELECT pg_sleep(5)"  # runs after COMMIT; BEGIN

        async def short_timeout(uow: PostgresUnitOfWork) -> None:
            await uow.connection.execute("SET statement_timeout = '100ms'")

        plan = Plan(short_timeout)
        mediator = await app(store, pg_schema, plan, retry=False)
        with idempotency_key("late"), pytest.raises(CommitOutcomeUnknownError) as info:
            await asyncio.wait_for(mediator.send(Put("a")), BOUND)
        assert "may have come after the COMMIT" in str(info.value)
        assert await counts(postgres_dsn, pg_schema) == (1, 1, 1)  # it committed
        store._sql_commit = store._sql_commit.removesuffix("; SELECT pg_sleep(5)")
        with idempotency_key("late"):
            assert await asyncio.wait_for(mediator.send(Put("a")), BOUND) == "a"
        assert plan.calls == 1  # the retry found the committed key
        assert await counts(postgres_dsn, pg_schema) == (1, 1, 1)
    finally:
        await store.close()
