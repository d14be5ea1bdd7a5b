"""PostgreSQL driver: event log and unit of work on asyncpg.

**Commit order.** A global sequence would hand out positions at INSERT time, in a different
order than the transactions commit: a reader could read position 11 while 10 is still
uncommitted and skip 10 for ever. Here the position is derived from the writing
transaction's id: ``position = (xid << 20) + n``, ``n`` being the event's index in the
transaction. Readers return only rows below a *horizon* ``H << 20`` such that every row
with an xid below ``H`` that will ever exist is already visible to them. Positions have
gaps; tokens are plain ints. Writers never wait on a lock that readers take.

**The horizon depends only on this log's appenders.** Every transaction that may append
takes a shared transaction-level advisory lock ``K`` (keyed by schema and table) as its
first statement, before it has an xid: it rides in the ``BEGIN`` string, so it costs no
round trip (``COMMIT; BEGIN; SELECT pg_advisory_xact_lock_shared(...)``). Invariant **I**:
a transaction that inserts into the log took ``K`` before its xid was assigned and holds
it until it ends. A reader's statement, with snapshot ``S`` taken at time ``t_S``, reads
the lock table at ``t_L > t_S`` and computes::

    foreign = xids whose transaction, at t_L, holds its xid lock but not K
    proven  = min({x in xip(S) : x not in foreign} + {xmax(S)})

and reads rows below ``used << 20``, where ``used = max(xmin(S), P)`` and ``P`` is the
highest ``proven`` returned by an *earlier* statement on the same server (kept by the
store with the server's start time: after a restart or a failover, xids an earlier
statement saw running may be handed out again, so a horizon proven before is dropped).

*Claim*: a statement whose snapshot is taken after ``t_L`` sees every row that will ever
exist with an xid below ``proven``. Let transaction ``W`` with xid ``X < proven`` commit a
row. Then ``X < xmax(S)``, so ``X`` was assigned before ``t_S``. (a) ``X`` not in
``xip(S)``: ``W`` had ended at ``t_S``, committed (or it aborted and the row never
exists), so any later snapshot sees it. (b) ``X`` in ``xip(S)``: ``X < proven`` puts it in
``foreign``, so at ``t_L`` ``W`` held its xid lock and not ``K``. By **I**, ``W`` took ``K``
before ``t_S`` and keeps it until it ends; not holding it at ``t_L`` means ``W`` had ended
(and released its locks) by ``t_L``, and PostgreSQL releases a transaction's locks only
after its end is visible to new snapshots. So every snapshot after ``t_L`` sees the row.
The store sends the statement that uses ``P`` only after the reply of the one that proved
it, so its snapshot is taken after that ``t_L``; the snapshot's own xmin is a valid bound by
itself (every xid below it had ended at ``t_S``), so ``max(xmin(S), P)`` is sound. Being
inexact only holds readers back longer, never skips a row: a transaction whose xid lock is
not yet in the lock table is not ``foreign``; one that ended between ``t_S`` and ``t_L``
is not ``foreign`` either, or, if its locks were released one at a time and only ``K`` was
gone, falls under (b). A prepared transaction (two-phase commit) keeps both locks.

So a reader waits only for this log's appenders that hold an xid: a transaction in another
database, or one in this database that never appends, does not hold it back. An appender
that stays open (a slow handler, an ``idle in transaction`` session holding a unit of
work) does, at its xid, until it ends: :meth:`PostgresEventStore.appenders` lists them
with pid and age. A read costs one round trip, two when it proved a higher horizon than it
could use (then it reads again with it). ``P`` is also ignored when it exceeds the
snapshot's xmax. On a standby the primary's locks are not visible and the horizon is the
snapshot's xmin. A transaction that inserts into the log without ``K`` (hand-written SQL)
breaks **I**: run ``store.appender_lock_sql`` first.

**One round trip for events + COMMIT.** asyncpg has no pipeline API, but a simple-protocol
query string with several statements is one round trip: the events are rendered as SQL
literals (escape-string literals, E'...', with backslashes and quotes doubled, or plain ones
for values with nothing to escape: safe whatever ``standard_conforming_strings`` a session
sets; NUL refused) and sent as ``INSERT ...; COMMIT; BEGIN; SELECT <K>`` (the next command's
transaction begins with this one's commit: ``begin_ahead``). An error from that string may
come after its COMMIT, so a lack of resources or a cancellation there is reported as an
unknown outcome; the reply is awaited at most ``commit_timeout`` seconds. When the caller
wants the positions (``send_tracked``), a ``DO`` block in the same string raises a NOTICE
with the transaction id, from which they follow. When inline hooks need them before
COMMIT, the INSERT runs with ``RETURNING`` first and COMMIT follows: one more round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cqrskit._encoding import Encoder
from cqrskit.errors import (
    ConfigurationError,
    ConnectionLostError,
    MissingExtraError,
    PersistenceError,
)
from cqrskit.eventlog import (
    Appender,
    EventStore,
    PendingRow,
    StoredEvent,
    UnitOfWork,
    validate_identifier,
)
from cqrskit.messages import Metadata
from cqrskit.postgres._append import columns, render_insert, translate_error
from cqrskit.postgres._connections import (
    _CONNECTION_LOST,
    _check_connection,
    _CommitClock,
    _lost,
    _no_reset,
    _Retry,
    _unsent,
    _WriteConnections,
)
from cqrskit.postgres._horizon import appenders_sql, horizon_cte, lock_key, lock_sql
from cqrskit.postgres._notify import Listener, Notifier
from cqrskit.postgres._sql import (
    _XID_NOTICE,
    SCHEMA_VERSION,
    postgres_ddl,
)
from cqrskit.postgres._unitofwork import PostgresUnitOfWork

if TYPE_CHECKING:
    from cqrskit.idempotency import IdempotencyBackend

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("postgres", "asyncpg") from exc

__all__ = ["SCHEMA_VERSION", "PostgresEventStore", "PostgresUnitOfWork", "postgres_ddl"]

_log = logging.getLogger("cqrskit.postgres")


def _by_position(e: StoredEvent) -> int:
    return e.position


class PostgresEventStore(EventStore):
    """The PostgreSQL event log and unit-of-work factory (asyncpg).

    Create it with ``store = await PostgresEventStore.open(dsn, schema="app")`` and close it
    with ``await store.close()``.

    Args:
        pool: an asyncpg pool (see :meth:`open`).
        schema: the schema holding the event log (validated, quoted).
        table: the event-log table name (validated, quoted).
        notify: send ``NOTIFY`` after commits so readers in other processes wake up (a
            hint; readers still poll). A store made by :meth:`open` sends it after the
            commit returned, on a connection of its own, one for any number of commits
            that end while one is on its way; writers keep committing in parallel. A store
            built on your own pool sends it inside each commit, where PostgreSQL
            serializes the commits of every transaction that notifies (a database-wide
            lock held through the WAL flush).
        commit_timeout: seconds to wait for a COMMIT's reply (see :meth:`open`).
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
        commit_timeout: float = 5.0,
    ) -> None:
        super().__init__(encoder=encoder)
        self._commit_timeout = self._check_commit_timeout(commit_timeout)
        self._commit_clock = _CommitClock(self._commit_timeout)
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
        self._notifier: Notifier | None = None  # set by open(): NOTIFY after the commit
        self._listener: Listener | None = None  # opened by wait_for() with notify
        self._closed = False
        self._sql_commit = (
            f"NOTIFY {validate_identifier(self.channel, 'channel')}; COMMIT" if notify else "COMMIT"
        )
        self._xids: dict[int, int] = {}  # id(connection) -> xid reported by its last commit
        self._xid_notices = False  # set by open() when the role may run DO blocks
        key = lock_key(schema, table)
        # every transaction that may append takes the appender lock first, before it has
        # an xid (see the module docstring); it rides in the BEGIN string
        self.appender_lock_sql = lock_sql(key)
        """The statement a transaction must run first if it inserts into the log itself."""
        self._sql_begin = f"BEGIN; {self.appender_lock_sql}"
        self._sql_end = "COMMIT"  # a unit of work without events
        self._sql_rollback = "ROLLBACK"
        # an xid below which every row that will ever exist is readable, and the server
        # (its start time) that proved it
        self._proven = 0
        self._server: datetime | None = None
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
        with_horizon = horizon_cte(key, "$3::bigint", "$4::timestamptz")
        self._sql_after = (
            f"{with_horizon}SELECT h.used, h.proven, h.server, e.* FROM h LEFT JOIN LATERAL "
            f"(SELECT {cols} FROM {s}.{t} WHERE position > $1 AND position < (h.used << 20) "
            "ORDER BY position LIMIT $2) e ON true"
        )
        self._sql_head = (
            f"{horizon_cte(key, '$1::bigint', '$2::timestamptz')}SELECT h.used, h.proven, "
            "h.server, "
            f"(SELECT coalesce(max(position), 0) FROM {s}.{t} "
            "WHERE position < (h.used << 20)) FROM h"
        )
        self._sql_appenders = appenders_sql(key)
        self._sql_backlog = (
            "SELECT count(*), extract(epoch FROM min(recorded_at))::float8 FROM "
            f"(SELECT recorded_at FROM {s}.{t} WHERE position > $1 ORDER BY position "
            "LIMIT $2) b"
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

    @property
    def commit_timeout(self) -> float:
        """Seconds a commit waits for COMMIT's reply before the connection is ended and the
        outcome reported unknown (see :meth:`open`); a wrapper committing this log's events
        on a connection of its own bounds its COMMIT with it too."""
        return self._commit_timeout

    def append_statement(self, uow: UnitOfWork) -> tuple[str, list[list[Any]], list[PendingRow]]:
        """The statement that appends ``uow``'s events on a connection of the caller's,
        which must be inside the transaction that commits them and have run
        :attr:`appender_lock_sql` first (``cqrskit.sqlalchemy`` sends it through the ORM
        session's connection).

        Returns ``(sql, arguments, rows)``: one ``INSERT ... RETURNING position, stream,
        version`` in asyncpg's ``$n`` style with positions in commit order and the
        stream-version checks of every commit; its ten array arguments; and the events,
        encoded with :attr:`encoder`, in the order of the returned rows. An error the
        statement raises becomes cqrskit's through :meth:`translate_error`.
        """
        rows = uow.pending_rows(self._encode)
        return self._sql_insert_returning, self._columns(rows), rows

    # -- lifecycle -----------------------------------------------------------------------

    @staticmethod
    def _check_commit_timeout(seconds: object) -> float:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 < seconds < math.inf  # also refuses NaN
        ):
            raise ConfigurationError(
                f"commit_timeout must be a finite number of seconds > 0, got {seconds!r}.",
                hint="the default is 5 seconds; a COMMIT without a reply by then is ended "
                "and reported as CommitOutcomeUnknownError.",
            )
        return float(seconds)

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
        commit_timeout: float = 5.0,
        acquire_timeout: float = 10.0,
    ) -> PostgresEventStore:
        """Connect a pool to ``dsn`` and prepare (or check) the tables.

        Args:
            dsn: a libpq connection string or URL (``postgresql://user@host/db``).
            schema: the schema holding the event log (default ``"public"``; validated,
                quoted).
            table: the event-log table name (default ``"cqrskit_events"``).
            create_tables: create the schema's tables when missing (default ``True``);
                with ``False`` they must exist (print the DDL with ``cqrskit ddl
                postgres``) and a missing table is a :class:`ConfigurationError`.
            notify: send ``NOTIFY`` after commits (default ``False``; see the class).
            min_size: connections the read pool keeps open (default 1).
            max_size: the most connections of each of the store's two pools (default 10):
                the read pool (reads of the log, status queries) and the write
                connections (one per command in its transaction). A command that finds
                every write connection busy waits for one, at most ``acquire_timeout``;
                plan for up to twice this many server connections per process (plus one
                while listening for notifications, and one sending them).
            encoder: how events become rows (default: JSON).
            commit_timeout: seconds to wait for the reply to a COMMIT. A reply that does
                not come by then (a frozen server, a black-holed link, a synchronous
                standby that is down) ends the connection, which is discarded, and the
                command fails with :class:`~cqrskit.errors.CommitOutcomeUnknownError`: it
                may have committed (a retry with the same idempotency key has one
                effect). Set it above the slowest commit you expect. It also bounds the
                other round trips the store sends by itself (BEGIN, the ROLLBACK of a
                failed command, the close of a connection whose statement was
                interrupted): a server that stops answering never hangs a command.
            begin_ahead: seconds a write connection may wait, idle, inside the next
                command's transaction. Each commit is sent as ``COMMIT; BEGIN`` so that
                the next command on that connection starts with no BEGIN round trip; a
                connection idle longer than this is rolled back in the background. The
                empty transaction holds no xid and no snapshot. What changes for handlers:
                ``now()`` (the transaction's start) may be up to this much older than the
                command; use ``statement_timestamp()`` or ``clock_timestamp()`` for the
                exact time. ``0`` sends BEGIN with every command instead.
            acquire_timeout: seconds a command waits for a free write connection when all
                ``max_size`` are busy (default 10). Past it the command fails with
                :class:`~cqrskit.errors.UnavailableError` (the pool is exhausted, nothing
                was written; ``cqrskit.fastapi`` answers 503 with ``Retry-After``).

        Raises:
            ConfigurationError: bad names, a negative ``begin_ahead``, a ``commit_timeout``
                or ``acquire_timeout`` that is not a finite number > 0,
                ``standard_conforming_strings`` off, tables missing with
                ``create_tables=False``, or a schema version mismatch.
        """
        validate_identifier(schema, "schema name")
        validate_identifier(table, "table name")
        cls._check_commit_timeout(commit_timeout)
        if not (isinstance(acquire_timeout, int | float) and 0 < acquire_timeout < math.inf):
            raise ConfigurationError(
                f"acquire_timeout must be a finite number of seconds > 0, got {acquire_timeout!r}.",
                hint="the default is 10: how long a command waits for a free write "
                "connection before it fails with UnavailableError.",
            )
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
        store = cls(
            pool,
            schema=schema,
            table=table,
            notify=notify,
            encoder=encoder,
            commit_timeout=commit_timeout,
        )
        store.dsn = dsn
        if notify:
            # the NOTIFY goes out after the commit, on a connection of its own: inside the
            # transaction it would make every notifying commit wait for the one before
            store._notifier = Notifier(
                dsn, validate_identifier(store.channel, "channel"), commit_timeout
            )
            store._sql_commit = "COMMIT"
        store._writers = _WriteConnections(
            dsn,
            max_size,
            begin_ahead,
            store._setup_writer,
            bound=commit_timeout,
            acquire_timeout=float(acquire_timeout),
        )
        if begin_ahead > 0:
            store._sql_commit += "; " + store._sql_begin
            store._sql_end += "; " + store._sql_begin
            store._sql_rollback += "; " + store._sql_begin
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
        self._closed = True
        self._commit_clock.close()
        if self._writers is not None:
            await self._writers.close()
        if self._notifier is not None:
            await self._notifier.close()
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
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
        # has run yet, so the command takes another one. A connection found dead before
        # anything was sent on it (closed, or refusing the statement unsent) is simply
        # dropped; a BEGIN lost on the wire is retried once on a fresh connection.
        writers = self._writers
        if writers is not None:
            conn = writers.take()
            if conn is not None:
                return PostgresUnitOfWork(self, metadata, conn, positions)
        lost = 0
        for _ in range(100):  # each pass drops one dead connection; fresh ones are not begun
            conn, begun = await self._acquire_writer()
            if begun:
                # A connection that died while idle (server restart, idle timeout) must be
                # seen closed here, not fail mid-command. If anything arrived on its socket
                # that the event loop has not handed to asyncpg yet (the server's goodbye,
                # the end of the stream), a few passes of the loop let asyncpg read it and
                # close (the pass that sees the socket ready runs its reader after this
                # task; the close comes a pass later; three for a server's goodbye). With
                # nothing pending there is nothing to wait for: no pass at all.
                quiet = None if writers is None else writers.quiet(conn)
                if quiet:
                    return PostgresUnitOfWork(self, metadata, conn, positions)
                try:
                    # without a poll (another platform) one pass, as a best effort
                    for _ in range(1 if quiet is None else 8):
                        await asyncio.sleep(0)
                        if conn.is_closed() or (writers is not None and writers.quiet(conn)):
                            break
                except BaseException:
                    await self._release(conn)
                    raise
                if not conn.is_closed():
                    return PostgresUnitOfWork(self, metadata, conn, positions)
                await self._release(conn, broken=True)
                continue
            try:
                # a begun-ahead transaction that waited too long starts afresh (now())
                sql = self._sql_begin
                await conn.execute(
                    f"ROLLBACK; {sql}" if conn.is_in_transaction() else sql,
                    timeout=self._commit_timeout,  # a server that stopped answering
                )
            except Exception as exc:
                await self._release(conn, broken=True)
                if not _lost(exc, conn):
                    raise
                if not _unsent(exc):
                    lost += 1
                if lost == 2:
                    what = (
                        f"no reply to BEGIN within {self._commit_timeout:g} s"
                        if isinstance(exc, TimeoutError)
                        else f"the connection to PostgreSQL was lost ({exc})"
                    )
                    raise ConnectionLostError(
                        f"cannot start a transaction: {what}; nothing was written.",
                        hint="check that the server is up; the command can be retried.",
                    ) from exc
                continue
            except BaseException:
                await self._release(conn, broken=True)
                raise
            return PostgresUnitOfWork(self, metadata, conn, positions)
        raise ConnectionLostError(  # pragma: no cover - 100 dead connections in a row
            "cannot start a transaction: every PostgreSQL connection tried was dead; nothing "
            "was written.",
            hint="check that the server is up; the command can be retried.",
        )

    async def _acquire_writer(self) -> tuple[Any, bool]:
        try:
            writers = self._writers
            if writers is None:
                return await self.pool.acquire(), False
            for _ in range(100):
                try:
                    return await writers.acquire()
                except _Retry:
                    continue
        except (*_CONNECTION_LOST, TimeoutError, asyncpg.CannotConnectNowError) as exc:
            raise ConnectionLostError(
                f"cannot connect to PostgreSQL ({exc}); nothing was written.",
                hint="check that the server is up; the command can be retried.",
            ) from exc
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

    async def _retire(self, conn: Any) -> None:
        """Give up a connection whose statement was interrupted (never reused)."""
        if self._writers is not None:
            self._writers.retire(conn)
            return
        await self._release(conn, broken=True)

    _columns = staticmethod(columns)
    _render_insert = render_insert  # hot path: a method, not a call through one
    translate_error = translate_error

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

    # -- read side -----------------------------------------------------------------------

    @staticmethod
    def _event(r: Any, i: int = 0) -> StoredEvent:
        return StoredEvent(
            r[i],
            r[i + 1],
            r[i + 2],
            r[i + 3],
            r[i + 4],
            r[i + 5],
            {
                "message_id": r[i + 6],
                "correlation_id": r[i + 7],
                "causation_id": r[i + 8],
                "timestamp": r[i + 9].isoformat(),
            },
        )

    def idempotency_backend(self, table: str, wait_timeout: float) -> IdempotencyBackend:
        """Rows in ``table`` of this store's schema, claimed in the command's transaction."""
        from cqrskit.postgres.idempotency import PostgresIdempotencyBackend

        return PostgresIdempotencyBackend(self, table, wait_timeout)

    def _learn(self, used: int, proven: int, server: datetime) -> bool:
        """Keep the highest horizon proven by the current server; whether reading again
        may return more."""
        if server != self._server:
            self._server, self._proven = server, proven
        elif proven > self._proven:
            self._proven = proven
        return proven > used

    async def read_after(self, position: int, limit: int = 1000) -> list[StoredEvent]:
        """See :meth:`EventStore.read_after`: stops below the readable horizon (see the
        module docstring). One round trip; a second one when this read proved a higher
        horizon than it could use and returned less than ``limit`` events."""
        out: list[StoredEvent] = []
        unordered = False
        async with self.pool.acquire() as conn:
            for _ in range(2):
                rows = await conn.fetch(
                    self._sql_after, position, limit, self._proven, self._server
                )
                event = self._event
                for r in rows:
                    at = r[3]
                    if at is None:  # the LEFT JOIN's one row when there is no event
                        break
                    if at > position:
                        position = at
                    else:  # pragma: no cover - the lateral join keeps the index order
                        unordered = True
                    out.append(event(r, 3))
                first = rows[0]
                if not self._learn(first[0], first[1], first[2]) or len(out) >= limit:
                    break
                limit -= len(out)
        if unordered:  # pragma: no cover
            out.sort(key=_by_position)
        return out

    async def head(self) -> int:
        """See :meth:`EventStore.head` (the highest position below the horizon)."""
        async with self.pool.acquire() as conn:
            for _ in range(2):
                used, proven, server, head = await conn.fetchrow(
                    self._sql_head, self._proven, self._server
                )
                if not self._learn(used, proven, server):
                    break
        return int(head)

    async def last_position(self) -> int:
        """See :meth:`EventStore.last_position` (no horizon)."""
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval(self._sql_last))

    async def backlog(self, position: int, limit: int) -> tuple[int, float | None]:
        """See :meth:`EventStore.backlog`: committed events, readable or not."""
        async with self.pool.acquire() as conn:
            count, oldest = await conn.fetchrow(self._sql_backlog, position, limit)
        return int(count), oldest

    async def appenders(self) -> list[Appender]:
        """The transactions that may still append to this log and hold an xid, oldest
        first: each holds readers back at its xid until it ends (see the module
        docstring). Idle ``begin_ahead`` transactions have no xid and are not listed; nor
        is a prepared (two-phase) transaction, which has no session (``pg_prepared_xacts``
        shows it)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(self._sql_appenders)
        return [Appender(int(r[0]), int(r[1]), r[2], r[3]) for r in rows]

    async def oldest_appender(self) -> Appender | None:
        """See :meth:`EventStore.oldest_appender`: the first of :meth:`appenders`."""
        found = await self.appenders()
        return found[0] if found else None

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
        """See :meth:`EventStore.wait_for`: also wakes on NOTIFY from other processes.

        Raises:
            PersistenceError: the store was closed (a listener opened now would never be).
        """
        if self._closed:
            raise PersistenceError(
                "wait_for() on a closed PostgresEventStore.",
                hint="stop the readers (projectors, relays) before closing the store.",
            )
        if self._notify and self.dsn is not None:
            if self._listener is None:
                self._listener = Listener(
                    self.dsn, self.channel, self._on_notify, self._commit_timeout
                )
            await self._listener.ready()
        return await super().wait_for(position, timeout)

    def _on_notify(self, *args: Any) -> None:
        self._wake()
