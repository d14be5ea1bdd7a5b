"""``notify=True``: the NOTIFY goes out after the commit, on a connection of its own, and
readers' LISTEN connection survives cancellation and a server that ended it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from cqrskit.errors import PersistenceError
from cqrskit.postgres import PostgresEventStore
from cqrskit.testing.eventlog import Opened

pytestmark = pytest.mark.postgres


class Heard:
    """A raw LISTEN connection recording (pid, monotonic time) of each notification."""

    def __init__(self) -> None:
        self.got: list[tuple[int, float]] = []
        self.event = asyncio.Event()
        self.conn: Any = None

    async def open(self, dsn: str, channel: str) -> None:
        self.conn = await asyncpg.connect(dsn)
        await self.conn.add_listener(channel, self._on)

    def _on(self, _conn: Any, pid: int, _channel: str, _payload: str) -> None:
        self.got.append((pid, time.monotonic()))
        self.event.set()

    async def next(self, timeout: float = 10.0) -> tuple[int, float]:
        await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()
        return self.got[-1]

    async def close(self) -> None:
        await self.conn.close()


async def _commit(store: PostgresEventStore, stream: str) -> int:
    """Commit one event; return the server pid of the write connection it used."""
    uow = await store.begin(positions=False)
    pid = int(uow.connection.get_server_pid())
    uow.record(stream, Opened(stream, "x"))
    await uow.commit()
    return pid


async def _settled(store: PostgresEventStore) -> None:
    """Wait until the store's notifier has nothing on its way."""
    notifier = store._notifier
    assert notifier is not None
    task = notifier._task
    if task is not None:
        await asyncio.gather(task, return_exceptions=True)


async def test_notify_comes_after_the_commit_from_another_session(
    postgres_dsn: str, pg_schema: str
) -> None:
    """The notification's sender is not the write connection: the command's transaction
    does not notify, so PostgreSQL does not serialize its commit with other writers'."""
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, notify=True)
    heard = Heard()
    await heard.open(postgres_dsn, store.channel)
    try:
        writer_pid = await _commit(store, "a")
        pid, _ = await heard.next()
        assert pid != writer_pid
        notifier = store._notifier
        assert notifier is not None
        assert notifier._conn is not None
        assert pid == notifier._conn.get_server_pid()
        # a rolled-back command sends nothing
        await _settled(store)  # the NOTIFY may be heard before its reply is read
        sent = notifier.sent
        uow = await store.begin()
        uow.record("b", Opened("b", "x"))
        await uow.rollback()
        await _settled(store)
        assert notifier.sent == sent
    finally:
        await heard.close()
        await store.close()


async def test_concurrent_commits_coalesce_and_the_last_one_is_heard(
    postgres_dsn: str, pg_schema: str
) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, notify=True, max_size=8)
    heard = Heard()
    await heard.open(postgres_dsn, store.channel)
    try:
        done: list[float] = []

        async def writer(k: int) -> None:
            for i in range(25):
                await _commit(store, f"w{k}-{i}")
                done.append(time.monotonic())

        await asyncio.gather(*(writer(k) for k in range(8)))
        last_commit = max(done)
        await _settled(store)
        notifier = store._notifier
        assert notifier is not None
        assert 1 <= notifier.sent <= 200
        # every commit is followed by a NOTIFY sent after it returned
        deadline = time.monotonic() + 10
        while not heard.got or heard.got[-1][1] < last_commit:
            assert time.monotonic() < deadline, "no notification after the last commit"
            await heard.next(deadline - time.monotonic())
    finally:
        await heard.close()
        await store.close()


async def test_a_lost_notifier_connection_fails_no_command_and_reconnects(
    postgres_dsn: str, pg_schema: str
) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, notify=True)
    heard = Heard()
    await heard.open(postgres_dsn, store.channel)
    try:
        await _commit(store, "a")
        first, _ = await heard.next()
        await heard.conn.execute("SELECT pg_terminate_backend($1)", first)
        # the next commits succeed whatever the notifier meets; one of the next few is
        # heard again from a new notifier connection
        for i in range(5):
            await _commit(store, f"after-{i}")
            await _settled(store)
            if heard.event.is_set():
                break
        pid, _ = await heard.next()
        assert pid != first
        assert await store.stream_version("after-0") == 1
    finally:
        await heard.close()
        await store.close()


async def test_a_store_on_your_own_pool_notifies_inside_the_commit(
    postgres_dsn: str, pg_schema: str
) -> None:
    opened = await PostgresEventStore.open(postgres_dsn, schema=pg_schema)  # makes tables
    await opened.close()
    pool = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=2)
    store = PostgresEventStore(pool, schema=pg_schema, notify=True)
    heard = Heard()
    await heard.open(postgres_dsn, store.channel)
    try:
        writer_pid = await _commit(store, "own")
        pid, _ = await heard.next()
        assert pid == writer_pid
        assert store._notifier is None
    finally:
        await heard.close()
        await store.close()


async def test_a_reader_cancelled_while_its_listener_opens_still_wakes_later(
    postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay cancels its wait when acknowledgements come first; a cancellation that
    struck while LISTEN was being set up used to leave a connection that never listened,
    and every later wake-up became a poll."""
    writer = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, notify=True)
    reader = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, notify=True)
    entered = asyncio.Event()
    release = asyncio.Event()
    original = asyncpg.Connection.add_listener

    async def slow_add_listener(self: Any, channel: str, callback: Any) -> None:
        entered.set()
        await release.wait()
        await original(self, channel, callback)

    monkeypatch.setattr(asyncpg.Connection, "add_listener", slow_add_listener)
    try:
        head = await reader.head()
        first = asyncio.ensure_future(reader.wait_for(head, 30))
        await asyncio.wait_for(entered.wait(), 10)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        release.set()
        waiting = asyncio.ensure_future(reader.wait_for(head, 30))
        await asyncio.sleep(0)
        listener = reader._listener
        assert listener is not None
        await listener.ready()  # the same opening, finished
        await _commit(writer, "late")
        assert await asyncio.wait_for(waiting, 10) is True
        assert listener.opened == 1
    finally:
        release.set()
        await writer.close()
        await reader.close()


async def test_a_listener_the_server_ended_is_opened_again(
    postgres_dsn: str, pg_schema: str
) -> None:
    writer = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, notify=True)
    reader = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, notify=True)
    try:
        assert await reader.wait_for(await reader.head(), 0.01) is False  # opens it
        listener = reader._listener
        assert listener is not None
        assert listener._conn is not None
        pid = listener._conn.get_server_pid()
        await _commit(writer, "x")  # a connection to run the termination on
        async with writer.pool.acquire() as conn:
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
        deadline = time.monotonic() + 10
        while not listener._conn.is_closed():  # the client reads the server's goodbye
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        head = await reader.head()
        waiting = asyncio.ensure_future(reader.wait_for(head, 30))
        await listener.ready()
        await _commit(writer, "y")
        assert await asyncio.wait_for(waiting, 10) is True
        assert listener.opened == 2
    finally:
        await writer.close()
        await reader.close()


async def test_wait_for_after_close_opens_no_listener(postgres_dsn: str, pg_schema: str) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, notify=True)
    await store.close()
    with pytest.raises(PersistenceError, match="closed PostgresEventStore"):
        await store.wait_for(0, 0.01)
    assert store._listener is None  # no connection left behind, never closed
