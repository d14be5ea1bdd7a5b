"""PostgreSQL driver: event log and unit of work on asyncpg.

**Commit order.** A global sequence would hand out positions at INSERT time, in a different
order than the transactions commit: a reader could read position 11 while 10 is still
uncommitted and skip 10 for ever. Here the position is derived from the writing
transaction's id: ``position = (xid << 20) + n``, ``n`` being the event's index in the
transaction. Readers only return rows below ``pg_snapshot_xmin(pg_current_snapshot()) << 20``
(the *horizon*): every transaction with an xid below the snapshot's xmin has finished, so
every row below the horizon that will ever exist is already visible, and every row that is
still invisible belongs to a transaction with ``xid >= xmin`` and so lies above the horizon.
Writers never wait on a shared lock. The cost: while any write transaction in the cluster is
open, readers stop at its xid (a long write transaction holds projections back; their lag
metric shows it). Positions have gaps; tokens are plain ints.

**One round trip for events + COMMIT.** asyncpg has no pipeline API, but a simple-protocol
query string with several statements is one round trip: the events are rendered as SQL
literals (escape-string literals, E'...', with backslashes and quotes doubled: safe whatever
``standard_conforming_strings`` a session sets;
NUL refused) and sent as ``INSERT ...; COMMIT; BEGIN`` (the next command's transaction
begins with this one's commit: ``begin_ahead``). When the caller wants the positions
(``send_tracked``), a ``DO`` block in the same string raises a NOTICE with the transaction
id, from which they follow. When inline hooks need them before COMMIT, the INSERT runs with
``RETURNING`` first and COMMIT follows: one more round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cqrskit._encoding import Encoder
from cqrskit.errors import (
    CommitOutcomeUnknownError,
    ConcurrencyError,
    ConfigurationError,
    MissingExtraError,
    PersistenceError,
)
from cqrskit.eventlog import (
    EventStore,
    NewEvent,
    PendingRow,
    StoredEvent,
    UnitOfWork,
    validate_identifier,
)
from cqrskit.messages import Metadata

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("postgres", "asyncpg") from exc

__all__ = ["SCHEMA_VERSION", "PostgresEventStore", "PostgresUnitOfWork", "postgres_ddl"]

_log = logging.getLogger("cqrskit.postgres")

SCHEMA_VERSION = 1
"""Version of the event-log table layout this module writes."""

_CONFLICT_STATE = "CQ409"
_NO_SUCH_STATEMENT = "26000"  # invalid_sql_statement_name: EXECUTE of an unknown statement
_MAX_PER_TX = 1 << 20


def postgres_ddl(schema: str = "public", table: str = "cqrskit_events") -> str:
    """The DDL for the event log in ``schema`` (for users who run their own migrations).

    Raises:
        ConfigurationError: ``schema`` or ``table`` is not a valid identifier.
    """
    s = validate_identifier(schema, "schema name")
    t = validate_identifier(table, "table name")
    fn = validate_identifier(f"{table}_conflict"[:63], "function name")
    nv = validate_identifier(f"{table}_next_version"[:63], "function name")
    idx = validate_identifier(f"{table}_stream_version"[:63], "index name")
    return f"""CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.{t} (
    position bigint PRIMARY KEY,
    stream text NOT NULL,
    version integer NOT NULL,
    type text NOT NULL,
    schema_version integer NOT NULL,
    data text NOT NULL,
    message_id text NOT NULL,
    correlation_id text,
    causation_id text,
    recorded_at timestamptz NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS {idx} ON {s}.{t} (stream, version);
CREATE OR REPLACE FUNCTION {s}.{fn}(
    stream text, expected integer, actual integer, reason text
) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'cqrskit: stream % is at version %, expected %', stream, actual, expected
        USING ERRCODE = '{_CONFLICT_STATE}', DETAIL = actual::text, HINT = reason;
END $$;
CREATE OR REPLACE FUNCTION {s}.{nv}(
    p_stream text, p_expected integer, p_base bigint
) RETURNS integer LANGUAGE plpgsql STABLE AS $$
DECLARE
    v integer;
    p bigint;
BEGIN
    SELECT e.version, e.position INTO v, p FROM {s}.{t} e
        WHERE e.stream = p_stream ORDER BY e.version DESC LIMIT 1;
    v := coalesce(v, 0);
    IF p >= p_base THEN
        RETURN {s}.{fn}(p_stream, p_expected, v, 'younger');
    END IF;
    IF p_expected IS NOT NULL AND p_expected <> v THEN
        RETURN {s}.{fn}(p_stream, p_expected, v, 'expected');
    END IF;
    RETURN v + 1;
END $$;
CREATE TABLE IF NOT EXISTS {s}."cqrskit_schema" (
    name text PRIMARY KEY,
    version integer NOT NULL
);
INSERT INTO {s}."cqrskit_schema" (name, version) VALUES ('{table}', {SCHEMA_VERSION})
    ON CONFLICT (name) DO NOTHING;
"""


def _literal(value: str) -> str:
    """``value`` as an escape-string literal: ``E'...'`` with backslashes and quotes doubled
    means the same whatever ``standard_conforming_strings`` a session has set."""
    if type(value) is not str:
        raise PersistenceError(
            f"cannot store a {type(value).__name__} in a text column of the event log.",
            hint="stream ids, event types and metadata ids must be strings.",
        )
    if "\x00" in value:
        raise PersistenceError(
            "a NUL character cannot be stored in a PostgreSQL text column.",
            hint="remove NUL characters from event data and stream ids.",
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PersistenceError(
                "a string with a lone surrogate cannot be stored as UTF-8.",
                hint="remove unpaired surrogates from event data and stream ids.",
            ) from exc
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


_XID_NOTICE = "cqrskit-xid "
# sent before COMMIT when the caller wants the positions: the notice carries the writing
# transaction's id, from which the positions follow ((xid << 20) + n); SET LOCAL makes sure
# a client_min_messages above NOTICE does not swallow it
_SQL_REPORT_XID = (
    "SET LOCAL client_min_messages = notice; "
    f"DO $$BEGIN RAISE NOTICE '{_XID_NOTICE}%', pg_current_xact_id(); END$$; "
)


class _CommitTask(asyncio.Task[Any]):
    """A task running the round trip that ends in COMMIT; it cannot be cancelled."""

    def cancel(self, msg: Any | None = None) -> bool:
        """Refuse: the outcome of a COMMIT on the wire cannot be recalled."""
        return False


async def _commit_round_trip(conn: Any, sql: str) -> None:
    """Send the round trip that ends in COMMIT so that a cancellation cannot cut it in half.

    Once COMMIT is on the wire its outcome cannot be recalled: a cancellation that arrives
    meanwhile waits for the outcome (the commit then completes, its token is reported) and
    is delivered again at the caller's next await.
    """
    # The task refuses cancellation itself, so this coroutine can await it directly: a
    # cancellation of the caller then arrives once the outcome is in, with no shield's
    # extra future and event-loop hop per commit.
    task = _CommitTask(conn.execute(sql))
    interrupted = False
    try:
        while True:
            try:
                await task
                return
            except asyncio.CancelledError:
                if task.cancelled():
                    raise
                interrupted = True
    finally:
        if interrupted:
            current = asyncio.current_task()
            if current is not None:
                current.cancel()


def _nullable(value: str | None) -> str:
    return "NULL" if value is None else _literal(value)


def _array(values: Sequence[str | None]) -> str:
    return "ARRAY[" + ",".join("NULL" if v is None else _literal(v) for v in values) + "]"


def _int_array(values: Sequence[int | None]) -> str:
    return "ARRAY[" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "]"


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
                await _commit_round_trip(conn, store._sql_end)
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
                    await _commit_round_trip(conn, store._sql_commit)
                    last = stored[-1].position
                elif self._want_positions:
                    # the transaction id comes back as a NOTICE in the same round trip
                    # (asyncpg discards the rows of a multi-statement query)
                    xids = store._xids
                    xids.pop(id(conn), None)
                    sql = store._render_insert(self) + _SQL_REPORT_XID + store._sql_commit
                    committing = True
                    await _commit_round_trip(conn, sql)
                    xid = xids.pop(id(conn), None)
                    if xid is None:  # pragma: no cover - the notice is always sent
                        last = await store._find_last(conn, self)
                    else:
                        last = (xid << 20) + len(self._events) - 1
                else:
                    sql = store._render_insert(self) + store._sql_commit
                    committing = True
                    await _commit_round_trip(conn, sql)
        except _CONNECTION_LOST as exc:
            await self._abort()
            raise _connection_lost(exc, committing) from exc
        except asyncpg.PostgresError as exc:
            if getattr(exc, "sqlstate", None) == _NO_SUCH_STATEMENT:
                # the handler ran DISCARD ALL or DEALLOCATE: this connection lost the
                # prepared event INSERT; a new connection prepares it again
                await self._abort(broken=True)
                raise PersistenceError(
                    "the event log's prepared INSERT is gone from this connection (did the "
                    f"handler run DISCARD ALL or DEALLOCATE?): {exc}; nothing was committed.",
                    hint="do not deallocate prepared statements on uow.connection; the "
                    "command can be retried (it will get a new connection).",
                ) from exc
            await self._abort()
            raise await store._translate(exc, self.recorded) from exc
        except BaseException:
            await self._abort()
            raise
        self._close()
        await store._release(conn)
        if self._events:
            store._wake()
        return last

    async def rollback(self) -> None:
        """See :meth:`UnitOfWork.rollback`."""
        await self._abort()

    async def _abort(self, broken: bool = False) -> None:
        if not self._active:
            return
        self._close()
        conn = self.connection
        try:
            closed = conn.is_closed()  # lost: the server has rolled the transaction back
        except asyncpg.InterfaceError:  # the pool already took back the dead connection
            return
        if closed:
            await self.store._release(conn, broken=True)
            return
        try:
            if conn.is_in_transaction():
                await conn.execute(self.store._sql_rollback)
        except BaseException:
            await self.store._release(conn, broken=True)
            raise
        await self.store._release(conn, broken=broken)


class _WriteConnections:
    """Connections for units of work: idle ones reused last-in first-out, new ones opened
    on demand up to ``size``, then callers queue. Lighter than a general pool: a unit of
    work always ends its transaction, so a connection needs no reset between uses.

    With ``begin_ahead > 0`` a unit of work ends with ``COMMIT; BEGIN`` (or ``ROLLBACK;
    BEGIN``): the connection comes back already inside the next, empty transaction and
    the next command skips its BEGIN round trip. Such a transaction has no xid and no
    snapshot, so it holds back neither readers' horizon nor VACUUM. A connection left
    idle longer than ``begin_ahead`` seconds is rolled back in the background (and a
    caller that takes it meanwhile begins afresh), so ``now()`` in a handler is never
    older than that, and monitoring sees an idle transaction no longer than that.
    """

    def __init__(
        self,
        dsn: str,
        size: int,
        begin_ahead: float = 0.0,
        on_connect: Callable[[Any], Awaitable[None]] | None = None,
    ) -> None:
        self._dsn = dsn
        self._on_connect = on_connect
        self._size = size
        self._ahead = begin_ahead
        self._idle: list[tuple[Any, float]] = []  # (connection, released at)
        self._opened = 0
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._ending: set[asyncio.Task[None]] = set()

    async def acquire(self) -> tuple[Any, bool]:
        """A connection, and whether it is inside a transaction begun less than
        ``begin_ahead`` seconds ago (the caller then needs no BEGIN)."""
        if self._closed:
            raise PersistenceError("the PostgreSQL event store is closed.")
        idle = self._idle
        while idle:
            conn, since = idle.pop()
            if conn.is_closed():  # died while idle (server restart, idle timeout)
                self.release(conn, broken=True)
                continue
            return conn, conn.is_in_transaction() and time.monotonic() - since < self._ahead
        if self._opened < self._size:
            self._opened += 1
            try:
                conn = await asyncpg.connect(self._dsn)
                await _check_connection(conn)
                if self._on_connect is not None:
                    await self._on_connect(conn)
            except BaseException:
                self._opened -= 1
                raise
            return conn, False
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            conn = await fut
        except asyncio.CancelledError:
            # a connection handed over just before the cancellation goes back; a _Retry
            # handed over must not turn the cancellation into a retry
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())
            raise
        return conn, conn.is_in_transaction()  # handed over the moment it was released

    def release(self, conn: Any, broken: bool = False) -> None:
        if broken or self._closed or conn.is_closed():
            self._opened -= 1
            conn.terminate()
            while self._waiters:  # a queued caller may open a fresh connection now
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_exception(_Retry())
                    break
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self._idle.append((conn, time.monotonic()))
        if self._sweeper is None and self._ahead > 0 and conn.is_in_transaction():
            # a fresh context: the timer must not keep the releasing command's context alive
            self._sweeper = asyncio.get_running_loop().call_later(
                self._ahead, self._sweep, context=contextvars.Context()
            )

    def _sweep(self) -> None:
        """Roll back the begun-ahead transactions of connections idle past ``begin_ahead``."""
        self._sweeper = None
        if self._closed:
            return
        now = time.monotonic()
        keep: list[tuple[Any, float]] = []
        oldest: float | None = None
        for conn, since in self._idle:
            if conn.is_in_transaction() and not conn.is_closed():
                if now - since >= self._ahead:
                    task = asyncio.ensure_future(self._end(conn))
                    self._ending.add(task)
                    task.add_done_callback(self._ending.discard)
                    continue
                oldest = since if oldest is None else min(oldest, since)
            keep.append((conn, since))
        self._idle = keep
        if oldest is not None:
            delay = max(oldest + self._ahead - now, 0.001)
            self._sweeper = asyncio.get_running_loop().call_later(
                delay, self._sweep, context=contextvars.Context()
            )

    async def _end(self, conn: Any) -> None:
        try:
            await conn.execute("ROLLBACK")
        except Exception as exc:  # noqa: BLE001 - a background task: drop the connection
            _log.debug("discarding a write connection: %s", exc)
            self.release(conn, broken=True)
            return
        except BaseException:  # cancelled (store closing, loop ending): drop it too
            self.release(conn, broken=True)
            raise
        self.release(conn)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, []  # nothing is handed out while closing
        if self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)
        for conn, _since in idle:
            self._opened -= 1
            with contextlib.suppress(Exception):
                await conn.close()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(PersistenceError("the PostgreSQL event store is closed."))


class _Retry(Exception):
    """A queued caller is told to try acquiring again (a connection was discarded)."""


class PostgresEventStore(EventStore):
    """The PostgreSQL event log and unit-of-work factory (asyncpg).

    Create it with ``store = await PostgresEventStore.open(dsn, schema="app")`` and close it
    with ``await store.close()``.

    Args:
        pool: an asyncpg pool (see :meth:`open`).
        schema: the schema holding the event log (validated, quoted).
        table: the event-log table name (validated, quoted).
        notify: send ``NOTIFY`` in each commit so readers in other processes wake up (a
            hint; readers still poll). Off by default: PostgreSQL serializes the commits of
            every transaction that notifies (a database-wide lock held through the WAL
            flush), which cost about a third of the throughput with 8 writers.
    """

    unit_of_work_type = PostgresUnitOfWork

    def __init__(
        self,
        pool: Any,
        *,
        schema: str = "public",
        table: str = "cqrskit_events",
        notify: bool = False,
        encoder: Encoder | None = None,
    ) -> None:
        super().__init__(encoder=encoder)
        self.pool = pool
        self.dsn: str | None = None
        self._writers: _WriteConnections | None = None
        self.schema = schema
        self.table = table
        s = validate_identifier(schema, "schema name")
        t = validate_identifier(table, "table name")
        fn = validate_identifier(f"{table}_conflict"[:63], "function name")
        self.channel = f"cqrskit_{schema}_{table}"[:63]
        self._notify = notify
        self._listener: Any = None
        self._sql_commit = (
            f"NOTIFY {validate_identifier(self.channel, 'channel')}; COMMIT" if notify else "COMMIT"
        )
        self._xids: dict[int, int] = {}  # id(connection) -> xid reported by its last commit
        self._xid_notices = False  # set by open() when the role may run DO blocks
        self._sql_end = "COMMIT"  # a unit of work without events
        self._sql_rollback = "ROLLBACK"
        horizon = "(pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 20)"
        cols = (
            "position, stream, version, type, schema_version, data, message_id, "
            "correlation_id, causation_id, recorded_at"
        )
        # one statement for every stream of the command. Versions continue from each
        # stream's last event (the unique index catches a concurrent writer); the function
        # raises CQ409 when the expected version does not hold, or when the stream's last
        # event has a higher position than this transaction's (a younger transaction
        # appended first): per stream, position order must equal version order.
        base = "(pg_current_xact_id()::text::bigint << 20)"
        self._sql_insert_tpl = (
            f"INSERT INTO {s}.{t} ({cols}) "
            f"SELECT {base} + u.n - 1, u.stream, "
            f"CASE WHEN coalesce(last.position, -1) >= {base} "
            f"THEN {s}.{fn}(u.stream, u.expected, coalesce(last.version, 0), 'younger') "
            "WHEN u.expected IS NOT NULL AND u.expected <> coalesce(last.version, 0) + u.idx - 1 "
            f"THEN {s}.{fn}(u.stream, u.expected, coalesce(last.version, 0), 'expected') "
            "ELSE coalesce(last.version, 0) + u.idx END, "
            "u.type, u.schema_version, u.data, u.message_id, u.correlation_id, "
            "u.causation_id, u.recorded_at::timestamptz "
            "FROM unnest({0}::text[], {1}::int[], {2}::int[], {3}::text[], {4}::int[], "
            "{5}::text[], {6}::text[], {7}::text[], {8}::text[], {9}::text[]) WITH ORDINALITY "
            "AS u(stream, idx, expected, type, schema_version, data, message_id, "
            "correlation_id, causation_id, recorded_at, n) "
            f"LEFT JOIN LATERAL (SELECT e.version, e.position FROM {s}.{t} e "
            "WHERE e.stream = u.stream ORDER BY e.version DESC LIMIT 1) AS last ON true"
        )
        self._next_version = f"{s}." + validate_identifier(
            f"{table}_next_version"[:63], "function name"
        )
        self._sql_values = f"INSERT INTO {s}.{t} ({cols}) VALUES "
        # one event: (stream, expected version before it or NULL, type, schema version,
        # data, message id, correlation id, causation id, timestamp)
        self._sql_prepare = (
            "PREPARE cqrskit_append1(text, int, text, int, text, text, text, text, text) AS "
            f"INSERT INTO {s}.{t} ({cols}) VALUES ({base}, $1, "
            f"CASE WHEN $2 = 0 THEN 1 ELSE {self._next_version}($1, $2, {base}) END, "
            "$3, $4, $5, $6, $7, $8, $9::timestamptz)"
        )
        self._sql_insert_returning = (
            self._sql_insert_tpl.format(*(f"${i}" for i in range(1, 11)))
            + " RETURNING position, stream, version"
        )
        self._sql_after = (
            f"SELECT {cols} FROM {s}.{t} WHERE position > $1 AND position < {horizon} "
            "ORDER BY position LIMIT $2"
        )
        self._sql_head = (
            f"SELECT coalesce(max(position), 0) FROM {s}.{t} WHERE position < {horizon}"
        )
        self._sql_stream = (
            f"SELECT {cols} FROM {s}.{t} WHERE stream = $1 AND version > $2 ORDER BY version"
        )
        self._sql_version = f"SELECT coalesce(max(version), 0) FROM {s}.{t} WHERE stream = $1"
        self._sql_last = f"SELECT coalesce(max(position), 0) FROM {s}.{t}"
        self._sql_find = (
            f"SELECT position FROM {s}.{t} WHERE stream = $1 AND message_id = $2 "
            "ORDER BY position DESC LIMIT 1"
        )

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        schema: str = "public",
        table: str = "cqrskit_events",
        create_tables: bool = True,
        notify: bool = False,
        min_size: int = 1,
        max_size: int = 10,
        encoder: Encoder | None = None,
        begin_ahead: float = 0.05,
    ) -> PostgresEventStore:
        """Connect a pool to ``dsn`` and prepare (or check) the tables.

        Args:
            begin_ahead: seconds a write connection may wait, idle, inside the next
                command's transaction. Each commit is sent as ``COMMIT; BEGIN`` so that
                the next command on that connection starts with no BEGIN round trip; a
                connection idle longer than this is rolled back in the background. The
                empty transaction holds no xid and no snapshot. What changes for handlers:
                ``now()`` (the transaction's start) may be up to this much older than the
                command; use ``statement_timestamp()`` or ``clock_timestamp()`` for the
                exact time. ``0`` sends BEGIN with every command instead.

        Raises:
            ConfigurationError: bad names, a negative ``begin_ahead``,
                ``standard_conforming_strings`` off, tables missing with
                ``create_tables=False``, or a schema version mismatch.
        """
        validate_identifier(schema, "schema name")
        validate_identifier(table, "table name")
        if not begin_ahead >= 0:  # also refuses NaN
            raise ConfigurationError(
                f"begin_ahead must be a number of seconds >= 0, got {begin_ahead!r}.",
                hint="pass 0 to send BEGIN with every command.",
            )
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_check_connection,
            reset=_no_reset,
        )
        store = cls(pool, schema=schema, table=table, notify=notify, encoder=encoder)
        store.dsn = dsn
        store._writers = _WriteConnections(dsn, max_size, begin_ahead, store._setup_writer)
        if begin_ahead > 0:
            store._sql_commit += "; BEGIN"
            store._sql_end += "; BEGIN"
            store._sql_rollback += "; BEGIN"
        try:
            await store._prepare_tables(create_tables)
            store._xid_notices = await store._probe_notices()
        except BaseException:
            await pool.close()
            raise
        return store

    async def _prepare_tables(self, create: bool) -> None:
        async with self.pool.acquire() as conn:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2",
                self.schema,
                self.table,
            )
            if exists is None:
                if not create:
                    raise ConfigurationError(
                        f"the event log table {self.schema}.{self.table} does not exist.",
                        hint="pass create_tables=True, or run the DDL from "
                        "cqrskit.postgres.postgres_ddl() in your migrations.",
                    )
                async with conn.transaction():
                    # several processes may start at once: one creates, the others wait
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext($1))", f"cqrskit:{self.schema}"
                    )
                    await conn.execute(postgres_ddl(self.schema, self.table))
            version = await conn.fetchval(
                f'SELECT version FROM {validate_identifier(self.schema)}."cqrskit_schema" '
                "WHERE name = $1",
                self.table,
            )
        if version != SCHEMA_VERSION:
            found = "no version row" if version is None else f"version {version}"
            raise ConfigurationError(
                f"event log table {self.schema}.{self.table} has {found}; this cqrskit writes "
                f"version {SCHEMA_VERSION}.",
                hint="run the DDL from cqrskit.postgres.postgres_ddl(), or upgrade cqrskit.",
            )

    async def close(self) -> None:
        """Close the listener connection, the write connections and the pool."""
        if self._writers is not None:
            await self._writers.close()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
        await self.pool.close()

    # -- write side ----------------------------------------------------------------------

    async def begin(
        self, metadata: Metadata | None = None, *, positions: bool = True
    ) -> PostgresUnitOfWork:
        """See :meth:`EventStore.begin`: takes a write connection inside a transaction.

        The connection's previous unit of work began this one with its COMMIT (see
        ``begin_ahead`` in :meth:`open`); otherwise ``BEGIN`` is sent now. The events and
        COMMIT go in one round trip; with ``positions=True`` the transaction id comes back
        in it as a NOTICE (see the module docstring).
        """
        # An idle connection may have died meanwhile (server restart, idle timeout): nothing
        # has run yet, so BEGIN is retried once on a fresh connection.
        for attempt in (1, 2):
            conn, begun = await self._acquire_writer()
            if begun:
                # one pass of the event loop first: a connection that died while idle
                # (server restart) is then seen closed instead of failing mid-command
                try:
                    await asyncio.sleep(0)
                except BaseException:
                    await self._release(conn)
                    raise
                if not conn.is_closed():
                    return PostgresUnitOfWork(self, metadata, conn, positions)
                await self._release(conn, broken=True)
                continue
            try:
                # a begun-ahead transaction that waited too long starts afresh (now())
                await conn.execute("ROLLBACK; BEGIN" if conn.is_in_transaction() else "BEGIN")
            except _CONNECTION_LOST as exc:
                await self._release(conn, broken=True)
                if attempt == 2:
                    raise PersistenceError(
                        f"cannot start a transaction: the connection to PostgreSQL was lost "
                        f"({exc}); nothing was written.",
                        hint="check that the server is up; the command can be retried.",
                    ) from exc
                continue
            except BaseException:
                await self._release(conn, broken=True)
                raise
            return PostgresUnitOfWork(self, metadata, conn, positions)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire_writer(self) -> tuple[Any, bool]:
        writers = self._writers
        if writers is None:
            return await self.pool.acquire(), False
        for _ in range(100):
            try:
                return await writers.acquire()
            except _Retry:
                continue
        raise PersistenceError(  # pragma: no cover - 100 connections failing in a row
            "could not obtain a PostgreSQL connection."
        )

    async def _release(self, conn: Any, broken: bool = False) -> None:
        if self._writers is not None:
            self._writers.release(conn, broken)
            return
        if broken:
            conn.terminate()
        await self.pool.release(conn)

    @staticmethod
    def _columns(rows: list[PendingRow]) -> list[list[Any]]:
        cols: list[list[Any]] = [[] for _ in range(10)]
        for r in rows:
            enc = r.encoded
            md = r.metadata
            for col, value in zip(
                cols,
                (
                    r.stream,
                    r.index + 1,
                    r.expected_version,
                    enc.type,
                    enc.schema_version,
                    enc.data,
                    md["message_id"],
                    md["correlation_id"],
                    md["causation_id"],
                    md["timestamp"],
                ),
                strict=True,
            ):
                col.append(value)
        return cols

    def _render_insert(self, uow: PostgresUnitOfWork) -> str:
        # A plain multi-row VALUES insert, cheap to plan: a new stream (expected version
        # 0) needs no check (the unique index refuses version 1 if the stream exists);
        # any other stream gets its next version from the next_version function, which
        # also checks the expected version and that no younger transaction appended.
        # Rendered straight from the unit of work (UnitOfWork.pending_rows without its
        # per-row objects); the metadata literals are the same for every row.
        prefix, correlation, causation, timestamp = uow._lineage()
        uow._prefix = prefix
        lineage = f"{_nullable(correlation)}, {_nullable(causation)}, {_literal(timestamp)})"
        events = uow._events
        if len(events) == 1 and self._writers is not None:
            # the statement prepared on every write connection (see _setup_writer)
            stream_id, event = events[0]
            first = uow._base.get(stream_id)
            enc = self._encode(event)
            return (
                f"EXECUTE cqrskit_append1({_literal(stream_id)}, "
                f"{'NULL' if first is None else int(first)}, {_literal(enc.type)}, "
                f"{int(enc.schema_version)}, {_literal(enc.data)}, {_literal(prefix + '-0')}, "
                f"{lineage}; "
            )
        prefix = _literal(prefix)[:-1]  # the message id literal without its closing quote
        base = "(pg_current_xact_id()::text::bigint << 20)"
        nv = self._next_version
        encode = self._encode
        bases = uow._base
        seen: dict[str, int] = {}
        values: list[str] = []
        for n, (stream_id, event) in enumerate(uow._events):
            i = seen.get(stream_id, 0)
            seen[stream_id] = i + 1
            first = bases.get(stream_id)  # the expected version before the stream's first
            enc = encode(event)
            stream = _literal(stream_id)
            if first == 0:
                version = str(i + 1)
            else:
                expected = "NULL" if first is None else str(int(first))
                version = f"{nv}({stream}, {expected}, {base}) + {i}"
            values.append(
                f"({base} + {n}, {stream}, {version}, {_literal(enc.type)}, "
                f"{int(enc.schema_version)}, {_literal(enc.data)}, {prefix}-{n}', {lineage}"
            )
        return self._sql_values + ", ".join(values) + "; "

    async def _setup_writer(self, conn: Any) -> None:
        """A new write connection: listen for transaction-id notices; prepare the event
        INSERT of single-event commands (the server then neither parses nor plans it per
        command; an EXECUTE with literals rides in the commit's string)."""
        conn.add_log_listener(self._on_log_message)
        try:
            await conn.execute(self._sql_prepare)
        except BaseException:
            conn.terminate()
            raise

    def _on_log_message(self, conn: Any, message: Any) -> None:
        text = getattr(message, "message", "")
        if isinstance(text, str) and text.startswith(_XID_NOTICE):
            with contextlib.suppress(ValueError):
                self._xids[id(conn)] = int(text[len(_XID_NOTICE) :])

    async def _find_last(self, conn: Any, uow: PostgresUnitOfWork) -> int:
        """The last event's position, read back on the committing connection (now in its
        next transaction): for when the transaction-id notice did not arrive."""
        stream, _ = uow._events[-1]
        message_id = f"{uow._prefix}-{len(uow._events) - 1}"
        position = await conn.fetchval(self._sql_find, stream, message_id)
        if position is None:  # pragma: no cover - the event was just committed
            raise PersistenceError("the committed event could not be found in the log.")
        return int(position)

    async def _probe_notices(self) -> bool:
        """Whether this role may run a ``DO`` block (USAGE on plpgsql, revoked from PUBLIC
        on some hardened servers): if not, tracked commits read positions with RETURNING."""
        async with self.pool.acquire() as conn:
            try:
                await conn.execute("DO $$BEGIN END$$")
            except asyncpg.InsufficientPrivilegeError:
                _log.warning(
                    "this role may not run DO blocks (no USAGE on plpgsql): send_tracked "
                    "reads positions back with one more round trip"
                )
                return False
        return True

    async def _insert_returning(self, conn: Any, rows: list[PendingRow]) -> list[StoredEvent]:
        got = await conn.fetch(self._sql_insert_returning, *self._columns(rows))
        out: list[StoredEvent] = []
        for r, (position, _stream, version) in zip(rows, got, strict=True):
            enc = r.encoded
            out.append(
                StoredEvent(
                    position, r.stream, version, enc.type, enc.schema_version, enc.data, r.metadata
                )
            )
        return out

    async def _translate(self, exc: Exception, recorded: Sequence[NewEvent]) -> Exception:
        state = getattr(exc, "sqlstate", None)
        if state == _CONFLICT_STATE:
            stream, actual, expected = _parse_conflict(exc)
            if getattr(exc, "hint", None) == "younger":
                return ConcurrencyError(
                    f"stream {stream!r}: a transaction that started later appended version "
                    f"{actual} first; this one must retry so that the stream's versions "
                    "keep position order.",
                    stream=stream,
                    expected_version=expected,
                    actual_version=actual,
                    hint="retry the command (the retry behavior does it).",
                )
            return ConcurrencyError(
                f"stream {stream!r} is at version {actual}, expected {expected}.",
                stream=stream,
                expected_version=expected,
                actual_version=actual,
                hint="reload the stream and retry the command.",
            )
        if state == "23505" and "stream_version" in str(getattr(exc, "constraint_name", "")):
            dup = _stream_from_detail(getattr(exc, "detail", "") or "")
            now = None if dup is None else await self.stream_version(dup)
            expected = next((n.expected_version for n in recorded if n.stream == dup), None)
            text = (
                f"stream {dup!r} is at version {now}, expected {expected}."
                if expected is not None
                else f"another writer appended to stream {dup!r} concurrently; it is now at "
                f"version {now}."
            )
            return ConcurrencyError(
                text,
                stream=dup,
                expected_version=expected,
                actual_version=now,
                hint="reload the stream and retry the command.",
            )
        return PersistenceError(f"PostgreSQL refused the commit: {exc}")

    # -- read side -----------------------------------------------------------------------

    @staticmethod
    def _event(r: Any) -> StoredEvent:
        return StoredEvent(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            {
                "message_id": r[6],
                "correlation_id": r[7],
                "causation_id": r[8],
                "timestamp": r[9].isoformat(),
            },
        )

    async def read_after(self, position: int, limit: int = 1000) -> list[StoredEvent]:
        """See :meth:`EventStore.read_after`: stops below the visibility horizon."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(self._sql_after, position, limit)
        return [self._event(r) for r in rows]

    async def head(self) -> int:
        """See :meth:`EventStore.head` (the highest position below the horizon)."""
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval(self._sql_head))

    async def last_position(self) -> int:
        """See :meth:`EventStore.last_position` (no horizon)."""
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval(self._sql_last))

    async def read_stream(self, stream: str, after_version: int = 0) -> list[StoredEvent]:
        """See :meth:`EventStore.read_stream` (committed events, no horizon)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(self._sql_stream, stream, after_version)
        return [self._event(r) for r in rows]

    async def stream_version(self, stream: str) -> int:
        """The committed version of ``stream`` (0 when it has no events)."""
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval(self._sql_version, stream))

    async def wait_for(self, position: int, timeout: float) -> bool:
        """See :meth:`EventStore.wait_for`: also wakes on NOTIFY from other processes."""
        if self._notify and self._listener is None and self.dsn is not None:
            self._listener = await asyncpg.connect(self.dsn)
            await self._listener.add_listener(self.channel, self._on_notify)
        return await super().wait_for(position, timeout)

    def _on_notify(self, *args: Any) -> None:
        self._wake()


async def _check_connection(conn: Any) -> None:
    if conn.get_settings().standard_conforming_strings != "on":
        raise ConfigurationError(
            "PostgreSQL standard_conforming_strings is off; cqrskit renders event literals "
            "and refuses to run without it.",
            hint="ALTER DATABASE ... SET standard_conforming_strings = on (the default).",
        )


async def _no_reset(conn: Any) -> None:
    # every unit of work ends its transaction itself; the default reset (UNLISTEN, RESET
    # ALL, ...) would cost one more round trip per command
    return None


_CONNECTION_LOST = (asyncpg.PostgresConnectionError, OSError)


def _connection_lost(exc: BaseException, committing: bool) -> PersistenceError:
    if committing:
        return CommitOutcomeUnknownError(
            f"the connection to PostgreSQL was lost while COMMIT was in flight ({exc}); the "
            "command may or may not have committed.",
            hint="retry with the same idempotency key (cqrskit.idempotency), which returns "
            "the stored result if the first attempt committed.",
        )
    return PersistenceError(
        f"the connection to PostgreSQL was lost before COMMIT ({exc}); nothing was committed.",
        hint="retry the command.",
    )


def _parse_conflict(exc: Exception) -> tuple[str, int, int | None]:
    text = str(getattr(exc, "message", exc))
    prefix = "cqrskit: stream "
    body = text[len(prefix) :] if text.startswith(prefix) else text
    stream, _, rest = body.rpartition(" is at version ")
    actual_s, _, expected_s = rest.partition(", expected ")
    try:
        actual = int(getattr(exc, "detail", None) or actual_s)
    except ValueError:
        actual = -1
    expected = int(expected_s) if expected_s.strip().lstrip("-").isdigit() else None
    return stream, actual, expected


def _stream_from_detail(detail: str) -> str | None:
    # "Key (stream, version)=(acc-1, 3) already exists."
    start = detail.find(")=(")
    end = detail.rfind(", ")
    if start < 0 or end < start:
        return None
    return detail[start + 3 : end]
