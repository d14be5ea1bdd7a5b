"""A cancellation that arrives while COMMIT is on the wire waits for its outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from tests.support.proxy import FaultProxy, Mode

from cqrskit import Command, Event, Mediator, Receipt, Registry
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


async def test_a_dead_idle_connection_is_replaced_before_the_next_command(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy
) -> None:
    store = await PostgresEventStore.open(
        proxy.dsn(postgres_dsn), schema=pg_schema, min_size=1, max_size=1, notify=False
    )
    registry = Registry()

    @registry.handler
    async def open_(cmd: Open, uow: PostgresUnitOfWork) -> None:
        uow.record(cmd.name, Opened(cmd.name), expected_version=0)

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    try:
        await mediator.send(Open("before"))
        proxy.reset_all()  # every open connection dies, as in a server restart
        await mediator.send(Open("after"))  # BEGIN fails on the dead one, retried on a new one
        assert [e.version for e in await store.read_stream("after")] == [1]
        assert [e.version for e in await store.read_stream("before")] == [1]
    finally:
        await store.close()
