"""A write connection whose operation was interrupted is never used again, and no wait on a
server that stopped answering is without a bound.

* The server ends a session while it sits idle between commands (``pg_terminate_backend``
  here; a fast shutdown and the idle timeouts send the same ``FATAL``). The client can read
  that goodbye before it sees the connection close; asyncpg then refuses the next statement
  before sending it. A command that needed to send BEGIN starts again on a fresh
  connection; one that got the connection inside its begun-ahead transaction fails with
  :class:`ConnectionLostError` ("nothing was committed"), and the next command works.
* A handler's statement is cancelled (the command's timeout): the connection is given up,
  never reused, whether the server answers the cancellation (its statement is cancelled
  there, nothing keeps running) or not at all (the command still ends at its deadline).
* A handler fails while the server does not answer: the ROLLBACK waits at most
  ``commit_timeout`` and the handler's own error reaches the caller.

Faults are real: an admin connection ends sessions, and a TCP proxy holds a closed
session's client side open or swallows every byte. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import select
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import pytest
from tests.support.proxy import FaultProxy, Mode

from cqrskit import Command, Event, Mediator, Registry
from cqrskit.errors import ConnectionLostError, DispatchTimeoutError
from cqrskit.pipeline import TimeoutBehavior
from cqrskit.postgres import PostgresEventStore, PostgresUnitOfWork

pytestmark = pytest.mark.postgres

BOUND = 10.0  # seconds any single step may take


@dataclass(frozen=True, slots=True)
class Put(Command[int]):
    key: str


@dataclass(frozen=True, slots=True)
class Stored(Event):
    key: str


Fault = Callable[[PostgresUnitOfWork], Awaitable[None]]


@dataclass
class Plan:
    """What the handler does before its statement, once; ``statement=False`` leaves the
    handler without a statement of its own (the COMMIT is then the first one sent)."""

    fault: Fault | None = None
    statement: bool = True
    pids: list[int] = field(default_factory=list)


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", 5432)
    await p.start()
    try:
        yield p
    finally:
        p.release_close.set()
        await p.close()


@pytest.fixture
async def admin(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def open_store(dsn: str, schema: str, **options: float) -> PostgresEventStore:
    store = await PostgresEventStore.open(dsn, schema=schema, max_size=1, **options)  # type: ignore[arg-type]
    async with store.pool.acquire() as conn:
        await conn.execute(f'CREATE TABLE IF NOT EXISTS "{schema}".state (key text NOT NULL)')
    return store


def build(store: PostgresEventStore, schema: str, plan: Plan, *behaviors: object) -> Mediator:
    registry = Registry()

    @registry.handler
    async def put(cmd: Put, uow: PostgresUnitOfWork) -> int:
        pid = int(uow.connection.get_server_pid())
        plan.pids.append(pid)
        fault, plan.fault = plan.fault, None
        if fault is not None:
            await fault(uow)
        if plan.statement:
            await uow.connection.execute(f'INSERT INTO "{schema}".state VALUES ($1)', cmd.key)
        uow.record(f"s-{cmd.key}", Stored(cmd.key))
        return pid

    return Mediator(
        registry, behaviors=[store.transaction(), *behaviors], resolver=store.resolver()
    )


async def logged(dsn: str, schema: str) -> list[str]:
    """The streams in the event log, in order, read on a direct connection."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f'SELECT stream FROM "{schema}".cqrskit_events ORDER BY position')
    finally:
        await conn.close()
    return [str(r[0]) for r in rows]


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while not await check():
        assert loop.time() < deadline, f"{what} not within {BOUND} s"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("statement", [True, False], ids=["statement", "commit-only"])
@pytest.mark.parametrize("begin_ahead", [0.0, 30.0], ids=["begin", "begun-ahead"])
async def test_a_session_the_server_ended_while_idle_is_not_used_again(
    postgres_dsn: str,
    pg_schema: str,
    proxy: FaultProxy,
    admin: asyncpg.Connection,
    begin_ahead: float,
    statement: bool,
) -> None:
    store = await open_store(proxy.dsn(postgres_dsn), pg_schema, begin_ahead=begin_ahead)
    try:
        plan = Plan(statement=statement)
        mediator = build(store, pg_schema, plan)
        first = await asyncio.wait_for(mediator.send(Put("a")), BOUND)
        proxy.hold_server_close = True
        await admin.execute("SELECT pg_terminate_backend($1)", first)
        await asyncio.wait_for(proxy.server_closed.wait(), BOUND)
        # the server's FATAL is already in the client's socket (the proxy wrote it before
        # it saw the close): a few passes of the event loop have asyncpg read it
        for _ in range(5):
            await asyncio.sleep(0)
        if begin_ahead:
            # the idle connection is inside the transaction its last COMMIT began: nothing
            # is sent before the handler's first statement (or the COMMIT), which asyncpg
            # refuses before sending it
            with pytest.raises(ConnectionLostError, match="nothing was committed"):
                await asyncio.wait_for(mediator.send(Put("b")), BOUND)
            expected = ["s-a", "s-c"]
        else:
            # BEGIN is refused before it is sent: the command begins on a fresh connection
            second = await asyncio.wait_for(mediator.send(Put("b")), BOUND)
            assert second != first
            expected = ["s-a", "s-b", "s-c"]
        proxy.release_close.set()
        third = await asyncio.wait_for(mediator.send(Put("c")), BOUND)
        assert third != first
        assert await logged(postgres_dsn, pg_schema) == expected
    finally:
        await asyncio.wait_for(store.close(), BOUND)


@pytest.mark.parametrize("statement", [True, False], ids=["statement", "commit-only"])
async def test_a_session_ended_while_idle_is_replaced_before_the_loop_read_its_end(
    postgres_dsn: str, pg_schema: str, statement: bool
) -> None:
    # The server ends the idle, begun-ahead session and the end of the stream is in the
    # client's socket, but the event loop has not run since: the next command must see it
    # before using the connection (asyncpg does not know yet) and take a fresh one.
    store = await open_store(postgres_dsn, pg_schema, begin_ahead=30.0)
    try:
        plan = Plan(statement=statement)
        mediator = build(store, pg_schema, plan)
        first = await asyncio.wait_for(mediator.send(Put("a")), BOUND)
        assert store._writers is not None
        [(conn, _)] = store._writers._idle
        fd = conn._transport.get_extra_info("socket").fileno()

        async def terminate() -> None:
            other = await asyncpg.connect(postgres_dsn)
            try:
                await other.execute("SELECT pg_terminate_backend($1)", first)
            finally:
                await other.close()

        # from another thread, with a loop of its own: this loop does not run meanwhile
        ender = threading.Thread(target=asyncio.run, args=(terminate(),))
        ender.start()
        ender.join(BOUND)
        assert not ender.is_alive()
        waiting = select.poll()  # until the server's end of the stream is in the socket
        waiting.register(fd, select.POLLRDHUP)
        assert waiting.poll(BOUND * 1000), "the server did not end the session"
        assert not conn.is_closed()  # asyncpg has not seen it
        second = await asyncio.wait_for(mediator.send(Put("b")), BOUND)
        assert second != first
        assert conn.is_closed()
        assert await logged(postgres_dsn, pg_schema) == ["s-a", "s-b"]
    finally:
        await asyncio.wait_for(store.close(), BOUND)


async def test_a_cancelled_statement_gives_its_connection_up(
    postgres_dsn: str, pg_schema: str, admin: asyncpg.Connection
) -> None:
    store = await open_store(postgres_dsn, pg_schema)
    try:
        plan = Plan()
        mediator = build(store, pg_schema, plan, TimeoutBehavior(2.0))
        first = await asyncio.wait_for(mediator.send(Put("a")), BOUND)

        async def sleep_long(uow: PostgresUnitOfWork) -> None:
            await uow.connection.execute("SELECT pg_sleep(60)")

        plan.fault = sleep_long
        with pytest.raises(DispatchTimeoutError):
            await asyncio.wait_for(mediator.send(Put("b")), BOUND)

        async def gone() -> bool:
            # the cancelled statement stops on the server and the session ends
            found = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", first
            )
            return int(found) == 0

        await until(gone, "the interrupted session ending")
        third = await asyncio.wait_for(mediator.send(Put("c")), BOUND)
        assert third != first
        assert await logged(postgres_dsn, pg_schema) == ["s-a", "s-c"]
    finally:
        await asyncio.wait_for(store.close(), BOUND)


async def test_a_statement_cancelled_on_a_silent_server_ends_at_its_deadline(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy
) -> None:
    store = await open_store(proxy.dsn(postgres_dsn), pg_schema, commit_timeout=1.0)
    try:
        plan = Plan()
        mediator = build(store, pg_schema, plan, TimeoutBehavior(2.0))
        first = await asyncio.wait_for(mediator.send(Put("a")), BOUND)

        async def silence(uow: PostgresUnitOfWork) -> None:
            proxy.mode = Mode.BLACKHOLE

        plan.fault = silence
        with pytest.raises(DispatchTimeoutError):
            await asyncio.wait_for(mediator.send(Put("b")), BOUND)
        proxy.mode = Mode.FORWARD
        third = await asyncio.wait_for(mediator.send(Put("c")), BOUND)
        assert third != first
        assert await logged(postgres_dsn, pg_schema) == ["s-a", "s-c"]
    finally:
        await asyncio.wait_for(store.close(), BOUND)


async def test_a_failed_handler_on_a_silent_server_gets_its_own_error(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy
) -> None:
    store = await open_store(proxy.dsn(postgres_dsn), pg_schema, commit_timeout=1.0)
    try:
        plan = Plan()
        mediator = build(store, pg_schema, plan)
        first = await asyncio.wait_for(mediator.send(Put("a")), BOUND)

        async def silence_and_fail(uow: PostgresUnitOfWork) -> None:
            await uow.connection.execute(f'INSERT INTO "{pg_schema}".state VALUES ($1)', "b")
            proxy.mode = Mode.BLACKHOLE
            raise ValueError("the handler refused")

        plan.fault = silence_and_fail
        with pytest.raises(ValueError, match="the handler refused"):
            await asyncio.wait_for(mediator.send(Put("b")), BOUND)
        proxy.mode = Mode.FORWARD
        third = await asyncio.wait_for(mediator.send(Put("c")), BOUND)
        assert third != first
        assert await logged(postgres_dsn, pg_schema) == ["s-a", "s-c"]
    finally:
        await asyncio.wait_for(store.close(), BOUND)
