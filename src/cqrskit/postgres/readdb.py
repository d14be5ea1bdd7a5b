"""PostgreSQL read database on asyncpg: read models in a schema, READ ONLY query sessions.

Bookkeeping tables and read-model tables live in the given schema; statements written with
``?`` placeholders and unqualified bookkeeping names are rewritten once per distinct
statement (``$n`` placeholders, schema-qualified names). Query sessions run in
``BEGIN READ ONLY`` transactions with ``search_path`` set to the schema, so a query reads
the views by their plain names and any write fails with a PostgreSQL error.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from cqrskit.errors import MissingExtraError, UnavailableError
from cqrskit.projections.db import ReadDatabase, Row, Session, check_identifier

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("postgres", "asyncpg") from exc

__all__ = ["PostgresReadDatabase", "PostgresSession"]

_TOKENS = re.compile(
    r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?|\bcqrskit_(?:projections|checkpoints|dead_letters|lease_holders)\b"
)


class PostgresSession(Session):
    """A :class:`Session` over an ``asyncpg`` connection already inside a transaction."""

    dialect = "postgres"

    def __init__(self, conn: Any, schema: str, cache: dict[str, str]) -> None:
        self._conn = conn
        self._schema = schema
        self._prefix = f'"{schema}".'
        self._cache = cache
        self._sp = 0

    @property
    def connection(self) -> Any:
        """The ``asyncpg.Connection``."""
        return self._conn

    def _sql(self, sql: str) -> str:
        out = self._cache.get(sql)
        if out is not None:
            return out
        counter = 0
        prefix = self._prefix

        def repl(m: re.Match[str]) -> str:
            nonlocal counter
            token = m.group(0)
            if token == "?":
                counter += 1
                return f"${counter}"
            if token.startswith("cqrskit_"):
                return prefix + token
            return token

        out = _TOKENS.sub(repl, sql)
        if len(self._cache) < 4096:
            self._cache[sql] = out
        return out

    def qualify(self, name: str) -> str:
        """See :meth:`Session.qualify`."""
        return f'{self._prefix}"{check_identifier(name)}"'

    async def execute(self, sql: str, *params: Any) -> int:
        """See :meth:`Session.execute`."""
        status = await self._conn.execute(self._sql(sql), *params)
        last = str(status).rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else -1

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """See :meth:`Session.executemany`."""
        await self._conn.executemany(self._sql(sql), list(rows))

    async def fetchall(self, sql: str, *params: Any) -> list[Row]:
        """See :meth:`Session.fetchall`."""
        rows: list[Row] = await self._conn.fetch(self._sql(sql), *params)
        return rows

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        """See :meth:`Session.fetchone`."""
        row: Row | None = await self._conn.fetchrow(self._sql(sql), *params)
        return row

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """See :meth:`Session.savepoint`."""
        self._sp += 1
        name = f"cqrskit_sp{self._sp}"
        await self._conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            await self._conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
            await self._conn.execute(f"RELEASE SAVEPOINT {name}")
            raise
        await self._conn.execute(f"RELEASE SAVEPOINT {name}")


class PostgresReadDatabase(ReadDatabase):
    """A read database in a PostgreSQL schema (the write database's or another one).

    Args:
        dsn: the connection string (never logged or echoed).
        schema: the schema holding read models and bookkeeping (created if missing).
        max_size: pool size.
        acquire_timeout: seconds a transaction waits for a free pooled connection before
            :class:`~cqrskit.errors.UnavailableError` (default 10; an HTTP app answers it
            503 with ``Retry-After``).
    """

    dialect = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        max_size: int = 4,
        acquire_timeout: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self.schema = check_identifier(schema, "schema name")
        self._max = max_size
        self._acquire_timeout = acquire_timeout
        self._pool: Any = None
        self._pool_lock = asyncio.Lock()
        self._cache: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"PostgresReadDatabase(schema={self.schema!r})"

    async def _get_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:  # concurrent first sessions: one pool, not one each
            if self._pool is not None:
                return self._pool
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._max,
                server_settings={"search_path": self.schema},
            )
            try:
                async with pool.acquire() as conn:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            except BaseException:
                pool.terminate()
                raise
            self._pool = pool
        return self._pool

    def transaction(
        self, *, lock_timeout: float | None = None
    ) -> AbstractAsyncContextManager[Session]:
        """See :meth:`ReadDatabase.transaction` (``lock_timeout`` is set for this
        transaction only: ``SET LOCAL lock_timeout``)."""
        if lock_timeout is None:
            return self._tx("BEGIN")
        millis = max(1, round(lock_timeout * 1000))
        return self._tx(f"BEGIN; SET LOCAL lock_timeout = {millis}")

    def read_only(self) -> AbstractAsyncContextManager[Session]:
        """See :meth:`ReadDatabase.read_only` (``BEGIN READ ONLY``)."""
        return self._tx("BEGIN READ ONLY")

    @asynccontextmanager
    async def _tx(self, begin: str) -> AsyncIterator[Session]:
        pool = await self._get_pool()
        try:
            acquired = await pool.acquire(timeout=self._acquire_timeout)
        except TimeoutError as exc:
            raise UnavailableError(
                f"all {self._max} read-database connections stayed busy for "
                f"{self._acquire_timeout:g} s (pool exhausted).",
                hint="raise max_size=, shorten the transactions holding them, or retry.",
            ) from exc
        conn = acquired
        try:
            await conn.execute(begin)
            try:
                yield PostgresSession(conn, self.schema, self._cache)
            except BaseException:
                if conn.is_in_transaction():
                    await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")
        finally:
            await pool.release(conn)

    def inline(self, connection: Any) -> Session:
        """See :meth:`ReadDatabase.inline`."""
        return PostgresSession(connection, self.schema, self._cache)

    async def close(self) -> None:
        """See :meth:`ReadDatabase.close`."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
