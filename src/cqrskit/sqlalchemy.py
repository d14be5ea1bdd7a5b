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

from collections.abc import Callable, Sequence
from typing import Any

from cqrskit.dependencies import Provider, Scope
from cqrskit.errors import (
    CommitOutcomeUnknownError,
    ConcurrencyError,
    ConfigurationError,
    DependencyError,
    MissingExtraError,
    PersistenceError,
)
from cqrskit.eventlog import EventStore, NewEvent, StoredEvent, UnitOfWork
from cqrskit.messages import Metadata

try:
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.ext.asyncio import AsyncSession
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("sqlalchemy", "sqlalchemy") from _exc

try:
    import asyncpg

    from cqrskit.postgres import PostgresEventStore
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("postgres", "asyncpg") from _exc

__all__ = ["SqlAlchemyEventStore", "SqlAlchemyUnitOfWork"]

_MAX_CAUSES = 16


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
            committing = True
            await session.commit()
        except BaseException as exc:
            await self._abort(quiet=True)
            translated = await store._translate(exc, committing, self.recorded)
            if translated is exc:
                raise
            raise translated from exc
        self._close()
        await session.close()
        if stored:
            store.events._wake()
            store._wake()
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
        if not isinstance(events, PostgresEventStore):
            raise ConfigurationError(
                f"SqlAlchemyEventStore needs a PostgresEventStore, got {type(events).__name__}.",
                hint="open one with: await PostgresEventStore.open(dsn, schema=...)",
            )
        super().__init__(encoder=events._encode)
        self.events = events
        self.sessions = sessions
        self._checked = False

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
        except BaseException:
            await session.close()
            raise
        return SqlAlchemyUnitOfWork(self, metadata, session)

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
        pg = self.events
        rows = uow.pending_rows(self._encode)
        conn = await session.connection()
        result = await conn.exec_driver_sql(pg._sql_insert_returning, tuple(pg._columns(rows)))
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
                return await self.events._translate(cause, recorded)
            cause = cause.__cause__ or cause.__context__
        return exc

    def resolver(self) -> _SessionResolver:  # type: ignore[override]
        """Gives handlers the current ``AsyncSession`` and the unit of work."""
        return _SessionResolver(self)

    # -- read side: the wrapped store ----------------------------------------------------

    async def read_after(self, position: int, limit: int = 1000) -> list[StoredEvent]:
        """See :meth:`EventStore.read_after` (read by the PostgreSQL store)."""
        return await self.events.read_after(position, limit)

    async def head(self) -> int:
        """See :meth:`EventStore.head`."""
        return await self.events.head()

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
                uow: SqlAlchemyUnitOfWork = scope.values[store]
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
