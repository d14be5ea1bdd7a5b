"""SQLAlchemy integration on PostgreSQL: ORM changes and events commit in one transaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
from sqlalchemy import String, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from tests.support.proxy import FaultProxy, Mode

from cqrskit.dependencies import Dependencies
from cqrskit.errors import (
    CommitOutcomeUnknownError,
    ConcurrencyError,
    ConfigurationError,
    IdempotencyError,
)
from cqrskit.eventlog import EventStore, UnitOfWork
from cqrskit.idempotency import Idempotency, idempotency_key
from cqrskit.mediator import Mediator
from cqrskit.messages import Command, Event
from cqrskit.postgres import PostgresEventStore
from cqrskit.registry import Registry
from cqrskit.sqlalchemy import SqlAlchemyEventStore, SqlAlchemyUnitOfWork
from cqrskit.testing.eventlog import EventStoreConformance, wait_visible

pytestmark = pytest.mark.postgres


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = {"schema": "app"}
    id: Mapped[str] = mapped_column(String, primary_key=True)
    owner: Mapped[str] = mapped_column(String)


@dataclass(frozen=True, slots=True)
class OpenAccount(Command[str]):
    account_id: str
    owner: str
    fail: bool = False
    stream: str | None = None


@dataclass(frozen=True, slots=True)
class OpenTwo(Command[None]):
    first: str
    second: str


@dataclass(frozen=True, slots=True)
class AccountOpened(Event):
    account_id: str
    owner: str


class Boom(Exception):
    pass


@dataclass
class App:
    store: SqlAlchemyEventStore
    mediator: Mediator
    sessions: async_sessionmaker[AsyncSession]
    published: list[AccountOpened]

    async def owners(self) -> list[str]:
        async with self.sessions() as s:
            return list((await s.scalars(select(Account.owner).order_by(Account.owner))).all())


def _asyncpg_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)


class TestSqlAlchemyEventStore(EventStoreConformance):
    """The event-store kit every driver passes, on the SQLAlchemy session path (state written
    through the application's session, events inserted through its connection)."""

    @pytest.fixture(autouse=True)
    def _db(self, postgres_dsn: str, pg_schema: str) -> None:
        self.dsn = postgres_dsn
        self.schema = pg_schema
        self.engines: dict[int, AsyncEngine] = {}

    async def make_store(self) -> EventStore:
        log = await PostgresEventStore.open(self.dsn, schema=self.schema, max_size=8)
        async with log.pool.acquire() as conn:
            await conn.execute(f'CREATE TABLE IF NOT EXISTS "{self.schema}".state (key text)')
        engine = create_async_engine(_asyncpg_url(self.dsn), pool_size=8)
        store = SqlAlchemyEventStore(log, async_sessionmaker(engine, expire_on_commit=False))
        self.engines[id(store)] = engine
        return store

    async def close_store(self, store: EventStore) -> None:
        assert isinstance(store, SqlAlchemyEventStore)
        await store.events.close()
        await self.engines.pop(id(store)).dispose()

    async def write_state(self, uow: UnitOfWork, key: str) -> None:
        assert isinstance(uow, SqlAlchemyUnitOfWork)
        await uow.session.execute(
            text(f'INSERT INTO "{self.schema}".state (key) VALUES (:key)'), {"key": key}
        )

    async def state_keys(self, store: EventStore) -> set[str]:
        assert isinstance(store, SqlAlchemyEventStore)
        async with store.events.pool.acquire() as conn:
            rows = await conn.fetch(f'SELECT key FROM "{self.schema}".state')
        return {r[0] for r in rows}

    def head_source(self, store: EventStore) -> EventStore:
        assert isinstance(store, SqlAlchemyEventStore)
        return store.events  # reads, head and wait_for are the wrapped store's


@pytest.fixture
async def app(postgres_dsn: str, pg_schema: str) -> AsyncIterator[App]:
    engine = create_async_engine(_asyncpg_url(postgres_dsn), pool_size=2).execution_options(
        schema_translate_map={"app": pg_schema}
    )
    log = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, max_size=2)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    store = SqlAlchemyEventStore(log, sessions)
    registry = Registry()
    published: list[AccountOpened] = []

    @registry.handler
    async def open_account(cmd: OpenAccount, session: AsyncSession, uow: UnitOfWork) -> str:
        session.add(Account(id=cmd.account_id, owner=cmd.owner))
        uow.record(
            cmd.stream or f"account-{cmd.account_id}",
            AccountOpened(cmd.account_id, cmd.owner),
            expected_version=0,
        )
        if cmd.fail:
            raise Boom("handler failed")
        return cmd.account_id

    @registry.handler
    async def open_two(cmd: OpenTwo, mediator: Mediator, uow: SqlAlchemyUnitOfWork) -> None:
        await mediator.send(OpenAccount(cmd.first, "x"))
        await mediator.send(OpenAccount(cmd.second, "y"))
        # the nested commands used this very session
        assert (await uow.session.scalar(select(func.count()).select_from(Account))) == 2

    @registry.handler
    async def on_opened(e: AccountOpened) -> None:
        published.append(e)

    mediator = Mediator(
        registry, behaviors=[store.transaction()], resolver=[store.resolver(), Dependencies()]
    )
    try:
        yield App(store, mediator, sessions, published)
    finally:
        await log.close()
        await engine.dispose()


async def test_orm_row_and_event_commit_together(app: App) -> None:
    receipt = await app.mediator.send_tracked(OpenAccount("1", "ada"))
    assert receipt.result == "1"
    assert await app.owners() == ["ada"]
    [event] = await app.store.read_stream("account-1")
    assert event.type == "AccountOpened"
    assert event.version == 1
    assert receipt.token == event.position
    assert event.position >> 20 > 0  # the driver's xid-based position
    assert app.published == [AccountOpened("1", "ada")]  # after commit


async def test_failing_handler_rolls_back_orm_change_and_events(app: App) -> None:
    with pytest.raises(Boom):
        await app.mediator.send(OpenAccount("1", "ada", fail=True))
    assert await app.owners() == []
    assert await app.store.read_stream("account-1") == []
    assert app.published == []


async def test_stream_conflict_rolls_back_the_orm_change(app: App) -> None:
    await app.mediator.send(OpenAccount("1", "ada"))
    # another account row, but the same stream at expected version 0: conflict at commit
    with pytest.raises(ConcurrencyError) as info:
        await app.mediator.send(OpenAccount("2", "bob", stream="account-1"))
    assert info.value.stream == "account-1"
    assert info.value.actual_version == 1
    assert await app.owners() == ["ada"]  # bob's ORM row was rolled back
    assert len(await app.store.read_stream("account-1")) == 1


async def test_nested_commands_share_the_session(app: App) -> None:
    receipt = await app.mediator.send_tracked(OpenTwo("a", "b"))
    assert await app.owners() == ["x", "y"]
    events = await app.store.read_stream("account-b")
    assert receipt.token == events[-1].position


async def test_engine_on_another_driver_is_refused(postgres_dsn: str, pg_schema: str) -> None:
    engine = create_async_engine(postgres_dsn.replace("postgresql://", "postgresql+psycopg://"))
    log = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, max_size=1)
    try:
        store = SqlAlchemyEventStore(log, async_sessionmaker(engine))
        with pytest.raises(ConfigurationError, match="asyncpg"):
            await store.begin()
    finally:
        await log.close()
        await engine.dispose()


async def test_idempotent_commands_on_the_session(postgres_dsn: str, pg_schema: str) -> None:
    engine = create_async_engine(_asyncpg_url(postgres_dsn), pool_size=2).execution_options(
        schema_translate_map={"app": pg_schema}
    )
    log = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, max_size=2)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        store = SqlAlchemyEventStore(log, sessions)
        idem = await Idempotency.open(store)
        registry = Registry()
        calls: list[str] = []

        @registry.handler
        async def open_account(cmd: OpenAccount, session: AsyncSession, uow: UnitOfWork) -> str:
            calls.append(cmd.account_id)
            session.add(Account(id=cmd.account_id, owner=cmd.owner))
            uow.record(f"account-{cmd.account_id}", AccountOpened(cmd.account_id, cmd.owner))
            return cmd.account_id

        mediator = Mediator(registry, behaviors=[idem.transaction()], resolver=store.resolver())
        with idempotency_key("open-1"):
            first = await mediator.send_tracked(OpenAccount("1", "ada"))
        with idempotency_key("open-1"):
            again = await mediator.send_tracked(OpenAccount("1", "ada"))
        assert again.result == first.result == "1"
        assert again.token == first.token
        [event] = await store.read_stream("account-1")
        assert event.position == first.token
        assert calls == ["1"]
        with idempotency_key("open-1"), pytest.raises(IdempotencyError):
            await mediator.send(OpenAccount("2", "bob"))
        async with sessions() as s:
            assert list((await s.scalars(select(Account.id))).all()) == ["1"]
    finally:
        await log.close()
        await engine.dispose()


async def test_orm_errors_stay_sqlalchemy_errors_and_roll_back_the_events(app: App) -> None:
    await app.mediator.send(OpenAccount("1", "ada"))
    # same primary key, another stream: the ORM flush fails, not the event log
    with pytest.raises(IntegrityError):
        await app.mediator.send(OpenAccount("1", "bob", stream="other"))
    assert await app.store.read_stream("other") == []
    assert await app.owners() == ["ada"]


async def test_lost_commit_reply_on_the_session_then_keyed_retry(
    postgres_dsn: str, pg_schema: str
) -> None:
    proxy = FaultProxy("127.0.0.1", 5432)
    await proxy.start()
    url = _asyncpg_url(proxy.dsn(postgres_dsn)).replace("sslmode=", "ssl=")  # asyncpg kwarg
    engine = create_async_engine(url).execution_options(schema_translate_map={"app": pg_schema})
    log = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, max_size=2)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        store = SqlAlchemyEventStore(log, sessions)
        idem = await Idempotency.open(store)
        registry = Registry()
        calls: list[str] = []

        @registry.handler
        async def open_account(cmd: OpenAccount, session: AsyncSession, uow: UnitOfWork) -> str:
            calls.append(cmd.account_id)
            session.add(Account(id=cmd.account_id, owner=cmd.owner))
            uow.record(f"account-{cmd.account_id}", AccountOpened(cmd.account_id, cmd.owner))
            return cmd.account_id

        mediator = Mediator(registry, behaviors=[idem.transaction()], resolver=store.resolver())
        proxy.faults_left = 1
        proxy.mode = Mode.DROP_COMMIT_REPLY
        with idempotency_key("sa-1"), pytest.raises(CommitOutcomeUnknownError) as info:
            await mediator.send(OpenAccount("1", "ada"))
        assert info.value.retry_safe
        assert proxy.commit_faults == 1
        assert len(await store.read_stream("account-1")) == 1  # it did commit
        with idempotency_key("sa-1"):
            assert await mediator.send(OpenAccount("1", "ada")) == "1"
        assert calls == ["1"]
        assert len(await store.read_stream("account-1")) == 1
        async with sessions() as s:
            assert list((await s.scalars(select(Account.id))).all()) == ["1"]
    finally:
        await log.close()
        await engine.dispose()
        await proxy.close()


async def _one_command_app(engine: AsyncEngine, log: PostgresEventStore) -> Mediator:
    """The ORM tables on ``engine`` and a mediator whose one handler opens an account."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    store = SqlAlchemyEventStore(log, async_sessionmaker(engine, expire_on_commit=False))
    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount, session: AsyncSession, uow: UnitOfWork) -> str:
        session.add(Account(id=cmd.account_id, owner=cmd.owner))
        uow.record(f"account-{cmd.account_id}", AccountOpened(cmd.account_id, cmd.owner))
        return cmd.account_id

    return Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())


async def test_sessions_on_another_database_are_refused(postgres_dsn: str, pg_schema: str) -> None:
    # the other database has the same tables, so the INSERT would succeed there and the log
    # the store reads would silently miss the event: the first command is refused instead
    name = f"cqrskit_t_{pg_schema[-16:]}"
    admin = await asyncpg.connect(postgres_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    other_dsn = postgres_dsn.rsplit("/", 1)[0] + "/" + name
    other = await PostgresEventStore.open(other_dsn, schema=pg_schema)
    log = await PostgresEventStore.open(postgres_dsn, schema=pg_schema)
    engine = create_async_engine(_asyncpg_url(other_dsn)).execution_options(
        schema_translate_map={"app": pg_schema}
    )
    try:
        mediator = await _one_command_app(engine, log)
        with pytest.raises(ConfigurationError, match=f"sessions write to database '{name}'"):
            await mediator.send(OpenAccount("1", "ada"))
        assert await log.last_position() == 0
        assert await other.last_position() == 0
    finally:
        await engine.dispose()
        await other.close()
        await log.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_the_database_check_ignores_session_settings(
    postgres_dsn: str, pg_schema: str
) -> None:
    # the same database seen through a session with another TimeZone and DateStyle
    engine = create_async_engine(
        _asyncpg_url(postgres_dsn),
        connect_args={"server_settings": {"timezone": "Asia/Tokyo", "datestyle": "SQL, DMY"}},
    ).execution_options(schema_translate_map={"app": pg_schema})
    log = await PostgresEventStore.open(postgres_dsn, schema=pg_schema)
    try:
        mediator = await _one_command_app(engine, log)
        assert await mediator.send(OpenAccount("1", "ada")) == "1"
        assert [e.version for e in await log.read_stream("account-1")] == [1]
    finally:
        await engine.dispose()
        await log.close()


async def test_a_keyed_duplicate_on_the_session_waits_a_bounded_time(
    postgres_dsn: str, pg_schema: str
) -> None:
    engine = create_async_engine(_asyncpg_url(postgres_dsn), pool_size=3).execution_options(
        schema_translate_map={"app": pg_schema}
    )
    log = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, max_size=2)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        store = SqlAlchemyEventStore(log, async_sessionmaker(engine, expire_on_commit=False))
        idem = await Idempotency.open(store, wait_timeout=0.3)
        registry = Registry()
        entered, gate = asyncio.Event(), asyncio.Event()

        @registry.handler
        async def open_account(cmd: OpenAccount, session: AsyncSession, uow: UnitOfWork) -> str:
            session.add(Account(id=cmd.account_id, owner=cmd.owner))
            entered.set()
            await asyncio.wait_for(gate.wait(), 10)
            return cmd.account_id

        mediator = Mediator(registry, behaviors=[idem.transaction()], resolver=store.resolver())

        async def attempt() -> str:
            with idempotency_key("slow-open"):
                return await mediator.send(OpenAccount("9", "ada"))

        first = asyncio.create_task(attempt())
        await asyncio.wait_for(entered.wait(), 10)
        with pytest.raises(ConcurrencyError, match="still running"):
            await asyncio.wait_for(attempt(), 10)
        gate.set()
        assert await asyncio.wait_for(first, 10) == "9"
        assert await attempt() == "9"  # the retry now replays the stored result
    finally:
        await log.close()
        await engine.dispose()


async def test_a_session_unit_of_work_is_an_appender_from_its_begin(
    app: App, postgres_dsn: str
) -> None:
    """The session takes the event log's appender lock before anything takes an xid, so a
    session that wrote but has not committed holds readers back (and is reported)."""
    uow = await app.store.begin()
    admin = await asyncpg.connect(postgres_dsn)
    try:
        conn = await uow.session.connection()
        pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
        held = await admin.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.pid = $1 AND l.locktype = 'advisory' AND l.granted "
            "AND a.backend_xid IS NULL",
            pid,
        )
        assert held == 1  # the lock, and no xid yet
        uow.session.add(Account(id="9", owner="held"))
        await uow.session.flush()  # an xid now
        later = await app.mediator.send_tracked(OpenAccount("1", "ada"))
        assert later.token is not None
        assert await app.store.head() < later.token  # held back by the open session
        appender = await app.store.oldest_appender()
        assert appender is not None
        assert appender.pid == pid
    finally:
        await uow.rollback()
        await admin.close()
    await wait_visible(app.store, later.token)
    assert await app.store.oldest_appender() is None


async def test_a_commit_without_reply_on_the_session_times_out(
    postgres_dsn: str, pg_schema: str
) -> None:
    """The event log's commit_timeout bounds the session's COMMIT too: the reply is held
    back by the proxy, the command fails with CommitOutcomeUnknownError in time."""
    proxy = FaultProxy("127.0.0.1", 5432)
    await proxy.start()
    url = _asyncpg_url(proxy.dsn(postgres_dsn)).replace("sslmode=", "ssl=")
    engine = create_async_engine(url).execution_options(schema_translate_map={"app": pg_schema})
    log = await PostgresEventStore.open(
        postgres_dsn, schema=pg_schema, max_size=2, commit_timeout=0.5
    )
    try:
        mediator = await _one_command_app(engine, log)
        proxy.mode = Mode.HOLD_COMMIT_REPLY
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(CommitOutcomeUnknownError):
            await asyncio.wait_for(mediator.send(OpenAccount("1", "ada")), 10)
        assert loop.time() - started < 10
        proxy.mode = Mode.FORWARD
        proxy.release_replies.set()
        assert await mediator.send(OpenAccount("2", "bob")) == "2"  # a fresh connection
    finally:
        proxy.release_replies.set()
        await log.close()
        await engine.dispose()
        await proxy.close()
