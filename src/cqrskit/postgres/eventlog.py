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
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cqrskit._encoding import Encoder
from cqrskit.errors import (
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
from cqrskit.postgres._connections import (
    _CONNECTION_LOST,
    _check_connection,
    _commit_round_trip,
    _connection_lost,
    _no_reset,
    _Retry,
    _WriteConnections,
)
from cqrskit.postgres._sql import (
    _CONFLICT_STATE,
    _MAX_PER_TX,
    _NO_SUCH_STATEMENT,
    _SQL_REPORT_XID,
    _XID_NOTICE,
    SCHEMA_VERSION,
    _literal,
    _nullable,
    _parse_conflict,
    _stream_from_detail,
    postgres_ddl,
)

if TYPE_CHECKING:
    from cqrskit.idempotency import IdempotencyBackend

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("postgres", "asyncpg") from exc

__all__ = ["SCHEMA_VERSION", "PostgresEventStore", "PostgresUnitOfWork", "postgres_ddl"]

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

    def idempotency_backend(self, table: str, wait_timeout: float) -> IdempotencyBackend:
        """Rows in ``table`` of this store's schema, claimed in the command's transaction."""
        from cqrskit.postgres.idempotency import PostgresIdempotencyBackend

        return PostgresIdempotencyBackend(self, table, wait_timeout)

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
