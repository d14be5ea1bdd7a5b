"""``begin_ahead``: a commit sends ``COMMIT; BEGIN`` so the next command skips BEGIN.

What must hold: the empty transaction holds back no reader; a connection idle past the
window is rolled back in the background; a command never starts in a transaction older
than the window (so ``now()`` is fresh); errors end in ``ROLLBACK; BEGIN`` the same way;
``begin_ahead=0`` leaves connections outside any transaction; under mixed load with
cancellations, tokens match the log, commands stay atomic and no connection is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import pytest

import cqrskit.postgres._connections as pg
from cqrskit import Command, Event, Mediator, Registry
from cqrskit.errors import ConfigurationError
from cqrskit.postgres import PostgresEventStore, PostgresUnitOfWork
from cqrskit.testing.eventlog import wait_visible

pytestmark = pytest.mark.postgres


@dataclass(frozen=True)
class Open(Command[datetime]):
    name: str
    fail: bool = False


@dataclass(frozen=True)
class Opened(Event):
    name: str


class Refused(Exception):
    pass


def _app(store: PostgresEventStore) -> Mediator:
    registry = Registry()

    @registry.handler
    async def open_(cmd: Open, uow: PostgresUnitOfWork) -> datetime:
        started: datetime = await uow.connection.fetchval("SELECT now()")
        uow.record(cmd.name, Opened(cmd.name), expected_version=0)
        if cmd.fail:
            raise Refused(cmd.name)
        return started

    return Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())


def _idle(store: PostgresEventStore) -> list[asyncpg.Connection]:
    assert store._writers is not None
    return [conn for conn, _ in store._writers._idle]


async def _state(admin: asyncpg.Connection, conn: asyncpg.Connection) -> str:
    state: str = await admin.fetchval(
        "SELECT state FROM pg_stat_activity WHERE pid = $1", conn.get_server_pid()
    )
    return state


@contextlib.asynccontextmanager
async def _opened(
    dsn: str, schema: str, begin_ahead: float, **kwargs: Any
) -> AsyncIterator[tuple[PostgresEventStore, Mediator, asyncpg.Connection]]:
    """A store with ``begin_ahead``, its mediator and an admin connection, all closed after."""
    store = await PostgresEventStore.open(dsn, schema=schema, begin_ahead=begin_ahead, **kwargs)
    admin = await asyncpg.connect(dsn)
    try:
        yield store, _app(store), admin
    finally:
        await admin.close()
        await store.close()


async def _until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_the_begun_transaction_holds_back_no_reader(
    postgres_dsn: str, pg_schema: str
) -> None:
    async with _opened(postgres_dsn, pg_schema, 60) as (store, mediator, admin):
        for name in ("a", "b", "c"):
            await mediator.send(Open(name))
        [conn] = _idle(store)
        assert conn.is_in_transaction()
        assert await _state(admin, conn) == "idle in transaction"
        row = await admin.fetchrow(
            "SELECT backend_xid, backend_xmin FROM pg_stat_activity WHERE pid = $1",
            conn.get_server_pid(),
        )
        assert row is not None
        assert (row[0], row[1]) == (None, None)  # no xid, no snapshot
        # the reader's horizon reaches the last commit although the writer sits in BEGIN
        # (for 60 s: a wait bounded well below that would time out if it held readers)
        last = await store.last_position()
        await wait_visible(store, last, timeout=10.0)
        assert await store.head() == last
        assert [e.stream for e in await store.read_after(0)] == ["a", "b", "c"]


async def test_an_idle_connection_is_rolled_back_after_the_window(
    postgres_dsn: str, pg_schema: str
) -> None:
    async with _opened(postgres_dsn, pg_schema, 0.05) as (store, mediator, admin):
        await mediator.send(Open("a"))
        [conn] = _idle(store)

        async def ended() -> bool:
            return not conn.is_in_transaction() and await _state(admin, conn) == "idle"

        await _until(ended)
        observed: datetime = await admin.fetchval("SELECT clock_timestamp()")
        started = await mediator.send(Open("b"))  # BEGIN sent afresh
        assert started >= observed
        assert _idle(store) == [conn]  # the same connection, begun again by the commit
        assert conn.is_in_transaction()


async def test_a_connection_older_than_the_window_begins_afresh(
    postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the background rollback has not run yet (the window is long), but the clock says
    # the connection waited longer than the window: the command sends ROLLBACK; BEGIN
    async with _opened(postgres_dsn, pg_schema, 30) as (store, mediator, admin):
        first = await mediator.send(Open("a"))
        late = types.SimpleNamespace(monotonic=lambda: time.monotonic() + 31)
        monkeypatch.setattr(pg, "time", late)
        observed: datetime = await admin.fetchval("SELECT clock_timestamp()")
        second = await mediator.send(Open("b"))
        assert second >= observed > first
        [conn] = _idle(store)
        assert conn.is_in_transaction()


async def test_within_the_window_the_next_command_reuses_the_begun_transaction(
    postgres_dsn: str, pg_schema: str
) -> None:
    async with _opened(postgres_dsn, pg_schema, 60) as (store, mediator, admin):
        await mediator.send(Open("a"))
        [conn] = _idle(store)
        begun: datetime = await admin.fetchval(
            "SELECT xact_start FROM pg_stat_activity WHERE pid = $1", conn.get_server_pid()
        )
        started = await mediator.send(Open("b"))
        assert started == begun  # no BEGIN was sent: the transaction began at a's COMMIT


async def test_without_a_socket_poll_the_begun_transaction_is_still_reused(
    postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a platform without select.poll: the store cannot see whether anything arrived on an
    # idle connection's socket, lets the event loop run once instead and goes on
    monkeypatch.setattr(pg, "select", types.SimpleNamespace())
    async with _opened(postgres_dsn, pg_schema, 60) as (store, mediator, admin):
        await mediator.send(Open("a"))
        assert store._writers is not None
        assert store._writers._polls == {}
        [conn] = _idle(store)
        begun: datetime = await admin.fetchval(
            "SELECT xact_start FROM pg_stat_activity WHERE pid = $1", conn.get_server_pid()
        )
        started = await mediator.send(Open("b"))
        assert started == begun
        assert _idle(store) == [conn]


async def test_a_failed_command_rolls_back_and_begins_the_next(
    postgres_dsn: str, pg_schema: str
) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, begin_ahead=60)
    try:
        mediator = _app(store)
        with pytest.raises(Refused):
            await mediator.send(Open("x", fail=True))
        [conn] = _idle(store)
        assert conn.is_in_transaction()
        await mediator.send(Open("y"))
        assert await store.read_stream("x") == []
        assert [e.version for e in await store.read_stream("y")] == [1]
    finally:
        await store.close()


async def test_begin_ahead_zero_leaves_connections_outside_a_transaction(
    postgres_dsn: str, pg_schema: str
) -> None:
    async with _opened(postgres_dsn, pg_schema, 0) as (store, mediator, admin):
        observed: datetime = await admin.fetchval("SELECT clock_timestamp()")
        started = await mediator.send(Open("a"))
        await mediator.send(Open("b"))
        assert started >= observed
        [conn] = _idle(store)
        assert not conn.is_in_transaction()
        assert await _state(admin, conn) == "idle"


@pytest.mark.parametrize("bad", [-1.0, math.nan])
async def test_a_bad_window_is_refused(postgres_dsn: str, pg_schema: str, bad: float) -> None:
    with pytest.raises(ConfigurationError, match="begin_ahead"):
        await PostgresEventStore.open(postgres_dsn, schema=pg_schema, begin_ahead=bad)


async def test_close_waits_for_background_rollbacks(postgres_dsn: str, pg_schema: str) -> None:
    store = await PostgresEventStore.open(
        postgres_dsn, schema=pg_schema, begin_ahead=0.01, max_size=4
    )
    mediator = _app(store)
    await asyncio.gather(*(mediator.send(Open(f"s{i}")) for i in range(4)))
    assert store._writers is not None
    writers = store._writers

    async def sweeping() -> bool:
        return bool(writers._ending) or not any(c.is_in_transaction() for c in _idle(store))

    await _until(sweeping)
    await store.close()
    assert not writers._ending
    assert writers._opened == 0


@dataclass(frozen=True)
class Mixed(Command[str]):
    stream: str
    events: int
    query_first: bool
    fail: bool


async def test_mixed_load_keeps_tokens_atomicity_and_connection_accounting(
    postgres_dsn: str, pg_schema: str
) -> None:
    # 6 clients x 40 tracked commands on 4 connections with a 10 ms window, so that
    # commits, failures, cancellations (some while COMMIT is on the wire) and background
    # rollbacks of idle connections interleave; bounded by count and by a deadline
    rng = random.Random(20261126)
    store = await PostgresEventStore.open(
        postgres_dsn, schema=pg_schema, begin_ahead=0.01, max_size=4
    )
    registry = Registry()

    @registry.handler
    async def mixed(cmd: Mixed, uow: PostgresUnitOfWork) -> str:
        if cmd.query_first:
            await uow.connection.fetchval("SELECT pg_sleep(0.002)")
        uow.record(cmd.stream, *(Opened(f"{cmd.stream}.{i}") for i in range(cmd.events)))
        if cmd.fail:
            raise Refused(cmd.stream)
        return cmd.stream

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    plan = [
        [
            Mixed(f"c{c}-{i}", rng.randint(1, 3), rng.random() < 0.3, rng.random() < 0.1)
            for i in range(40)
        ]
        for c in range(6)
    ]
    cancel_after = {cmd.stream: rng.random() * 0.004 for cmds in plan for cmd in cmds}
    cancel_after = {s: d for s, d in cancel_after.items() if rng.random() < 0.2}
    tokens: dict[str, int | None] = {}
    outcomes: dict[str, str] = {}

    async def client(cmds: list[Mixed]) -> None:
        for cmd in cmds:
            task = asyncio.ensure_future(mediator.send_tracked(cmd))
            if cmd.stream in cancel_after:
                await asyncio.sleep(cancel_after[cmd.stream])  # a fault at a random moment
                task.cancel()
            try:
                tokens[cmd.stream] = (await task).token
                outcomes[cmd.stream] = "ok"
            except asyncio.CancelledError:
                outcomes[cmd.stream] = "cancelled"
            except Refused:
                outcomes[cmd.stream] = "refused"
            await asyncio.sleep(rng.choice([0, 0, 0.005, 0.015]))  # idle: some get swept

    writers = store._writers
    assert writers is not None
    try:
        await asyncio.wait_for(asyncio.gather(*(client(c) for c in plan)), timeout=60)
        assert set(outcomes.values()) <= {"ok", "cancelled", "refused"}
        assert "ok" in outcomes.values()
        assert "cancelled" in outcomes.values()
        for cmds in plan:
            for cmd in cmds:
                stored = await store.read_stream(cmd.stream)
                outcome = outcomes[cmd.stream]
                if outcome == "ok":
                    assert [e.version for e in stored] == list(range(1, cmd.events + 1))
                    assert tokens[cmd.stream] == stored[-1].position
                elif outcome == "refused":
                    assert stored == []
                else:  # cancelled: all of its events or none (COMMIT may have been sent)
                    assert len(stored) in (0, cmd.events)

        async def quiet() -> bool:
            return not writers._ending and not writers._waiters

        await _until(quiet)
        assert writers._opened == len(writers._idle) <= 4
        assert all(not conn.is_closed() for conn, _ in writers._idle)
        assert len(store._xids) <= 4  # at most one stale entry per connection
    finally:
        await store.close()
    assert writers._opened == 0
