"""SQLite driver: the embedded default event log and unit of work (stdlib ``sqlite3``).

Every ``sqlite3`` call runs directly on the event-loop thread: a statement on a local file
takes microseconds, and a thread hop per statement (the aiosqlite way) costs several times
more than the statement. A transaction holds the store's write lock from ``begin`` to
``commit``/``rollback`` (SQLite has one writer anyway), so concurrent commands in one process
queue on it, first come first served, instead of on SQLite's busy handler. It is a small FIFO
lock of its own (:class:`_WriteLock`), not an ``asyncio.Lock``: taking it free is a flag test
in ``begin``, without a coroutine.

Commit order: SQLite serializes writers (``BEGIN IMMEDIATE`` takes the write lock up
front), and ``position`` is an ``INTEGER PRIMARY KEY`` assigned inside that exclusive
section (the highest position plus one), so positions are allocated in commit order and a
reader never sees a higher position before a lower one commits.

Positions are never reused: SQLite would hand out the position of a deleted newest row
again, so a trigger refuses deleting the newest event and another refuses changing a
position. (Layout version 1 used ``AUTOINCREMENT`` for this, which costs a write to
``sqlite_sequence`` — one more page in the WAL — in every commit; tables of version 1 keep
working unchanged.)
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cqrskit._encoding import Encoded, Encoder
from cqrskit.errors import (
    ConcurrencyError,
    ConfigurationError,
    PersistenceError,
    UnavailableError,
)
from cqrskit.eventlog import (
    EventStore,
    StoredEvent,
    UnitOfWork,
    validate_identifier,
)
from cqrskit.messages import Metadata
from cqrskit.sqlite._checkpoint import _SYNC_LEVELS, WRITER_AUTOCHECKPOINT, WalCheckpointer

if TYPE_CHECKING:
    from cqrskit.idempotency import IdempotencyBackend

__all__ = ["SCHEMA_VERSION", "SqliteEventStore", "SqliteUnitOfWork", "sqlite_ddl"]

_log = logging.getLogger("cqrskit.sqlite")

SCHEMA_VERSION = 2
"""Version of the event-log table layout this module creates (version 1 tables, with
``AUTOINCREMENT``, are still read and written)."""
_KNOWN_VERSIONS = (1, 2)

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


def sqlite_ddl(table: str = "cqrskit_events") -> str:
    """The DDL that creates the event log ``table`` (for users who run their own migrations).

    Raises:
        ConfigurationError: ``table`` is not a valid identifier.
    """
    t = validate_identifier(table, "table name")
    idx = validate_identifier(f"{table}_stream_version"[:63], "index name")
    keep = validate_identifier(f"{table}_keep_newest"[:63], "trigger name")
    fixed = validate_identifier(f"{table}_fixed_position"[:63], "trigger name")
    return (
        f"CREATE TABLE IF NOT EXISTS {t} (\n"
        "    position INTEGER PRIMARY KEY,\n"
        "    stream TEXT NOT NULL,\n"
        "    version INTEGER NOT NULL,\n"
        "    type TEXT NOT NULL,\n"
        "    schema_version INTEGER NOT NULL,\n"
        "    data TEXT NOT NULL,\n"
        "    message_id TEXT NOT NULL,\n"
        "    correlation_id TEXT,\n"
        "    causation_id TEXT,\n"
        "    recorded_at TEXT NOT NULL\n"
        ");\n"
        f"CREATE UNIQUE INDEX IF NOT EXISTS {idx} ON {t} (stream, version);\n"
        # the next position is the highest plus one: the newest row stays, positions stay
        f"CREATE TRIGGER IF NOT EXISTS {keep} BEFORE DELETE ON {t}\n"
        f"WHEN old.position >= (SELECT max(position) FROM {t})\n"
        "BEGIN SELECT RAISE(ABORT, 'cqrskit: the newest event cannot be deleted, "
        "its position would be handed out again'); END;\n"
        f"CREATE TRIGGER IF NOT EXISTS {fixed} BEFORE UPDATE OF position ON {t}\n"
        "BEGIN SELECT RAISE(ABORT, 'cqrskit: event positions never change'); END;\n"
        'CREATE TABLE IF NOT EXISTS "cqrskit_schema" (\n'
        "    name TEXT PRIMARY KEY,\n"
        "    version INTEGER NOT NULL\n"
        ");\n"
        f"INSERT OR IGNORE INTO \"cqrskit_schema\" (name, version) VALUES ('{table}', "
        f"{SCHEMA_VERSION});\n"
    )


class _WriteLock:
    """The store's in-process write lock: first come, first served, like ``asyncio.Lock``,
    with the uncontended path a flag test in :meth:`SqliteEventStore.begin` instead of a
    coroutine (a command takes and releases it once)."""

    __slots__ = ("held", "_waiters")

    def __init__(self) -> None:
        self.held = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Wait until the lock is handed over (the caller saw it held)."""
        if not self.held:
            self.held = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # handed over, then cancelled: pass it on
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Hand the lock to the next live waiter, or free it."""
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # still held: now by that waiter
                return
        self.held = False


class SqliteUnitOfWork(UnitOfWork):
    """One command's SQLite transaction.

    Attributes:
        connection: the write connection, inside ``BEGIN IMMEDIATE``; change state with
            ordinary synchronous ``sqlite3`` calls (``uow.connection.execute(...)``).
    """

    __slots__ = ("connection",)

    store: SqliteEventStore

    def __init__(
        self, store: SqliteEventStore, metadata: Metadata | None, connection: sqlite3.Connection
    ) -> None:
        # UnitOfWork.__init__ written out: a call of it per command costs a frame (its
        # fields are checked to match by tests/unit/test_write_path_shortcuts.py)
        self.store = store
        self.metadata = metadata
        self._events = []
        self._base = {}
        self._count = {}
        self._active = True
        self._failed_nested = None
        self.connection = connection

    async def commit(self) -> int | None:
        """See :meth:`UnitOfWork.commit`."""
        store = self.store
        try:
            stored = store._append(store._cursor, self) if self._events else None
            if stored is not None and store._hooks:
                events = store._stored(stored)
                for hook in store._hooks:
                    await hook(self, events)
            store._cursor.execute("COMMIT")
        except BaseException:
            self._finish_rollback()
            raise
        self._active = False
        lock = store._write_lock
        if lock._waiters:
            lock.release()
        else:  # nobody waits: release() would only clear the flag
            lock.held = False
        left = store._until_checkpoint - 1  # store._count_commit(), inline (a frame less)
        if left:
            store._until_checkpoint = left
        else:
            store._checkpoint()
        if stored is None:
            return None
        if store._waiters:
            store._wake()
        return stored[-1][0]

    async def rollback(self) -> None:
        """See :meth:`UnitOfWork.rollback`."""
        self._finish_rollback()

    def _finish_rollback(self) -> None:
        if not self._active:
            return
        self._close()
        try:
            if self.connection.in_transaction:
                self.connection.execute("ROLLBACK")
        finally:
            self.store._release()


# position, stream, version, encoded event, the INSERT's values (metadata at 4..7)
_Row = tuple[int, str, int, Encoded, tuple[Any, ...]]


class SqliteEventStore(EventStore):
    """The SQLite event log and unit-of-work factory.

    Args:
        path: the database file (``":memory:"`` is refused: the reader needs its own
            connection to the same database).
        table: the event-log table name (validated, quoted).
        synchronous: ``"NORMAL"`` (default; with WAL, a power loss may drop the last
            commits but never corrupts) or ``"FULL"`` (every commit durable).
        create_tables: create the tables when missing (else they must exist; print the DDL
            with :func:`sqlite_ddl`).
        lock_timeout: seconds to wait for another process's write transaction.
        encoder: how events become rows (default: JSON).
        background_checkpoints: copy the WAL into the database file on a thread of the
            store's own (a passive checkpoint every 256 commits, which blocks no reader or
            writer; at 3,000 pages the next command awaits, without blocking the event
            loop, while the thread starts the WAL over), so that checkpoints' ``fsync``
            calls no longer stall the event loop in the commit that fills the WAL. The
            write connection checkpoints by itself only when the WAL reaches 6,000 pages
            (~24 MB; a soft bound, like SQLite's own). ``False``: SQLite's default, the
            committing connection checkpoints at 1,000 pages.
    """

    unit_of_work_type = SqliteUnitOfWork
    _commit_holds_cancellation = False  # COMMIT is a synchronous call

    def __init__(
        self,
        path: str | Path,
        *,
        table: str = "cqrskit_events",
        synchronous: Synchronous = "NORMAL",
        create_tables: bool = True,
        lock_timeout: float = 5.0,
        encoder: Encoder | None = None,
        background_checkpoints: bool = True,
    ) -> None:
        super().__init__(encoder=encoder)
        if sqlite3.sqlite_version_info < (3, 35):
            raise ConfigurationError(
                f"SqliteEventStore needs SQLite 3.35 or newer; this Python has "
                f"{sqlite3.sqlite_version}.",
                hint="use a Python build linked against a newer SQLite.",
            )
        if str(path) in ("", ":memory:") or str(path).startswith("file::memory:"):
            raise ConfigurationError(
                "SqliteEventStore needs a database file, not an in-memory database.",
                hint="pass a file path (a temporary file in tests), or use InMemoryEventStore.",
            )
        if synchronous not in _SYNC_LEVELS:
            raise ConfigurationError(
                f"synchronous must be one of {sorted(_SYNC_LEVELS)}, got {synchronous!r}."
            )
        self.path = str(path)
        self.table = table
        self._t = validate_identifier(table, "table name")
        self._synchronous = synchronous
        self._lock_timeout = lock_timeout
        self._write_lock = _WriteLock()
        self._writer = self._connect(busy_ms=0)
        try:
            # the store's own statements (BEGIN, the event INSERT, COMMIT) run on one
            # cursor: Connection.execute makes a cursor per call (~1.3k instructions each)
            self._cursor = self._writer.cursor()
            self._reader = self._connect(busy_ms=int(lock_timeout * 1000))
        except BaseException:
            self._writer.close()
            raise
        try:
            wal = self._check_durability(self._writer)
            self._prepare_tables(create_tables)
            self._checkpointer: WalCheckpointer | None = None
            # commits left until the next background checkpoint (never 0 without one)
            self._until_checkpoint = -1
            if background_checkpoints and wal:
                self._writer.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT}")
                self._checkpointer = WalCheckpointer(
                    self.path,
                    synchronous=synchronous,
                    busy_ms=int(lock_timeout * 1000),
                )
                self._until_checkpoint = self._checkpointer.every
                # a store dropped without close() does not leave the thread behind
                weakref.finalize(self, self._checkpointer.stop)
        except BaseException:  # a refused store leaves no connection open
            self._reader.close()
            self._writer.close()
            raise
        t = self._t
        insert = (
            f"INSERT INTO {t} (stream, version, type, schema_version, data, message_id, "
            "correlation_id, causation_id, recorded_at) "
        )
        # plain "?" placeholders only: Python 3.12.0-3.12.3 take "?1" for a named
        # placeholder and warn (DeprecationWarning) when it is bound from a sequence
        # (CPython gh-117995); the stream is bound a second time instead
        self._sql_insert_next = (
            insert + "SELECT ?, coalesce(max(version), 0) + 1, ?, ?, ?, ?, ?, ?, ? "
            f"FROM {t} WHERE stream = ? RETURNING position, version"
        )
        self._sql_insert_first = insert + "VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)"
        # the row of version `expected`, if the stream has one, gives the new version
        self._sql_insert_after = (
            insert + "SELECT ?, version + 1, ?, ?, ?, ?, ?, ?, ? "
            f"FROM {t} WHERE stream = ? AND version = ?"
        )
        self._sql_version = f"SELECT coalesce(max(version), 0) FROM {t} WHERE stream = ?"
        cols = (
            "position, stream, version, type, schema_version, data, message_id, "
            "correlation_id, causation_id, recorded_at"
        )
        self._sql_after = f"SELECT {cols} FROM {t} WHERE position > ? ORDER BY position LIMIT ?"
        self._sql_stream = (
            f"SELECT {cols} FROM {t} WHERE stream = ? AND version > ? ORDER BY version"
        )
        self._sql_head = f"SELECT coalesce(max(position), 0) FROM {t}"

    # -- connections ---------------------------------------------------------------------

    def _connect(self, busy_ms: int) -> sqlite3.Connection:
        """Open a connection; ``busy_ms`` is its busy timeout once set up.

        Setting up waits up to ``lock_timeout`` for other connections (the writer's own
        busy timeout of 0 would fail at once while another process recovers the WAL of a
        crashed one), and SQLITE_BUSY seen without the busy handler (recovery) is retried
        with a bounded back-off.
        """
        deadline = time.monotonic() + self._lock_timeout
        delay = 0.005
        while True:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self._lock_timeout * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
                return conn
            except sqlite3.OperationalError as exc:
                conn.close()
                text = str(exc)
                if "locked" not in text and "busy" not in text:
                    raise
                if time.monotonic() >= deadline:
                    raise PersistenceError(
                        f"could not open {self.path}: {text} for more than {self._lock_timeout} s.",
                        hint="another process holds the database; raise lock_timeout.",
                    ) from exc
            time.sleep(delay)  # in the constructor, before any event loop work
            delay = min(delay * 2, 0.1)

    def _check_durability(self, conn: sqlite3.Connection) -> bool:
        """Warn when the journal mode or synchronous setting did not take; return whether
        the database runs in WAL mode."""
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        sync = conn.execute("PRAGMA synchronous").fetchone()[0]
        if str(mode).lower() != "wal":
            _log.warning(
                "SQLite database %s runs in journal_mode=%s, not WAL as configured: readers "
                "will block the writer and commits are slower.",
                self.path,
                mode,
            )
        if sync != _SYNC_LEVELS[self._synchronous]:
            _log.warning(
                "SQLite database %s runs with synchronous=%s, not %s as configured.",
                self.path,
                sync,
                self._synchronous,
            )
        return str(mode).lower() == "wal"

    def _prepare_tables(self, create: bool) -> None:
        conn = self._writer
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (self.table,)
        ).fetchone()
        if exists is None:
            if not create:
                raise ConfigurationError(
                    f"the event log table {self.table!r} does not exist in {self.path}.",
                    hint="pass create_tables=True, or run the DDL from "
                    "cqrskit.sqlite.sqlite_ddl() in your migrations.",
                )
            conn.executescript("BEGIN IMMEDIATE;\n" + sqlite_ddl(self.table) + "COMMIT;")
        row = conn.execute(
            'SELECT version FROM "cqrskit_schema" WHERE name = ?', (self.table,)
        ).fetchone()
        if row is None or row[0] not in _KNOWN_VERSIONS:
            found = "no version row" if row is None else f"version {row[0]}"
            raise ConfigurationError(
                f"event log table {self.table!r} has {found}; this cqrskit writes versions "
                f"{', '.join(map(str, _KNOWN_VERSIONS))}.",
                hint="run the DDL from cqrskit.sqlite.sqlite_ddl(), or upgrade cqrskit.",
            )

    @property
    def checkpointer(self) -> WalCheckpointer | None:
        """The background WAL checkpointer (its counters tell how it fares), or ``None``
        when the store was opened with ``background_checkpoints=False`` or the database
        does not run in WAL mode."""
        return self._checkpointer

    def _count_commit(self) -> None:
        """Count a commit; every ``checkpointer.every`` commits, poke the checkpointer."""
        left = self._until_checkpoint - 1
        if left:
            self._until_checkpoint = left
        else:
            self._checkpoint()

    def _checkpoint(self) -> None:
        checkpointer = self._checkpointer
        if checkpointer is not None:
            self._until_checkpoint = checkpointer.every
            checkpointer.poke()

    def close(self) -> None:
        """Stop the checkpoint thread and close both connections (an open unit of work
        is rolled back by SQLite)."""
        try:
            if self._checkpointer is not None:
                self._checkpointer.close()
        finally:
            self._writer.close()
            self._reader.close()

    @asynccontextmanager
    async def write_connection(self) -> AsyncIterator[sqlite3.Connection]:
        """The write connection for your own statements outside a command — creating your
        tables, a data fix, a script — inside one ``BEGIN IMMEDIATE`` transaction.

        Commands wait while the block runs (it holds the store's write lock); the block's
        statements commit when it exits and roll back if it raises. Use ``execute``
        (``executescript`` commits on its own and is refused by SQLite inside a
        transaction)::

            async with store.write_connection() as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS accounts (id TEXT PRIMARY KEY)")
        """
        await self._write_lock.acquire()
        conn = self._writer
        try:
            checkpointer = self._checkpointer
            if checkpointer is not None and checkpointer.pause is not None:
                await checkpointer.park()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                await self._begin_immediate()
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            self._write_lock.release()
        self._count_commit()

    # -- write side ----------------------------------------------------------------------

    async def begin(
        self, metadata: Metadata | None = None, *, positions: bool = True
    ) -> SqliteUnitOfWork:
        """See :meth:`EventStore.begin`; waits for the in-process write lock first."""
        lock = self._write_lock
        if lock.held or lock._waiters:
            await lock.acquire()
        else:
            lock.held = True
        try:
            checkpointer = self._checkpointer
            if checkpointer is not None and checkpointer.pause is not None:
                await checkpointer.park()  # the WAL starts over meanwhile
            try:
                self._cursor.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                await self._begin_immediate()
        except BaseException:
            self._write_lock.release()
            raise
        return SqliteUnitOfWork(self, metadata, self._writer)

    async def _begin_immediate(self) -> None:
        """Retry ``BEGIN IMMEDIATE`` while another process holds the write lock."""
        conn = self._writer
        deadline = time.monotonic() + self._lock_timeout
        delay = 0.001
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise PersistenceError(f"BEGIN IMMEDIATE failed: {exc}") from exc
                if time.monotonic() >= deadline:
                    raise UnavailableError(
                        f"another process holds the write lock on {self.path} for more than "
                        f"{self._lock_timeout} s.",
                        hint="raise lock_timeout, or keep write transactions short.",
                    ) from exc
            # another process is writing: back off without blocking the event loop
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _release(self) -> None:
        self._write_lock.release()

    def append_through(self, connection: sqlite3.Connection, uow: UnitOfWork) -> int:
        """Insert ``uow``'s events through ``connection``, a connection of the caller's to
        this store's file inside the write transaction that commits them (the one a
        ``sqlalchemy.orm.Session`` holds after its flush, say); return the last event's
        position. The same INSERT the store's own commits run, positions allocated under
        SQLite's write lock, hence in commit order; events encoded with :attr:`encoder`.

        Raises:
            ConcurrencyError: a stream is not at the version the unit of work expected.
        """
        return self._append(connection, uow)[-1][0]

    def _append(self, db: sqlite3.Cursor | sqlite3.Connection, uow: UnitOfWork) -> list[_Row]:
        # UnitOfWork.pending_rows without its per-row objects: the row values go straight
        # into the INSERT; metadata dicts are built only for inline hooks (_stored). `db`:
        # the store's cursor, or a connection (SyncSqlAlchemyStore's session's)
        md = uow.metadata
        prefix, correlation, causation, timestamp = (
            uow._lineage() if md is None else md._event_lineage()
        )
        encode = self._encode
        bases = uow._base
        events = uow._events
        if len(events) == 1:  # the commonest command: no per-stream counting
            stream, event = events[0]
            enc = encode(event)
            values: tuple[Any, ...] = (
                stream,
                enc.type,
                enc.schema_version,
                enc.data,
                prefix + "-0",
                correlation,
                causation,
                timestamp,
            )
            expected = bases.get(stream)
            if expected == 0:  # a new stream, the commonest case: _insert's first branch
                try:
                    cur = db.execute(self._sql_insert_first, values)
                except sqlite3.IntegrityError as exc:
                    raise self._conflict(db, stream, 0) from exc
                position = cur.lastrowid
                assert position is not None
                return [(position, stream, 1, enc, values)]
            return [self._insert(db, stream, expected, enc, values)]
        seen: dict[str, int] = {}
        out: list[_Row] = []
        for n, (stream, event) in enumerate(events):
            i = seen.get(stream, 0)
            seen[stream] = i + 1
            base = bases.get(stream)
            enc = encode(event)
            values = (
                stream,
                enc.type,
                enc.schema_version,
                enc.data,
                f"{prefix}-{n}",
                correlation,
                causation,
                timestamp,
            )
            out.append(self._insert(db, stream, None if base is None else base + i, enc, values))
        return out

    def _insert(
        self,
        db: sqlite3.Cursor | sqlite3.Connection,
        stream: str,
        expected: int | None,
        enc: Encoded,
        values: tuple[Any, ...],
    ) -> _Row:
        """INSERT one event row (``values``: the row but its version) at ``expected + 1``,
        or after the stream's last version when ``expected`` is ``None``."""
        try:
            if expected is None:
                got = db.execute(self._sql_insert_next, (*values, stream)).fetchone()
                if got is None:  # pragma: no cover - the HAVING clause always holds
                    raise self._conflict(db, stream, expected)
                position, version = got
            else:
                # versions are contiguous, so "version `expected` exists and version
                # `expected + 1` does not" (the unique index) means "stream is at
                # `expected`"; a plain INSERT costs less than a max() aggregate
                if expected == 0:  # a new stream: the commonest case
                    cur = db.execute(self._sql_insert_first, values)
                else:
                    cur = db.execute(self._sql_insert_after, (*values, stream, expected))
                if cur.rowcount != 1:
                    raise self._conflict(db, stream, expected)
                position, version = cur.lastrowid, expected + 1
        except sqlite3.IntegrityError as exc:
            raise self._conflict(db, stream, expected) from exc
        assert position is not None
        return (position, stream, version, enc, values)

    def _conflict(
        self, db: sqlite3.Cursor | sqlite3.Connection, stream: str, expected: int | None
    ) -> ConcurrencyError:
        actual = db.execute(self._sql_version, (stream,)).fetchone()[0]
        return ConcurrencyError(
            f"stream {stream!r} is at version {actual}, expected {expected}.",
            stream=stream,
            expected_version=expected,
            actual_version=actual,
            hint="reload the stream and retry the command.",
        )

    @staticmethod
    def _stored(rows: list[_Row]) -> list[StoredEvent]:
        return [
            StoredEvent(
                pos,
                stream,
                version,
                enc.type,
                enc.schema_version,
                enc.data,
                {
                    "message_id": values[4],
                    "correlation_id": values[5],
                    "causation_id": values[6],
                    "timestamp": values[7],
                },
            )
            for pos, stream, version, enc, values in rows
        ]

    # -- read side -----------------------------------------------------------------------

    @staticmethod
    def _event(r: tuple[Any, ...]) -> StoredEvent:
        return StoredEvent(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            {"message_id": r[6], "correlation_id": r[7], "causation_id": r[8], "timestamp": r[9]},
        )

    def idempotency_backend(self, table: str, wait_timeout: float) -> IdempotencyBackend:
        """Rows in ``table`` of this database, written in the command's transaction."""
        from cqrskit.sqlite.idempotency import SqliteIdempotencyBackend

        return SqliteIdempotencyBackend(self, table)

    async def read_after(self, position: int, limit: int = 1000) -> list[StoredEvent]:
        """See :meth:`EventStore.read_after` (reads on a separate connection)."""
        rows = self._reader.execute(self._sql_after, (position, limit)).fetchall()
        return [self._event(r) for r in rows]

    async def head(self) -> int:
        """See :meth:`EventStore.head`."""
        return int(self._reader.execute(self._sql_head).fetchone()[0])

    async def read_stream(self, stream: str, after_version: int = 0) -> list[StoredEvent]:
        """See :meth:`EventStore.read_stream`."""
        rows = self._reader.execute(self._sql_stream, (stream, after_version)).fetchall()
        return [self._event(r) for r in rows]
