"""SQLite read database: one writer connection for projectors, read-only ones for queries.

Connections run in autocommit mode with explicit ``BEGIN``; calls are synchronous (SQLite
is in-process and a thread hop per statement costs more than the statement), so keep
projection batches moderate to bound how long the event loop is held.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from cqrskit.projections.db import ReadDatabase, Row, Session, SqlFlavor
from cqrskit.projections.schema import process_identity, process_state
from cqrskit.sqlite._checkpoint import WRITER_AUTOCHECKPOINT

__all__ = ["SqliteFlavor", "SqliteReadDatabase", "SqliteSession"]

log = logging.getLogger("cqrskit.projections")


class SqliteFlavor(SqlFlavor):
    """SQLite's spelling of the bookkeeping's SQL (see :class:`SqlFlavor`): no row locks
    (a write transaction, ``BEGIN IMMEDIATE``, holds the file's write lock), ``max`` for
    the larger of two values, no advisory locks, no idle-transaction setting."""

    __slots__ = ()

    greatest = "max"
    for_share = ""
    for_update = ""
    for_no_key_update = ""
    skip_locked = None
    batches_statements = False

    def advisory_lock(self, key: int) -> None:
        """See :meth:`SqlFlavor.advisory_lock`: none needed, the writer is alone."""

    def idle_limit(self, hold: float) -> None:
        """See :meth:`SqlFlavor.idle_limit`: SQLite has none (a stopped holder of the
        write lock is handled by :meth:`SqliteReadDatabase.end_frozen_writer`)."""


_FLAVOR = SqliteFlavor()


class SqliteSession(Session):
    """A :class:`Session` over a ``sqlite3.Connection``."""

    dialect = "sqlite"
    flavor = _FLAVOR
    __slots__ = ("_conn", "_sp")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._sp = 0

    @property
    def connection(self) -> sqlite3.Connection:
        """The ``sqlite3.Connection``."""
        return self._conn

    async def execute(self, sql: str, *params: Any) -> int:
        """See :meth:`Session.execute`."""
        return self._conn.execute(sql, params).rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """See :meth:`Session.executemany`."""
        rows = rows if isinstance(rows, list) else list(rows)
        try:
            self._conn.executemany(sql, rows)
        except sqlite3.ProgrammingError as exc:
            # sqlite3 refuses executemany for a statement that does not start with
            # INSERT/UPDATE/DELETE/REPLACE (e.g. a SELECT calling a function), before
            # running any row: run them one by one instead
            if "only execute DML" not in str(exc):
                raise
            for row in rows:
                self._conn.execute(sql, row)

    async def execute_all(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """See :meth:`Session.execute_all` (one call each, no coroutine per statement)."""
        execute = self._conn.execute
        for sql, params in statements:
            execute(sql, params)

    async def fetchall(self, sql: str, *params: Any) -> list[Row]:
        """See :meth:`Session.fetchall`."""
        return self._conn.execute(sql, params).fetchall()

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        """See :meth:`Session.fetchone`."""
        row: Row | None = self._conn.execute(sql, params).fetchone()
        return row

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """See :meth:`Session.savepoint`."""
        self._sp += 1
        name = f"cqrskit_sp{self._sp}"
        self._conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self._conn.execute(f"ROLLBACK TO {name}")
            self._conn.execute(f"RELEASE {name}")
            raise
        self._conn.execute(f"RELEASE {name}")


def _connect(path: str, *, read_only: bool, busy_timeout_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if not read_only and path != ":memory:":
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        if conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cqrskit_schema'"
        ).fetchone():
            # the event log's file: its store's write connection checkpoints at this WAL
            # size (its own thread more often); a projector writing here at SQLite's
            # default of 1,000 pages would run a checkpoint, fsyncs included, in most of
            # its commits. A read database in a file of its own keeps the default.
            conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT}")
    if read_only:
        conn.execute("PRAGMA query_only = ON")
    return conn


# SQLite's locking protocol (unix VFS): in WAL mode the writer holds a POSIX write lock on
# byte 120 of the "-shm" file (the first WAL-index lock byte); in rollback-journal mode a
# writer holds the RESERVED byte, PENDING_BYTE + 1, of the database file. The holder is
# read from /proc/locks (Linux): probing with fcntl(F_GETLK) would mean opening and closing
# the file here, and closing any descriptor of a file drops every POSIX lock this process
# holds on it — this process's own SQLite connections' locks included.
_LOCK_BYTES = (("-shm", 120), ("", 0x40000001))


def _write_lock_holder(path: str, locks: str = "/proc/locks") -> int | None:
    """The id of the process holding ``path``'s SQLite write lock, when it can be seen."""
    wanted: dict[tuple[int, int, int], int] = {}
    for suffix, offset in _LOCK_BYTES:
        try:
            st = os.stat(path + suffix)
        except OSError:
            continue
        wanted[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = offset
    try:
        with open(locks, encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        # "1: POSIX  ADVISORY  WRITE 22830 fe:00:2149979 120 120" ("->" marks waiters)
        if len(parts) != 8 or parts[1] != "POSIX" or parts[3] != "WRITE":
            continue
        try:
            major, minor, inode = parts[5].split(":")
            where = (int(major, 16), int(minor, 16), int(inode))
            first = int(parts[6])
            end = None if parts[7] == "EOF" else int(parts[7])
            pid = int(parts[4])
        except ValueError:
            continue
        byte = wanted.get(where)
        if byte is not None and first <= byte and (end is None or byte <= end):
            return pid
    return None


async def _begin_immediate(conn: sqlite3.Connection, timeout: float) -> None:
    """``BEGIN IMMEDIATE`` without blocking the event loop while another process holds the
    write lock: SQLite's own busy handler would sleep inside the (synchronous) call and
    freeze every other task of the process — a web application's requests too — for up to
    the busy timeout. So the lock is tried with no busy wait, and retried after short
    asyncio sleeps (SQLite offers no notification) until ``timeout`` seconds have passed;
    then the last ``database is locked`` error is raised."""
    deadline = time.monotonic() + max(0.0, timeout)
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        pause = 0.001
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, 0.05)
    finally:
        # statements inside the transaction hold the lock already; keep a short busy wait
        # for the rare cases that still need one (WAL recovery after a crash)
        conn.execute(f"PRAGMA busy_timeout = {max(0, round(min(timeout, 1.0) * 1000))}")


class SqliteReadDatabase(ReadDatabase):
    """A read database in a SQLite file (the write database's file or another one).

    Args:
        path: the database file.
        busy_timeout_ms: how long a statement waits for another writer's lock.
        end_stopped_holder: whether a projector standing by may end (SIGKILL) the process
            holding an expired projection lease when that process is *stopped* (SIGSTOP,
            state ``T`` in ``/proc``) while it holds this file's write lock — the one case
            in which nothing else ever frees the lock (default ``True``; see
            :meth:`end_frozen_writer`). With ``False`` the standby waits until the holder
            resumes or dies. A holder that runs (busy, a blocked event loop, another
            component of its application writing) is never ended: it frees the lock by
            itself and its lease is fenced.
    """

    dialect = "sqlite"
    flavor = _FLAVOR

    def __init__(
        self, path: str, *, busy_timeout_ms: int = 10_000, end_stopped_holder: bool = True
    ) -> None:
        self.path = path
        self.end_stopped_holder = end_stopped_holder
        self._busy = busy_timeout_ms
        self._writer: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._readers: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []

    def _writer_conn(self) -> sqlite3.Connection:
        if self._writer is None:
            self._writer = _connect(self.path, read_only=False, busy_timeout_ms=self._busy)
            self._all.append(self._writer)
        return self._writer

    def transaction(
        self, *, lock_timeout: float | None = None, hold: float | None = None
    ) -> AbstractAsyncContextManager[Session]:
        """See :meth:`ReadDatabase.transaction` (``BEGIN IMMEDIATE`` on one shared writer;
        ``lock_timeout`` is the busy timeout of this transaction's statements; ``hold`` is
        ignored: SQLite has no server to end a frozen holder's session)."""
        return self._transaction(lock_timeout)

    @asynccontextmanager
    async def _transaction(self, lock_timeout: float | None = None) -> AsyncIterator[Session]:
        async with self._lock:
            conn = self._writer_conn()
            await _begin_immediate(
                conn, self._busy / 1000 if lock_timeout is None else lock_timeout
            )
            try:
                yield SqliteSession(conn)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def read_only(self) -> AbstractAsyncContextManager[Session]:
        """See :meth:`ReadDatabase.read_only` (``PRAGMA query_only``: writes raise)."""
        return self._read_only()

    @asynccontextmanager
    async def _read_only(self) -> AsyncIterator[Session]:
        if self._readers:
            conn = self._readers.pop()
        else:
            conn = _connect(self.path, read_only=True, busy_timeout_ms=self._busy)
            self._all.append(conn)
        conn.execute("BEGIN")
        try:
            yield SqliteSession(conn)
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if len(self._readers) < 8:
                self._readers.append(conn)
            else:
                self._all.remove(conn)
                conn.close()

    async def end_frozen_writer(self, host: str, pid: int) -> bool:
        """See :meth:`ReadDatabase.end_frozen_writer`: SIGKILL process ``pid`` when, all at
        once, ``end_stopped_holder`` is on, ``host`` names that very process as this one
        sees it (same host, boot and pid namespace, same start time: not a later process
        reusing the pid, not one in another container), the kernel shows it *stopped*, and
        it holds this file's write lock (``/proc/locks``). Anything else (another platform
        included) does nothing and returns ``False``: the standby waits.

        The process is named by a pidfd opened before the checks (Linux 5.3+), so the
        signal cannot reach a process that took the pid over after them."""
        if not self.end_stopped_holder or pid == os.getpid() or pid <= 0:
            return False
        try:
            handle: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            handle = None  # gone, or no pidfds: the checks below still name the process
        try:
            state = process_state(pid)
            if state is None or state[0] != "T" or host != process_identity(pid):
                return False
            if _write_lock_holder(self.path) != pid:
                return False
            log.warning(
                "process %d holds the write lock of %s with an expired projection lease and "
                "is stopped: ending it (SIGKILL) so a standby can take over",
                pid,
                self.path,
            )
            try:
                if handle is not None:
                    signal.pidfd_send_signal(handle, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return False
            return True
        finally:
            if handle is not None:
                os.close(handle)

    def inline(self, connection: Any) -> Session:
        """See :meth:`ReadDatabase.inline`."""
        return SqliteSession(connection)

    async def close(self) -> None:
        """See :meth:`ReadDatabase.close`."""
        for conn in self._all:
            conn.close()
        self._all.clear()
        self._readers.clear()
        self._writer = None
