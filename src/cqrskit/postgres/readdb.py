"""PostgreSQL read database on asyncpg: read models in a schema, READ ONLY query sessions.

Bookkeeping tables and read-model tables live in the given schema; statements written with
``?`` placeholders and unqualified bookkeeping names are rewritten once per distinct
statement (``$n`` placeholders, schema-qualified names). Query sessions run in
``BEGIN READ ONLY`` transactions with ``search_path`` set to the schema, so a query reads
the views by their plain names and any write fails with a PostgreSQL error.

Several statements in one round trip (:meth:`PostgresSession.execute_all`, used by the
projection batches): asyncpg pipelines only executions of one prepared statement, so
different statements go as one multi-statement string. Each ``$n`` becomes a quoted literal
cast to the parameter's own type, as the server described it when the statement was first
seen (one ``prepare`` per distinct statement and database object), so the server reads the
same value it would have received as a parameter. Only values whose Python type asyncpg
itself would encode for that parameter type are written as literals (``int`` for the
integer types, ``str`` for text and JSON, aware ``datetime`` for ``timestamptz`` ...);
a statement with any other value, or with text the rewriting cannot see through (dollar
quoting, comments), runs on its own through asyncpg, exactly as without batching.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from decimal import Decimal
from typing import Any

from cqrskit.errors import (
    ConfigurationError,
    ConnectionLostError,
    MissingExtraError,
    UnavailableError,
)
from cqrskit.projections.db import ReadDatabase, Row, Session, SqlFlavor, check_identifier

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("postgres", "asyncpg") from exc

__all__ = ["PostgresFlavor", "PostgresReadDatabase", "PostgresSession"]

_TOKENS = re.compile(
    r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?|\bcqrskit_(?:projections|checkpoints|dead_letters|lease_holders)\b"
)


_PARAMS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$(\d+)")
_OPAQUE = re.compile(r"\$[A-Za-z_]*\$|--|/\*")  # dollar quoting, comments

Render = Callable[[Any], "str | None"]


def _quote(text: str) -> str | None:
    return None if "\x00" in text else "'" + text.replace("'", "''") + "'"


def _ints(bits: int) -> Render:
    top = 2 ** (bits - 1)
    return lambda v: f"'{v}'" if type(v) is int and -top <= v < top else None


def _float(v: Any) -> str | None:
    if type(v) is int:
        return f"'{v}'"
    if type(v) is not float:
        return None
    if v != v:
        return "'NaN'"
    if v in (float("inf"), float("-inf")):
        return "'Infinity'" if v > 0 else "'-Infinity'"
    return f"'{v!r}'"


def _numeric(v: Any) -> str | None:
    if type(v) is int or (type(v) is Decimal and v.is_finite()):
        return f"'{v}'"
    return None


# the Python types asyncpg encodes for each parameter type, as literal text
_RENDER: dict[str, Render] = {
    "int2": _ints(16),
    "int4": _ints(32),
    "int8": _ints(64),
    "float8": _float,
    "numeric": _numeric,
    "bool": lambda v: ("'true'" if v else "'false'") if type(v) is bool else None,
    "text": lambda v: _quote(v) if type(v) is str else None,
    "varchar": lambda v: _quote(v) if type(v) is str else None,
    "bpchar": lambda v: _quote(v) if type(v) is str else None,
    "json": lambda v: _quote(v) if type(v) is str else None,
    "jsonb": lambda v: _quote(v) if type(v) is str else None,
    "uuid": lambda v: f"'{v}'" if type(v) is uuid.UUID else None,
    "bytea": lambda v: f"'\\x{v.hex()}'" if type(v) is bytes else None,
    "date": lambda v: f"'{v.isoformat()}'" if type(v) is dt.date else None,
    "timestamp": lambda v: (
        f"'{v.isoformat()}'" if type(v) is dt.datetime and v.tzinfo is None else None
    ),
    "timestamptz": lambda v: (
        f"'{v.isoformat()}'"
        if type(v) is dt.datetime and v.tzinfo is not None and v.utcoffset() is not None
        else None
    ),
}

# a statement as literal text: the pieces between its $n, which parameter goes in each
# gap, and per parameter its renderer and cast
_Literal = tuple[list[str], list[int], list[tuple[Render, str]]]


class PostgresFlavor(SqlFlavor):
    """PostgreSQL's spelling of the bookkeeping's SQL (see :class:`SqlFlavor`): row locks,
    ``SKIP LOCKED``, ``pg_advisory_xact_lock`` and ``idle_in_transaction_session_timeout``."""

    __slots__ = ()

    greatest = "GREATEST"
    for_share = " FOR SHARE"
    for_update = " FOR UPDATE"
    for_no_key_update = " FOR NO KEY UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    batches_statements = True

    def advisory_lock(self, key: int) -> str:
        """See :meth:`SqlFlavor.advisory_lock`."""
        return f"SELECT pg_advisory_xact_lock({int(key)})"

    def idle_limit(self, hold: float) -> tuple[str, str]:
        """See :meth:`SqlFlavor.idle_limit`: ``set_config`` for this transaction only."""
        millis = str(max(1, round(hold * 1000)))
        return "set_config('idle_in_transaction_session_timeout', ?, true)", millis


_FLAVOR = PostgresFlavor()


class PostgresSession(Session):
    """A :class:`Session` over an ``asyncpg`` connection already inside a transaction."""

    dialect = "postgres"
    flavor = _FLAVOR

    def __init__(
        self,
        conn: Any,
        schema: str,
        cache: dict[str, str],
        literals: dict[str, _Literal | None] | None = None,
        *,
        rollback_timeout: float | None = None,
    ) -> None:
        self._conn = conn
        self._schema = schema
        self._prefix = f'"{schema}".'
        self._cache = cache
        self._literals: dict[str, _Literal | None] = {} if literals is None else literals
        self._sp = 0
        # the longest wait for a savepoint's rollback (None: the connection's own timeout)
        self._rollback_timeout = rollback_timeout

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

    async def execute_all(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Run the statements in order, as few round trips as the values allow: those that
        can be written as literals go together in one string (see the module)."""
        if self._conn.get_settings().standard_conforming_strings != "on":
            await super().execute_all(statements)  # backslashes would be escapes: no literals
            return
        script: list[str] = []
        first: tuple[str, Sequence[Any]] | None = None
        for sql, params in statements:
            text = await self._literal(sql, params)
            if text is None:
                await self._send(script, first)
                script, first = [], None
                await self.execute(sql, *params)
                continue
            if not script:
                first = (sql, params)
            script.append(text)
        await self._send(script, first)

    async def _send(self, script: list[str], first: tuple[str, Sequence[Any]] | None) -> None:
        if len(script) == 1 and first is not None:
            await self.execute(first[0], *first[1])  # one statement: the prepared path
        elif script:
            await self._conn.execute(";\n".join(script))

    async def _literal(self, sql: str, params: Sequence[Any]) -> str | None:
        """``sql`` with ``params`` written in as typed literals, or ``None`` when a value
        cannot be (then the statement runs on its own)."""
        literals = self._literals
        try:
            form = literals[sql]
        except KeyError:
            if len(literals) >= 4096:
                return None  # SQL text built per event: not worth a describe each
            form = literals[sql] = await self._describe(sql)
        if form is None:
            return None
        pieces, order, kinds = form
        if len(params) != len(kinds):
            return None  # asyncpg raises the error this deserves
        values: list[str] = []
        for value, (render, cast) in zip(params, kinds, strict=True):
            if value is None:
                values.append("NULL::" + cast)
                continue
            text = render(value)
            if text is None:
                return None
            values.append(text + "::" + cast)
        out = [pieces[0]]
        for k, piece in zip(order, pieces[1:], strict=True):
            out.append(values[k])
            out.append(piece)
        return "".join(out)

    async def _describe(self, sql: str) -> _Literal | None:
        dollar = self._sql(sql)
        if _OPAQUE.search(dollar):
            return None
        pieces: list[str] = []
        order: list[int] = []
        last = 0
        for m in _PARAMS.finditer(dollar):
            if m.group(1) is None:
                continue
            pieces.append(dollar[last : m.start()])
            order.append(int(m.group(1)) - 1)
            last = m.end()
        pieces.append(dollar[last:])
        kinds: list[tuple[Render, str]] = []
        if order:
            statement = await self._conn.prepare(dollar)
            for t in statement.get_parameters():
                render = _RENDER.get(t.name) if t.schema == "pg_catalog" else None
                if render is None or t.kind != "scalar":
                    return None
                kinds.append((render, f'"pg_catalog"."{t.name}"'))
            if sorted(set(order)) != list(range(len(kinds))):
                return None
        return pieces, order, kinds

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
        except Exception as exc:
            await self._roll_back_to(name, exc)
            raise
        except BaseException:
            # cancelled (a deadline): the whole transaction is rolled back by its owner,
            # within its bound; a statement here would first wait for the server to
            # confirm the cancellation, for ever if it stopped answering
            raise
        await self._conn.execute(f"RELEASE SAVEPOINT {name}")

    async def _roll_back_to(self, name: str, exc: Exception) -> None:
        """Undo a failed savepoint block, within the rollback timeout. After a statement
        interrupted by the caller's own timeout (``asyncio.wait_for`` inside the block)
        asyncpg first waits for the server to confirm the cancellation — for ever when it
        stopped answering. No answer in time: the connection is ended (the server rolls
        its transaction back) and :class:`ConnectionLostError` replaces ``exc``, so that
        a caller catching ``exc`` does not go on in a transaction that is gone."""
        timeout = self._rollback_timeout
        try:
            await self._conn.execute(f"ROLLBACK TO SAVEPOINT {name}", timeout=timeout)
            await self._conn.execute(f"RELEASE SAVEPOINT {name}", timeout=timeout)
        except TimeoutError as late:
            _end(self._conn)
            bound = "in time" if timeout is None else f"within {timeout:g} s"
            raise ConnectionLostError(
                f"the database did not roll a savepoint back {bound} (after "
                f"{type(exc).__name__}); the connection was closed and its transaction "
                "rolled back, nothing of it was committed.",
                hint="retry; check the database server and the network to it.",
            ) from late


def _end(conn: Any) -> None:
    """End a pooled connection now (asyncpg may have ended it already, which detaches it
    from the pool's proxy)."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


def _millis(seconds: float, name: str) -> int:
    """``seconds`` as whole milliseconds (at least 1) for a ``SET LOCAL``."""
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ConfigurationError(
            f"{name}={seconds!r} is not a positive number of seconds.",
            hint=f"pass {name}= as seconds > 0 (e.g. 2.5), or None for no limit.",
        )
    return max(1, round(seconds * 1000))


class PostgresReadDatabase(ReadDatabase):
    """A read database in a PostgreSQL schema (the write database's or another one).

    Args:
        dsn: the connection string (never logged or echoed).
        schema: the schema holding read models and bookkeeping (created if missing).
        max_size: pool size.
        acquire_timeout: seconds a transaction waits for a free pooled connection before
            :class:`~cqrskit.errors.UnavailableError` (default 10; an HTTP app answers it
            503 with ``Retry-After``); also the longest wait for the ROLLBACK of a failed
            transaction or savepoint (a server that gives no answer by then has the
            connection ended; for a savepoint the block then raises
            :class:`~cqrskit.errors.ConnectionLostError`).
    """

    dialect = "postgres"
    flavor = _FLAVOR

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
        # statements as typed literal text (execute_all): read-pool and write connections
        # apart, their search_path may differ
        self._literals: dict[str, _Literal | None] = {}
        self._inline_literals: dict[str, _Literal | None] = {}

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
        self, *, lock_timeout: float | None = None, hold: float | None = None
    ) -> AbstractAsyncContextManager[Session]:
        """See :meth:`ReadDatabase.transaction` (``lock_timeout`` and ``hold`` are set for
        this transaction only, in the same round trip as ``BEGIN``: ``SET LOCAL
        lock_timeout`` and ``SET LOCAL idle_in_transaction_session_timeout``)."""
        if lock_timeout is None and hold is None:
            return self._tx("BEGIN")
        begin = "BEGIN"
        if lock_timeout is not None:
            begin += f"; SET LOCAL lock_timeout = {_millis(lock_timeout, 'lock_timeout')}"
        if hold is not None:
            begin += f"; SET LOCAL idle_in_transaction_session_timeout = {_millis(hold, 'hold')}"
        return self._tx(begin)

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
                yield PostgresSession(
                    conn,
                    self.schema,
                    self._cache,
                    self._literals,
                    rollback_timeout=self._acquire_timeout,
                )
            except BaseException:
                await self._roll_back(conn)
                raise
            await conn.execute("COMMIT")
        finally:
            await pool.release(conn)

    async def _roll_back(self, conn: Any) -> None:
        """Roll a failed transaction back without hiding the caller's error, within
        ``acquire_timeout``: after an interrupted statement asyncpg first waits for the
        server to confirm the cancellation, for ever if the server stopped answering. A
        connection that gets no answer (or fails) is ended; the server rolls back the
        transaction of a session that ends."""
        try:
            if not conn.is_closed() and conn.is_in_transaction():
                await conn.execute("ROLLBACK", timeout=self._acquire_timeout)
        except Exception:  # noqa: BLE001 - the caller's own error is the one to report
            _end(conn)
        except BaseException:
            _end(conn)
            raise

    def inline(self, connection: Any) -> Session:
        """See :meth:`ReadDatabase.inline`."""
        return PostgresSession(
            connection,
            self.schema,
            self._cache,
            self._inline_literals,
            rollback_timeout=self._acquire_timeout,
        )

    async def close(self) -> None:
        """See :meth:`ReadDatabase.close`."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
