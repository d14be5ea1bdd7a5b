"""One command's PostgreSQL transaction: the commit round trip (events, COMMIT and the next
BEGIN in one string; see :mod:`cqrskit.postgres.eventlog`) and the translation of its
failures into typed errors."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cqrskit.errors import CommitOutcomeUnknownError, MissingExtraError, PersistenceError
from cqrskit.eventlog import UnitOfWork
from cqrskit.messages import Metadata
from cqrskit.postgres._connections import (
    _commit_round_trip,
    _connection_lost,
    _interrupted,
    _lost,
    _unsent,
)
from cqrskit.postgres._sql import _MAX_PER_TX, _NO_SUCH_STATEMENT, _SQL_REPORT_XID

if TYPE_CHECKING:
    from cqrskit.postgres.eventlog import PostgresEventStore

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("postgres", "asyncpg") from exc

__all__ = ["PostgresUnitOfWork"]

_log = logging.getLogger("cqrskit.postgres")


class PostgresUnitOfWork(UnitOfWork):
    """One command's PostgreSQL transaction.

    Attributes:
        connection: the asyncpg connection, inside ``BEGIN``; change state with
            ``await uow.connection.execute(...)``.
    """

    __slots__ = ("connection", "_want_positions", "_prefix")

    store: PostgresEventStore

    def __init__(
        self,
        store: PostgresEventStore,
        metadata: Metadata | None,
        connection: Any,
        want_positions: bool,
    ) -> None:
        super().__init__(store, metadata)
        self.connection = connection
        self._want_positions = want_positions
        self._prefix = ""  # the events' message-id prefix, once rendered

    async def commit(self) -> int | None:
        """See :meth:`UnitOfWork.commit`."""
        store = self.store
        conn = self.connection
        last: int | None = None
        committing = False
        try:
            if not self._events:
                committing = True
                await _commit_round_trip(conn, store._sql_end, store._commit_clock)
            else:
                if len(self._events) >= _MAX_PER_TX:
                    raise PersistenceError(
                        f"{len(self._events)} events in one transaction; the limit is "
                        f"{_MAX_PER_TX - 1}."
                    )
                if store._hooks or (self._want_positions and not store._xid_notices):
                    rows = self.pending_rows(store._encode)
                    stored = await store._insert_returning(conn, rows)
                    for hook in store._hooks:
                        await hook(self, stored)
                    committing = True
                    await _commit_round_trip(conn, store._sql_commit, store._commit_clock)
                    last = stored[-1].position
                elif self._want_positions:
                    # the transaction id comes back as a NOTICE in the same round trip
                    # (asyncpg discards the rows of a multi-statement query)
                    xids = store._xids
                    xids.pop(id(conn), None)
                    sql = store._render_insert(self) + _SQL_REPORT_XID + store._sql_commit
                    committing = True
                    await _commit_round_trip(conn, sql, store._commit_clock)
                    xid = xids.pop(id(conn), None)
                    if xid is None:  # pragma: no cover - the notice is always sent
                        last = await store._find_last(conn, self)
                    else:
                        last = (xid << 20) + len(self._events) - 1
                else:
                    sql = store._render_insert(self) + store._sql_commit
                    committing = True
                    await _commit_round_trip(conn, sql, store._commit_clock)
        except Exception as exc:
            if _lost(exc, conn):
                await self._abort()
                raise _connection_lost(exc, committing and not _unsent(exc)) from exc
            if not isinstance(exc, asyncpg.PostgresError):
                await self._abort()
                raise
            raise await self._refused(exc, committing) from exc
        except BaseException:
            await self._abort()
            raise
        self._close()
        writers = store._writers
        if writers is not None:
            writers.release(conn)
        else:
            await store._release(conn)
        if self._events:
            store._wake()
            if store._notifier is not None:
                store._notifier.poke()
        return last

    async def _refused(self, exc: asyncpg.PostgresError, committing: bool) -> Exception:
        """Roll back after the server refused the commit; the typed error to raise."""
        state = getattr(exc, "sqlstate", None) or ""
        if committing and (state.startswith("53") or state == "57014"):
            # the round trip carries "...; COMMIT; BEGIN; SELECT <appender lock>": a lack of
            # resources (out of shared memory for locks, disk full) or a cancellation may
            # have struck after COMMIT, so whether it committed is unknown
            await self._abort(broken=True)
            return CommitOutcomeUnknownError(
                f"PostgreSQL reported an error in the round trip that carries COMMIT ({exc}); "
                "it may have come after the COMMIT, so the command may or may not have "
                "committed.",
                hint="retry with the same idempotency key (cqrskit.idempotency).",
            )
        if state == _NO_SUCH_STATEMENT:
            # the handler ran DISCARD ALL or DEALLOCATE: this connection lost the prepared
            # event INSERT; a new connection prepares it again
            await self._abort(broken=True)
            return PersistenceError(
                "the event log's prepared INSERT is gone from this connection (did the "
                f"handler run DISCARD ALL or DEALLOCATE?): {exc}; nothing was committed.",
                hint="do not deallocate prepared statements on uow.connection; the "
                "command can be retried (it will get a new connection).",
            )
        await self._abort()
        return await self.store.translate_error(exc, self.recorded)

    def _failure(self, exc: BaseException) -> BaseException:
        """See :meth:`UnitOfWork._failure`: a statement of the handler (or of the
        idempotency claim) that failed because the connection is gone becomes
        :class:`~cqrskit.errors.ConnectionLostError`: nothing was committed."""
        if isinstance(exc, Exception) and _lost(exc, self.connection):
            return _connection_lost(exc, False)
        return exc

    async def rollback(self) -> None:
        """See :meth:`UnitOfWork.rollback`."""
        await self._abort()

    async def _abort(self, broken: bool = False) -> None:
        """Roll back and give the connection back, never raising for a connection that
        fails meanwhile: the caller's own error is the one to report, and the server rolls
        back the transaction of a session that ends."""
        if not self._active:
            return
        self._close()
        conn = self.connection
        store = self.store
        try:
            closed = conn.is_closed()  # lost: the server has rolled the transaction back
        except asyncpg.InterfaceError:  # the pool already took back the dead connection
            return
        if closed:
            await store._release(conn, broken=True)
            return
        if _interrupted(conn):
            # a statement was cancelled mid-flight: the connection is given up, not reused
            await store._retire(conn)
            return
        try:
            if conn.is_in_transaction():
                # bounded: a server that stopped answering must not hang the caller
                await conn.execute(store._sql_rollback, timeout=store._commit_timeout)
        except Exception as exc:  # noqa: BLE001 - the caller's own error is reported
            _log.debug("rollback failed (%s); discarding the connection", exc)
            await store._release(conn, broken=True)
            return
        except BaseException:
            await store._release(conn, broken=True)
            raise
        await store._release(conn, broken=broken)
