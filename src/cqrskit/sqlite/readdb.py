"""SQLite read database: one writer connection for projectors, read-only ones for queries.

Connections run in autocommit mode with explicit ``BEGIN``; calls are synchronous (SQLite
is in-process and a thread hop per statement costs more than the statement), so keep
projection batches moderate to bound how long the event loop is held.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from cqrskit.projections.db import ReadDatabase, Row, Session

__all__ = ["SqliteReadDatabase", "SqliteSession"]


class SqliteSession(Session):
    """A :class:`Session` over a ``sqlite3.Connection``."""

    dialect = "sqlite"
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
    if read_only:
        conn.execute("PRAGMA query_only = ON")
    return conn


class SqliteReadDatabase(ReadDatabase):
    """A read database in a SQLite file (the write database's file or another one).

    Args:
        path: the database file.
        busy_timeout_ms: how long a statement waits for another writer's lock.
    """

    dialect = "sqlite"

    def __init__(self, path: str, *, busy_timeout_ms: int = 10_000) -> None:
        self.path = path
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

    def transaction(self) -> AbstractAsyncContextManager[Session]:
        """See :meth:`ReadDatabase.transaction` (``BEGIN IMMEDIATE`` on one shared writer)."""
        return self._transaction()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Session]:
        async with self._lock:
            conn = self._writer_conn()
            conn.execute("BEGIN IMMEDIATE")
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
