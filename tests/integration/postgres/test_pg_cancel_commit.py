"""A cancellation that arrives while COMMIT is on the wire waits for its outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
import pytest
from tests.support.proxy import FaultProxy, Mode

from cqrskit import Command, Event, Mediator, Receipt, Registry
from cqrskit.errors import CommitOutcomeUnknownError, ConnectionLostError
from cqrskit.mediator import _receipt_var
from cqrskit.postgres import PostgresEventStore, PostgresUnitOfWork


@dataclass(frozen=True)
class Open(Command[None]):
    name: str


@dataclass(frozen=True)
class Opened(Event):
    name: str


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", 5432)
    await p.start()
    try:
        yield p
    finally:
        p.release_replies.set()
        await p.close()


async def test_cancel_during_commit_keeps_the_commit_and_its_token(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy
) -> None:
    store = await PostgresEventStore.open(
        proxy.dsn(postgres_dsn), schema=pg_schema, min_size=1, max_size=2, notify=False
    )
    registry = Registry()

    @registry.handler
    async def open_(cmd: Open, uow: PostgresUnitOfWork) -> None:
        uow.record(cmd.name, Opened(cmd.name), expected_version=0)

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    receipt = Receipt()

    async def send() -> None:
        _receipt_var.set(receipt)  # the task's own context: like send_tracked, kept after
        await mediator.send(Open("a"))

    try:
        proxy.mode = Mode.HOLD_COMMIT_REPLY
        task = asyncio.create_task(send())
        await asyncio.wait_for(proxy.commit_seen.wait(), 10)
        task.cancel()
        await asyncio.sleep(0)  # let the cancellation land while the reply is held
        proxy.release_replies.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert task.cancelled()
        proxy.mode = Mode.FORWARD
        last = await store.last_position()
        assert last > 0  # the command committed
        assert receipt.token == last  # and its token was reported before the cancel
        [event] = await store.read_stream("a")
        assert event.position == last
    finally:
        await store.close()


async def test_a_timeout_during_commit_raises_timeout_error_and_keeps_the_commit(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy
) -> None:
    # The timeout's cancellation is held back until the COMMIT's outcome is in, then
    # delivered at the next await inside the scope; asyncio.timeout() turns it into
    # TimeoutError only if the task's cancellation requests balance: counted once.
    store = await PostgresEventStore.open(
        proxy.dsn(postgres_dsn), schema=pg_schema, min_size=1, max_size=1, notify=False
    )
    registry = Registry()

    @registry.handler
    async def open_(cmd: Open, uow: PostgresUnitOfWork) -> None:
        uow.record(cmd.name, Opened(cmd.name), expected_version=0)

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    receipt = Receipt()
    scopes: list[asyncio.Timeout] = []

    async def send() -> None:
        _receipt_var.set(receipt)
        async with asyncio.timeout(None) as scope:
            scopes.append(scope)
            await mediator.send(Open("a"))
            await asyncio.sleep(0)  # the next await: the cancellation arrives here

    try:
        proxy.mode = Mode.HOLD_COMMIT_REPLY
        task = asyncio.create_task(send())
        await asyncio.wait_for(proxy.commit_seen.wait(), 10)
        [scope] = scopes
        scope.reschedule(asyncio.get_running_loop().time())  # expires while the reply is held
        await _until(scope.expired)
        assert not task.done()  # the COMMIT's outcome is awaited
        proxy.release_replies.set()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(task, 10)
        proxy.mode = Mode.FORWARD
        last = await store.last_position()
        assert last > 0
        assert receipt.token == last
        assert task.cancelling() == 0  # no cancellation request left over
    finally:
        await store.close()


async def test_a_timeout_during_commit_is_raised_inside_its_block(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy
) -> None:
    """With nothing to await after send() in the block, the held cancellation still comes
    out of send() (so asyncio.timeout() raises TimeoutError), not at an unrelated await
    after the block, where it would look like a stop request (found in review)."""
    store = await PostgresEventStore.open(
        proxy.dsn(postgres_dsn), schema=pg_schema, min_size=1, max_size=1, notify=False
    )
    registry = Registry()

    @registry.handler
    async def open_(cmd: Open, uow: PostgresUnitOfWork) -> None:
        uow.record(cmd.name, Opened(cmd.name), expected_version=0)

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    scopes: list[asyncio.Timeout] = []
    after: list[str] = []

    async def send() -> None:
        try:
            async with asyncio.timeout(None) as scope:
                scopes.append(scope)
                await mediator.send(Open("a"))
        except TimeoutError:
            after.append("timeout")
        await asyncio.sleep(0)  # an unrelated await after the block
        after.append("went on")

    try:
        proxy.mode = Mode.HOLD_COMMIT_REPLY
        task = asyncio.create_task(send())
        await asyncio.wait_for(proxy.commit_seen.wait(), 10)
        [scope] = scopes
        scope.reschedule(asyncio.get_running_loop().time())
        await _until(scope.expired)
        proxy.release_replies.set()
        await asyncio.wait_for(task, 10)
        assert after == ["timeout", "went on"]
        assert task.cancelling() == 0
        proxy.mode = Mode.FORWARD
        assert len(await store.read_stream("a")) == 1  # committed all the same
    finally:
        await store.close()


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds: the event loop must process the connections' EOF."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("begin_ahead", [0.0, 0.05])
async def test_a_dead_idle_connection_is_replaced_before_the_next_command(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy, begin_ahead: float
) -> None:
    store = await PostgresEventStore.open(
        proxy.dsn(postgres_dsn),
        schema=pg_schema,
        min_size=1,
        max_size=1,
        notify=False,
        begin_ahead=begin_ahead,
    )
    registry = Registry()

    @registry.handler
    async def open_(cmd: Open, uow: PostgresUnitOfWork) -> None:
        uow.record(cmd.name, Opened(cmd.name), expected_version=0)

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    try:
        await mediator.send(Open("before"))
        assert store._writers is not None
        idle = [conn for conn, _ in store._writers._idle]
        assert idle
        proxy.reset_all()  # every open connection dies, as in a server restart
        await _until(lambda: all(conn.is_closed() for conn in idle))
        await mediator.send(Open("after"))  # the dead one is dropped, a new one opened
        assert [e.version for e in await store.read_stream("after")] == [1]
        assert [e.version for e in await store.read_stream("before")] == [1]
    finally:
        await store.close()


@pytest.mark.parametrize("touch", [True, False])
async def test_a_connection_that_died_unnoticed_fails_one_command_and_commits_nothing(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy, touch: bool
) -> None:
    # The connection dies right after its COMMIT; BEGIN, and the next command takes it
    # before the event loop has seen the EOF: that command fails with a typed error, nothing
    # of it is stored, and the command after it runs on a fresh connection.
    store = await PostgresEventStore.open(
        proxy.dsn(postgres_dsn), schema=pg_schema, min_size=1, max_size=1, notify=False
    )
    registry = Registry()

    @registry.handler
    async def open_(cmd: Open, uow: PostgresUnitOfWork) -> None:
        if touch:
            await uow.connection.execute("SELECT 1")
        uow.record(cmd.name, Opened(cmd.name), expected_version=0)

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    try:
        await mediator.send(Open("before"))
        proxy.reset_all()  # no await in between: the client has not seen it yet
        # the handler's own statement meets the dead connection first (nothing was
        # committed: ConnectionLostError, a typed error the retry behavior retries), or
        # else the COMMIT does: its outcome cannot be known
        expected = ConnectionLostError if touch else CommitOutcomeUnknownError
        with pytest.raises(expected) as info:
            await mediator.send(Open("lost"))
        assert isinstance(info.value.__cause__, asyncpg.PostgresConnectionError)
        await mediator.send(Open("after"))
        assert await store.read_stream("lost") == []
        assert [e.version for e in await store.read_stream("after")] == [1]
    finally:
        await store.close()
