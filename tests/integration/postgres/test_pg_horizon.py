"""The readable horizon depends only on transactions that can still append to this log.

Transactions elsewhere in the cluster (another database, a session of this database that
never touches the log) hold an xid open for the whole test: commands go on, a projector
keeps up and read-your-writes queries return without a stale read. A writer of this log
that stays open still holds readers back, by design, and is reported (pid and age).
Every wait is bounded and much shorter than the time the foreign transactions stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import pytest
from tests.support.bank import Deposited, balances, decode
from tests.support.pg_log import PgTestLog, open_pg_log

from cqrskit import Command, Dependencies, Mediator, Query, Registry, for_queries
from cqrskit.postgres import PostgresEventStore, PostgresReadDatabase, PostgresUnitOfWork
from cqrskit.projections import (
    ConsistencyGate,
    Projector,
    ReadSession,
    ask_consistent,
    projection_status,
    reads,
)
from cqrskit.testing.eventlog import wait_visible

pytestmark = pytest.mark.postgres

WAIT = 5.0  # every wait below; the foreign transactions stay open for the whole test


@dataclass(frozen=True, slots=True)
class Deposit(Command[None]):
    account: str
    amount: int


@reads("balances")
@dataclass(frozen=True, slots=True)
class GetBalance(Query[int | None]):
    account: str


@contextlib.asynccontextmanager
async def foreign_transactions(dsn: str, schema: str) -> AsyncIterator[list[int]]:
    """Hold two xids open until the block ends: one in a throwaway database, one in this
    database in a session that never touches the event log. Yields their xids."""
    name = f"cqrskit_t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    other_db = same_db = None
    try:
        other_db = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/" + name)
        await other_db.execute("BEGIN")
        await other_db.execute("CREATE TABLE report (x int)")  # takes an xid
        same_db = await asyncpg.connect(dsn)
        await same_db.execute("BEGIN")
        await same_db.execute(f'CREATE TABLE "{schema}".unrelated (x int)')
        xids = [
            int(await c.fetchval("SELECT pg_current_xact_id()::text")) for c in (other_db, same_db)
        ]
        yield xids
        for c in (other_db, same_db):  # still open at the end: they spanned every wait
            assert c.is_in_transaction()
    finally:
        for c in (other_db, same_db):
            if c is not None:
                await c.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def log(postgres_dsn: str, pg_schema: str) -> AsyncIterator[PgTestLog]:
    store = await open_pg_log(postgres_dsn, pg_schema)
    yield store
    await store.close()


async def write(store: PostgresEventStore, stream: str) -> int:
    uow = await store.begin()
    uow.record(stream, Deposited(stream, 1))
    position = await uow.commit()
    assert position is not None
    return position


async def test_foreign_transactions_hold_back_no_reader(
    log: PgTestLog, postgres_dsn: str, pg_schema: str
) -> None:
    async with foreign_transactions(postgres_dsn, pg_schema) as xids:
        probe = await write(log, "probe")
        assert all(x < probe >> 20 for x in xids)  # the foreign xids are the lower ones
        positions = [await write(log, f"s{i}") for i in range(5)]
        await wait_visible(log, positions[-1], WAIT)
        assert [e.position for e in await log.read_after(positions[0] - 1)] == positions
        assert await log.head() == await log.last_position()


async def test_commands_projector_and_read_your_writes_go_on(
    log: PgTestLog, postgres_dsn: str, pg_schema: str
) -> None:
    read_db = PostgresReadDatabase(postgres_dsn, schema=f"{pg_schema}_r")
    registry = Registry()

    @registry.handler
    async def deposit(cmd: Deposit, uow: PostgresUnitOfWork) -> None:
        await uow.connection.execute("SELECT pg_current_xact_id()")  # state write: an xid
        uow.record(cmd.account, Deposited(cmd.account, cmd.amount))

    @registry.handler
    async def get_balance(q: GetBalance, db: ReadSession) -> int | None:
        value = await db.fetchval("SELECT balance FROM accounts WHERE id = ?", q.account)
        return None if value is None else int(value)

    try:
        async with (
            foreign_transactions(postgres_dsn, pg_schema),
            Projector(log, read_db, [balances], decode) as projector,
        ):
            gate = ConsistencyGate(log, read_db, signal=projector.signal)
            deps = Dependencies()
            deps.scoped(ReadSession, read_db.session)
            mediator = Mediator(
                registry,
                resolver=[log.resolver(), deps],
                behaviors=[log.transaction(), for_queries(gate.behavior)],
            )
            for i in range(1, 31):
                receipt = await mediator.send_tracked(Deposit("a", 1))
                assert receipt.token is not None
                read = await ask_consistent(
                    mediator, GetBalance("a"), receipt.token, policy="wait", timeout=WAIT
                )
                assert (read.value, read.stale) == (i, False)
            [status] = await projection_status(read_db, log)
            assert (status.lag_events, status.checkpoint) == (0, await log.last_position())
            assert status.oldest_appender_pid is None
    finally:
        await read_db.close()
        conn = await asyncpg.connect(postgres_dsn)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{pg_schema}_r" CASCADE')
        await conn.close()


async def test_foreign_xid_below_an_open_appender_skips_nothing(
    log: PgTestLog, postgres_dsn: str, pg_schema: str
) -> None:
    """A foreign xid lowest, then an appender with an early xid, then a later commit: the
    later commit stays unreadable until the appender ends, and nothing is skipped."""
    async with foreign_transactions(postgres_dsn, pg_schema):
        early = await log.begin()
        assert isinstance(early, PostgresUnitOfWork)
        await early.connection.execute("SELECT pg_current_xact_id()")  # its xid, now
        later = await write(log, "later")
        assert await log.read_after(0) == []
        assert await log.head() == 0
        early.record("early", Deposited("early", 1))
        first = await early.commit()
        assert first is not None
        assert first < later
        await wait_visible(log, later, WAIT)
        assert [e.stream for e in await log.read_after(0)] == ["early", "later"]


async def test_an_open_appender_holds_readers_and_is_reported(
    log: PgTestLog, postgres_dsn: str, pg_schema: str
) -> None:
    before = await write(log, "before")
    await wait_visible(log, before, WAIT)
    assert await log.oldest_appender() is None
    uow = await log.begin()
    assert isinstance(uow, PostgresUnitOfWork)
    await uow.connection.execute("SELECT pg_current_xact_id()")
    pid = uow.connection.get_server_pid()
    try:
        after = await write(log, "after")
        assert await log.head() == before  # held back by this log's own open writer
        appender = await log.oldest_appender()
        assert appender is not None
        assert appender.pid == pid
        assert appender.seconds >= 0
        read_db = PostgresReadDatabase(postgres_dsn, schema=f"{pg_schema}_r")
        try:
            async with Projector(log, read_db, [balances], decode):
                pass  # sets up the projection's tables
            [status] = await projection_status(read_db, log)
            assert status.oldest_appender_pid == pid
            assert status.oldest_appender_seconds is not None
            assert status.lag_events == 2  # committed and not applied, readable or not
            out = await cli_status(postgres_dsn, pg_schema, f"{pg_schema}_r")
            assert f"held back by an open writer of the event log: pid {pid}, open" in out
        finally:
            await read_db.close()
            conn = await asyncpg.connect(postgres_dsn)
            await conn.execute(f'DROP SCHEMA IF EXISTS "{pg_schema}_r" CASCADE')
            await conn.close()
    finally:
        await uow.rollback()
    await wait_visible(log, after, WAIT)
    assert await log.oldest_appender() is None


async def cli_status(dsn: str, schema: str, read_schema: str) -> str:
    """``cqrskit projections status`` in a subprocess (DSNs passed in the environment)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cqrskit",
        "projections",
        "status",
        "--store-schema",
        schema,
        "--schema",
        read_schema,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CQRSKIT_STORE": dsn, "CQRSKIT_READ": dsn},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()


async def _holds_appender_lock(admin: asyncpg.Connection, pid: int) -> bool:
    held: bool = await admin.fetchval(
        "SELECT count(*) > 0 FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' "
        "AND granted AND mode = 'ShareLock'",
        pid,
    )
    return held


@pytest.mark.parametrize("begin_ahead", [0.0, 0.05, 60.0])
async def test_every_unit_of_work_takes_the_appender_lock_before_its_xid(
    postgres_dsn: str, pg_schema: str, begin_ahead: float
) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, begin_ahead=begin_ahead)
    admin = await asyncpg.connect(postgres_dsn)
    try:
        for _attempt in range(3):
            uow = await store.begin()
            assert isinstance(uow, PostgresUnitOfWork)
            pid = uow.connection.get_server_pid()
            xid = await admin.fetchval(
                "SELECT backend_xid FROM pg_stat_activity WHERE pid = $1", pid
            )
            assert xid is None  # nothing has run in the transaction yet...
            assert await _holds_appender_lock(admin, pid)  # ...and the lock is held
            uow.record("s", Deposited("s", 1))
            await uow.commit()
        # a pool of the caller's (no write connections of the store's own)
        pool = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=2)
        try:
            plain = PostgresEventStore(pool, schema=pg_schema)
            uow = await plain.begin()
            assert isinstance(uow, PostgresUnitOfWork)
            assert await _holds_appender_lock(admin, uow.connection.get_server_pid())
            await uow.rollback()
        finally:
            await pool.close()
    finally:
        await admin.close()
        await store.close()


async def test_a_horizon_proven_elsewhere_is_not_trusted(
    log: PgTestLog, postgres_dsn: str, pg_schema: str
) -> None:
    """A horizon kept from another server (another start time: a restart, a failover), or
    beyond the snapshot's xmax, is ignored. Planted wrong on purpose, it would be used."""
    early = await log.begin()
    assert isinstance(early, PostgresUnitOfWork)
    await early.connection.execute("SELECT pg_current_xact_id()")
    later = await write(log, "later")
    assert await log.head() == 0  # learns the server
    server = log._server
    assert server is not None
    wrong = (later >> 20) + 1  # above the open appender: not a true horizon
    log._proven, log._server = wrong, server - timedelta(seconds=1)
    assert await log.read_after(0) == []  # another server's: ignored
    log._proven, log._server = 1 << 40, server
    assert await log.read_after(0) == []  # beyond xmax: ignored
    log._proven, log._server = wrong, server
    assert [e.position for e in await log.read_after(0)] == [later]  # trusted (planted)
    await early.rollback()
    await wait_visible(log, later, WAIT)


async def test_lag_counts_committed_events_that_readers_cannot_read_yet(
    log: PgTestLog, postgres_dsn: str, pg_schema: str
) -> None:
    """projection_status counts every committed event after the checkpoint, also those an
    open appender still holds back from readers (it used to count only readable ones)."""
    read_db = PostgresReadDatabase(postgres_dsn, schema=f"{pg_schema}_r")
    try:
        async with Projector(log, read_db, [balances], decode):
            pass  # sets up the projection at checkpoint 0
        held = await log.begin()
        assert isinstance(held, PostgresUnitOfWork)
        await held.connection.execute("SELECT pg_current_xact_id()")
        try:
            for i in range(3):
                await write(log, f"s{i}")
            assert await log.head() == 0  # nothing readable yet
            [status] = await projection_status(read_db, log)
            assert (status.checkpoint, status.lag_events, status.lag_capped) == (0, 3, False)
            assert status.lag_seconds >= 0
        finally:
            await held.rollback()
    finally:
        await read_db.close()
        conn = await asyncpg.connect(postgres_dsn)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{pg_schema}_r" CASCADE')
        await conn.close()
