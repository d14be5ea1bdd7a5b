"""SQLAlchemy 2 integration: ORM changes and recorded events commit in ONE transaction.

The application keeps its own ``AsyncSession`` and models. :class:`SqlAlchemyEventStore`
wraps a cqrskit PostgreSQL store (which owns the event-log table, its DDL, the reads and the
commit-order mechanism) and a session factory::

    engine = create_async_engine("postgresql+asyncpg://...")
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    log = await PostgresEventStore.open(dsn, schema="app")
    store = SqlAlchemyEventStore(log, sessions)
    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())

    @registry.handler
    async def open_account(cmd: OpenAccount, session: AsyncSession, uow: UnitOfWork) -> str:
        session.add(Account(id=cmd.account_id, owner=cmd.owner))
        uow.record(f"account-{cmd.account_id}", AccountOpened(cmd.account_id, cmd.owner))
        return cmd.account_id

Per command the transaction behavior opens a session; the handler gets it (by the type
``AsyncSession``) and the unit of work; at commit the session is flushed, the events are
inserted **through the session's connection** with the PostgreSQL driver's own statement (so
positions follow the same xid-based commit-order formula and stream conflicts raise the same
:class:`~cqrskit.errors.ConcurrencyError`), and the session commits. Any error rolls back
the ORM changes and the events together. After COMMIT the token is reported and the events
are published, as with every store.

The engine must use the ``asyncpg`` dialect (``postgresql+asyncpg://``): the event INSERT is
sent in the driver's parameter style. Readers in other processes are not woken by NOTIFY on
this path; they find the events on their next poll.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from cqrskit.dependencies import Provider, Scope
from cqrskit.errors import (
    CommitOutcomeUnknownError,
    ConcurrencyError,
    ConfigurationError,
    DependencyError,
    MissingExtraError,
    PersistenceError,
)
from cqrskit.eventlog import Appender, EventStore, NewEvent, StoredEvent, UnitOfWork
from cqrskit.mediator import record_token
from cqrskit.messages import Event, Metadata
from cqrskit.pipeline import ScopedBehavior, for_commands
from cqrskit.sync import SyncMediator

if TYPE_CHECKING:
    from cqrskit.idempotency import IdempotencyBackend

try:
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("sqlalchemy", "sqlalchemy") from _exc

if TYPE_CHECKING:
    from cqrskit.postgres import PostgresEventStore
    from cqrskit.sqlite import SqliteEventStore

__all__ = [
    "SqlAlchemyEventStore",
    "SqlAlchemyUnitOfWork",
    "SyncSqlAlchemyStore",
    "SyncSqlAlchemyUnitOfWork",
]


def _asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError("postgres", "asyncpg") from exc
    return asyncpg


_MAX_CAUSES = 16
_MAX_NESTING = 1000
_log = logging.getLogger("cqrskit.sqlalchemy")


class SqlAlchemyUnitOfWork(UnitOfWork):
    """One command's transaction on the application's ``AsyncSession``.

    Attributes:
        session: the session, inside its transaction; use it as usual (``add``, ``execute``
            ...). Do not commit or close it: the transaction behavior does.
    """

    __slots__ = ("session",)

    store: SqlAlchemyEventStore

    def __init__(
        self, store: SqlAlchemyEventStore, metadata: Metadata | None, session: AsyncSession
    ) -> None:
        super().__init__(store, metadata)
        self.session = session

    async def commit(self) -> int | None:
        """See :meth:`UnitOfWork.commit`: flush, insert the events, run hooks, COMMIT."""
        store = self.store
        session = self.session
        last: int | None = None
        stored: list[StoredEvent] = []
        committing = False
        try:
            await session.flush()
            if self._events:
                stored = await store._insert(session, self)
                for hook in store._hooks:
                    await hook(self, stored)
                last = stored[-1].position
            # the event log's commit_timeout bounds the wait for COMMIT's reply here too:
            # the driver connection is ended, and the error below is an unknown outcome
            raw = await (await session.connection()).get_raw_connection()
            driver: Any = raw.driver_connection  # the asyncpg connection (checked dialect)
            timer = asyncio.get_running_loop().call_later(
                store.events.commit_timeout, driver.terminate
            )
            committing = True
            try:
                await session.commit()
            finally:
                timer.cancel()
        except BaseException as exc:
            await self._abort(quiet=True)
            translated = await store._translate(exc, committing, self.recorded)
            if translated is exc:
                raise
            raise translated from exc
        self._close()
        await session.close()
        if stored:
            store.events.notify_committed()
            store.notify_committed()
        return last

    async def rollback(self) -> None:
        """See :meth:`UnitOfWork.rollback`: the ORM changes are discarded too."""
        await self._abort()

    async def _abort(self, quiet: bool = False) -> None:
        if not self._active:
            return
        self._close()
        try:
            await self.session.rollback()
        except Exception:
            # after a lost connection the rollback fails too; the server has rolled back,
            # and the caller gets the first error
            if not quiet:
                raise
        finally:
            await self.session.close()


class SqlAlchemyEventStore(EventStore):
    """An event store whose units of work are the application's SQLAlchemy sessions.

    Args:
        events: the PostgreSQL store that owns the event log (its DDL, reads and commit
            order); open it with ``await PostgresEventStore.open(dsn, schema=...)``.
        sessions: a factory of ``AsyncSession`` (an ``async_sessionmaker``) on an engine
            using the ``postgresql+asyncpg`` dialect, connected to the same database.
    """

    unit_of_work_type = SqlAlchemyUnitOfWork

    def __init__(self, events: PostgresEventStore, sessions: Callable[[], AsyncSession]) -> None:
        _asyncpg()
        from cqrskit.postgres import PostgresEventStore

        if not isinstance(events, PostgresEventStore):
            raise ConfigurationError(
                f"SqlAlchemyEventStore needs a PostgresEventStore, got {type(events).__name__}.",
                hint="open one with: await PostgresEventStore.open(dsn, schema=...)",
            )
        super().__init__(encoder=events.encoder)
        self.events = events
        self.sessions = sessions
        self._checked = False
        self._same_database = False

    # -- write side ----------------------------------------------------------------------

    async def begin(
        self, metadata: Metadata | None = None, *, positions: bool = True
    ) -> SqlAlchemyUnitOfWork:
        """See :meth:`EventStore.begin`: a new session from the factory, transaction begun."""
        session = self.sessions()
        if not self._checked:
            self._check_dialect(session)
        try:
            await session.begin()
            conn = await session.connection()
            # the appender lock before anything can take an xid: readers then wait only
            # for this log's writers (see cqrskit.postgres.eventlog); one round trip
            await conn.exec_driver_sql(self.events.appender_lock_sql)
            if not self._same_database:
                await self._check_database(session)
        except BaseException:
            await session.close()
            raise
        return SqlAlchemyUnitOfWork(self, metadata, session)

    async def _check_database(self, session: AsyncSession) -> None:
        """Once: the sessions write to the database the event log is read from. Events are
        inserted through the session, so a session on another database (with the same
        tables) would split the log without an error."""
        # compared as values: the text of a timestamptz depends on the session's TimeZone
        sql = (
            "SELECT current_database(), "
            "floor(extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint"
        )
        conn = await session.connection()
        theirs = tuple((await conn.exec_driver_sql(sql)).one())
        async with self.events.pool.acquire() as own:
            ours = tuple(await own.fetchrow(sql))
        if theirs != ours:
            raise ConfigurationError(
                f"the sessions write to database {theirs[0]!r} (server started at "
                f"{theirs[1] / 1e6:.6f} s since the epoch) but the event log is read from "
                f"{ours[0]!r} (server started at {ours[1] / 1e6:.6f} s).",
                hint="open the PostgresEventStore and the session engine on the same "
                "database: events are written through the session.",
            )
        self._same_database = True

    def _check_dialect(self, session: AsyncSession) -> None:
        bind = session.bind
        name = getattr(getattr(bind, "dialect", None), "driver", None)
        if name != "asyncpg":
            raise ConfigurationError(
                f"SqlAlchemyEventStore needs an engine on the asyncpg driver, got {name!r}.",
                hint="create the engine with create_async_engine('postgresql+asyncpg://...').",
            )
        self._checked = True

    async def _insert(self, session: AsyncSession, uow: SqlAlchemyUnitOfWork) -> list[StoredEvent]:
        sql, arguments, rows = self.events.append_statement(uow)
        conn = await session.connection()
        result = await conn.exec_driver_sql(sql, tuple(arguments))
        got: list[Any] = list(result.all())
        out: list[StoredEvent] = []
        for r, (position, _stream, version) in zip(rows, got, strict=True):
            enc = r.encoded
            out.append(
                StoredEvent(
                    position, r.stream, version, enc.type, enc.schema_version, enc.data, r.metadata
                )
            )
        return out

    async def _translate(
        self, exc: BaseException, committing: bool, recorded: Sequence[NewEvent]
    ) -> BaseException:
        if not isinstance(exc, Exception) or isinstance(exc, ConcurrencyError | PersistenceError):
            return exc
        asyncpg = _asyncpg()
        cause: BaseException | None = exc
        for _ in range(_MAX_CAUSES):
            if cause is None:
                break
            if isinstance(cause, asyncpg.PostgresConnectionError | OSError) or (
                isinstance(cause, sa_exc.DBAPIError) and cause.connection_invalidated
            ):
                if committing:
                    return CommitOutcomeUnknownError(
                        f"the connection was lost while COMMIT was in flight ({cause}); the "
                        "command may or may not have committed.",
                        hint="retry with the same idempotency key.",
                    )
                return PersistenceError(
                    f"the connection was lost before COMMIT ({cause}); nothing was committed.",
                    hint="retry the command.",
                )
            if isinstance(cause, asyncpg.PostgresError):
                # stream conflicts become ConcurrencyError; the application's own errors
                # (an ORM unique violation, say) stay SQLAlchemy's
                translated = await self.events.translate_error(cause, recorded)
                return translated if isinstance(translated, ConcurrencyError) else exc
            cause = cause.__cause__ or cause.__context__
        return exc

    def resolver(self) -> _SessionResolver:  # type: ignore[override]
        """Gives handlers the current ``AsyncSession`` and the unit of work."""
        return _SessionResolver(self)

    # -- read side: the wrapped store ----------------------------------------------------

    def idempotency_backend(self, table: str, wait_timeout: float) -> IdempotencyBackend:
        """Rows in ``table`` of the PostgreSQL schema, through the command's session."""
        from cqrskit.postgres.idempotency import SessionIdempotencyBackend

        return SessionIdempotencyBackend(self.events, table, wait_timeout)

    async def read_after(self, position: int, limit: int = 1000) -> list[StoredEvent]:
        """See :meth:`EventStore.read_after` (read by the PostgreSQL store)."""
        return await self.events.read_after(position, limit)

    async def head(self) -> int:
        """See :meth:`EventStore.head`."""
        return await self.events.head()

    async def last_position(self) -> int:
        """See :meth:`EventStore.last_position`."""
        return await self.events.last_position()

    async def backlog(self, position: int, limit: int) -> tuple[int, float | None]:
        """See :meth:`EventStore.backlog`."""
        return await self.events.backlog(position, limit)

    async def oldest_appender(self) -> Appender | None:
        """See :meth:`EventStore.oldest_appender`."""
        return await self.events.oldest_appender()

    async def read_stream(self, stream: str, after_version: int = 0) -> list[StoredEvent]:
        """See :meth:`EventStore.read_stream`."""
        return await self.events.read_stream(stream, after_version)

    async def wait_for(self, position: int, timeout: float) -> bool:
        """See :meth:`EventStore.wait_for` (the PostgreSQL store's wake-ups)."""
        return await self.events.wait_for(position, timeout)


class _SessionResolver:
    __slots__ = ("_store", "_uow")

    def __init__(self, store: SqlAlchemyEventStore) -> None:
        self._store = store
        self._uow = EventStore.resolver(store)

    def provider(self, dependency: Any, lookup: Any) -> Provider | None:
        if dependency is not AsyncSession:
            return self._uow.provider(dependency, lookup)
        store = self._store

        def get(scope: Scope) -> AsyncSession:
            try:
                uow: SqlAlchemyUnitOfWork = scope[store]
            except KeyError:
                raise DependencyError(
                    "no session in this dispatch: only command handlers wrapped by "
                    "store.transaction() receive one.",
                    dependency=dependency,
                    hint="add behaviors=[store.transaction()] to the Mediator; queries open "
                    "their own sessions.",
                ) from None
            return uow.session

        return Provider.scoped(get)


# -- the synchronous twin: sqlalchemy.orm.Session on SQLite, for SyncMediator ---------------


class SyncSqlAlchemyUnitOfWork(UnitOfWork):
    """One command's transaction on the application's ``Session`` (SQLite).

    Attributes:
        session: the session; use it as usual, never commit or close it in a handler.
    """

    __slots__ = ("session", "_sync_store")

    def __init__(
        self, store: SyncSqlAlchemyStore, metadata: Metadata | None, session: Session
    ) -> None:
        super().__init__(store.events, metadata)
        self._sync_store = store
        self.session = session

    def commit_sync(self) -> int | None:
        """Flush, insert the events through the session's connection, COMMIT; return the
        last position (``None`` without events)."""
        events = self._sync_store.events
        session = self.session
        try:
            session.flush()
            last: int | None = None
            if self._events:
                raw = session.connection().connection.dbapi_connection
                if not isinstance(raw, sqlite3.Connection):
                    raise ConfigurationError(
                        "SyncSqlAlchemyStore needs an engine on the stdlib sqlite3 driver.",
                        hint="create the engine with create_engine('sqlite:///path.db').",
                    )
                last = events.append_through(raw, self)
            session.commit()
        except BaseException:
            self.rollback_sync()
            raise
        self._close()
        session.close()
        return last

    def rollback_sync(self) -> None:
        """Discard the ORM changes and the events."""
        if not self._active:
            return
        self._close()
        try:
            self.session.rollback()
        finally:
            self.session.close()

    async def commit(self) -> int | None:
        """See :meth:`commit_sync` (this unit of work is synchronous)."""
        return self.commit_sync()

    async def rollback(self) -> None:
        """See :meth:`rollback_sync`."""
        self.rollback_sync()


class SyncSqlAlchemyStore:
    """Units of work on the application's SQLAlchemy ``Session``, for :class:`SyncMediator`.

    The event log is the SQLite store's table (same DDL, same INSERT, positions allocated
    under SQLite's single write lock, hence in commit order); its reads stay on the store::

        log = SqliteEventStore("app.db")
        store = SyncSqlAlchemyStore(log, sessionmaker(create_engine("sqlite:///app.db")))
        mediator = SyncMediator(registry, behaviors=[store.transaction()],
                                resolver=store.resolver())

    Inline hooks (async) are not run on this path.

    Args:
        events: the SQLite store owning the event-log table (on the same file).
        sessions: a ``sessionmaker`` on an engine using the stdlib ``sqlite3`` driver.
    """

    def __init__(self, events: SqliteEventStore, sessions: Callable[[], Session]) -> None:
        from cqrskit.sqlite import SqliteEventStore

        if not isinstance(events, SqliteEventStore):
            raise ConfigurationError(
                f"SyncSqlAlchemyStore needs a SqliteEventStore, got {type(events).__name__}.",
                hint="create one with: SqliteEventStore(path)",
            )
        self.events = events
        self.sessions = sessions

    def begin(self, metadata: Metadata | None = None) -> SyncSqlAlchemyUnitOfWork:
        """Open a unit of work on a new session."""
        return SyncSqlAlchemyUnitOfWork(self, metadata, self.sessions())

    def transaction(
        self, *, on_publish_error: Callable[[Event, Exception], None] | None = None
    ) -> ScopedBehavior:
        """The sync transaction behavior: one session per command, events published after
        COMMIT (a failing event handler goes to ``on_publish_error``, else a log record)."""
        return for_commands(_SyncTransaction(self, on_publish_error))

    def resolver(self) -> _SyncResolver:
        """Gives handlers the current ``Session`` and the unit of work."""
        return _SyncResolver(self)


class _SyncTransaction:
    __slots__ = ("_store", "_on_error")

    def __init__(
        self, store: SyncSqlAlchemyStore, on_error: Callable[[Event, Exception], None] | None
    ) -> None:
        self._store = store
        self._on_error = on_error

    def __call__(
        self, message: Any, next: Callable[[Any], Any], scope: Scope, mediator: SyncMediator
    ) -> Any:
        store = self._store
        parent = scope.parent
        for _ in range(_MAX_NESTING):
            if parent is None:
                break
            outer = parent.get(store)
            if outer is not None and outer.active:
                scope[store] = outer
                return next(message)
            parent = parent.parent
        uow = store.begin(scope.metadata)
        scope[store] = uow
        try:
            result = next(message)
            events = [e for _, e in uow._events]
            position = uow.commit_sync()
        except BaseException:
            uow.rollback_sync()
            raise
        if position is not None:
            record_token(position)
        for event in events:
            try:
                mediator.publish(event)
            except Exception as exc:  # noqa: BLE001 - the commit stands
                if self._on_error is not None:
                    self._on_error(event, exc)
                else:
                    _log.error(
                        "event handler failed after commit for %s: %s",
                        type(event).__name__,
                        exc,
                        exc_info=exc,
                    )
        return result


class _SyncResolver:
    __slots__ = ("_store",)

    def __init__(self, store: SyncSqlAlchemyStore) -> None:
        self._store = store

    def provider(self, dependency: Any, lookup: Any) -> Provider | None:
        if dependency not in (Session, SyncSqlAlchemyUnitOfWork, UnitOfWork):
            return None
        store = self._store
        want_session = dependency is Session

        def get(scope: Scope) -> Any:
            try:
                uow: SyncSqlAlchemyUnitOfWork = scope[store]
            except KeyError:
                raise DependencyError(
                    "no session in this dispatch: only command handlers wrapped by "
                    "store.transaction() receive one.",
                    dependency=dependency,
                    hint="add behaviors=[store.transaction()] to the SyncMediator.",
                ) from None
            return uow.session if want_session else uow

        return Provider.scoped(get)
