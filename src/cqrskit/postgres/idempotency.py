"""PostgreSQL idempotency rows: the key is claimed first, by a function that inserts it with
``ON CONFLICT DO NOTHING`` under a ``lock_timeout`` of its own, so a duplicate in flight
waits on the key's index entry until the first attempt ends — at most ``wait_timeout``
seconds, then :func:`~cqrskit.idempotency.key_in_progress`. See :mod:`cqrskit.idempotency`
for the behavior."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from cqrskit.errors import ConfigurationError
from cqrskit.eventlog import UnitOfWork, validate_identifier
from cqrskit.idempotency import ROW_COLUMNS as _COLS
from cqrskit.idempotency import IdempotencyRecord, IdempotencyRow, key_in_progress

__all__ = ["PostgresIdempotencyBackend", "SessionIdempotencyBackend", "postgres_idempotency_ddl"]

_LOCK_NOT_AVAILABLE = "55P03"


def _names(schema: str, table: str) -> tuple[str, str, str, str]:
    s = validate_identifier(schema, "schema name")
    t = validate_identifier(table, "table name")
    idx = validate_identifier(f"{table}_created"[:63], "index name")
    fn = validate_identifier(f"{table}_claim"[:63], "function name")
    return s, t, idx, fn


def postgres_idempotency_ddl(schema: str = "public", table: str = "cqrskit_idempotency") -> str:
    """The PostgreSQL DDL of the idempotency table and its claim function (for your own
    migrations)."""
    s, t, idx, fn = _names(schema, table)
    # The claim function's SET clause makes the lock_timeout it sets local to the call: the
    # duplicate's wait is bounded, the command's own statements keep the session's setting.
    return f"""CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.{t} (
    scope text NOT NULL DEFAULT '',
    key text NOT NULL,
    command_type text NOT NULL,
    payload_hash text NOT NULL,
    result text,
    token bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS {idx} ON {s}.{t} (created_at);
CREATE OR REPLACE FUNCTION {s}.{fn}(p_scope text, p_key text, p_wait text) RETURNS boolean
LANGUAGE sql SET lock_timeout = '0' AS $cqrskit$
    SELECT set_config('lock_timeout', p_wait, true);
    INSERT INTO {s}.{t} (scope, key, command_type, payload_hash)
    VALUES (p_scope, p_key, '', '') ON CONFLICT (scope, key) DO NOTHING RETURNING true;
$cqrskit$;
"""


def _lock_timeout(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if getattr(seen, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__ or seen.__context__
    return False


class PostgresIdempotencyBackend:
    """Idempotency rows in a PostgreSQL table. Claim first, at the start of the transaction,
    through the table's claim function: a duplicate in flight waits on the key's index
    entry (at most ``wait_timeout`` seconds) until the first attempt ends, then reads its
    committed row (or, if it rolled back, claims the key itself)."""

    def __init__(self, store: Any, table: str, wait_timeout: float = 10.0) -> None:
        self.store = store
        self.schema: str = store.schema
        self._table = table
        self.wait_timeout = wait_timeout
        self._wait = f"{max(1, round(wait_timeout * 1000))}ms"
        s, t, _, fn = _names(store.schema, table)
        self._sql_claim = f"SELECT {s}.{fn}($1, $2, $3)"
        self._sql_get = (
            f"SELECT {_COLS}, scope FROM {s}.{t} "
            "WHERE scope = $1 AND key = $2 AND result IS NOT NULL"
        )
        # the token is the position of the command's last event; the PostgreSQL driver
        # gives event n (1-based) of a transaction position (xid << 20) + n - 1
        self._sql_save = (
            f"UPDATE {s}.{t} SET command_type = $3, payload_hash = $4, result = $5, "
            "token = CASE WHEN $6::int > 0 "
            "THEN (pg_current_xact_id()::text::bigint << 20) + $6::int - 1 END, "
            "created_at = now() WHERE scope = $1 AND key = $2"
        )
        self._sql_purge = f"DELETE FROM {s}.{t} WHERE created_at < $1 AND result IS NOT NULL"
        self._sql_check = (
            "SELECT to_regclass($1) IS NOT NULL, EXISTS (SELECT 1 FROM pg_attribute "
            "WHERE attrelid = to_regclass($1) AND attname = 'scope' AND NOT attisdropped), "
            "to_regprocedure($2) IS NOT NULL"
        )
        self._check_args = (f"{s}.{t}", f"{s}.{fn}(text, text, text)")

    async def prepare(self) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.prepare` (checks the table)."""
        async with self.store.pool.acquire() as conn:
            exists, scoped, claim = await conn.fetchrow(self._sql_check, *self._check_args)
        if not (exists and scoped and claim):
            what = "does not exist" if not exists else "predates scoped keys"
            raise ConfigurationError(
                f"the idempotency table {self.schema}.{self._table} {what}.",
                hint="run the DDL from cqrskit.postgres.postgres_idempotency_ddl() (an older "
                "table: drop it, or add 'scope text NOT NULL DEFAULT ''' to its primary key, "
                "first), or open with create_tables=True.",
            )

    def close(self) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.close`."""

    async def create(self) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.create`."""
        async with self.store.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"cqrskit:{self.schema}"
            )
            await conn.execute(postgres_idempotency_ddl(self.schema, self._table))
        await self.prepare()

    @staticmethod
    def _parse(r: Any) -> IdempotencyRecord:
        return IdempotencyRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6])

    def _in_progress(self, key: str, exc: BaseException) -> Exception:
        error = key_in_progress(key, self.wait_timeout)
        error.__cause__ = exc
        return error

    async def claim(self, uow: UnitOfWork, key: str, scope: str) -> IdempotencyRecord | None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.claim`."""
        conn = uow.connection  # type: ignore[attr-defined]
        try:
            claimed = await conn.fetchval(self._sql_claim, scope, key, self._wait)
        except Exception as exc:
            if _lock_timeout(exc):
                raise self._in_progress(key, exc) from exc
            raise
        if claimed:
            return None
        r = await conn.fetchrow(self._sql_get, scope, key)
        if r is None:  # pragma: no cover - a committed claim always has its result
            raise key_in_progress(key, 0.0)
        return self._parse(r)

    def _save_args(self, row: IdempotencyRow) -> tuple[Any, ...]:
        return (row.scope, row.key, row.command_type, row.payload_hash, row.result, row.events)

    async def save(self, uow: UnitOfWork, row: IdempotencyRow) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.save`."""
        await uow.connection.execute(self._sql_save, *self._save_args(row))  # type: ignore[attr-defined]

    def release(self, key: str, scope: str) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.release`."""

    def forget(self, uow: UnitOfWork) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.forget`."""

    async def lookup(self, key: str, scope: str) -> IdempotencyRecord | None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.lookup`."""
        async with self.store.pool.acquire() as conn:
            r = await conn.fetchrow(self._sql_get, scope, key)
        return None if r is None else self._parse(r)

    async def purge(self, before: datetime) -> int:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.purge`."""
        async with self.store.pool.acquire() as conn:
            status = await conn.execute(self._sql_purge, before)
        return int(status.rsplit(" ", 1)[-1])


class SessionIdempotencyBackend(PostgresIdempotencyBackend):
    """:class:`PostgresIdempotencyBackend` through a ``cqrskit.sqlalchemy`` unit of work's
    session."""

    async def claim(self, uow: UnitOfWork, key: str, scope: str) -> IdempotencyRecord | None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.claim`."""
        conn = await uow.session.connection()  # type: ignore[attr-defined]
        try:
            claimed = (
                await conn.exec_driver_sql(self._sql_claim, (scope, key, self._wait))
            ).scalar()
        except Exception as exc:
            if _lock_timeout(exc):
                raise self._in_progress(key, exc) from exc
            raise
        if claimed:
            return None
        r = (await conn.exec_driver_sql(self._sql_get, (scope, key))).first()
        if r is None:  # pragma: no cover - a committed claim always has its result
            raise key_in_progress(key, 0.0)
        return self._parse(r)

    async def save(self, uow: UnitOfWork, row: IdempotencyRow) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.save`."""
        conn = await uow.session.connection()  # type: ignore[attr-defined]
        await conn.exec_driver_sql(self._sql_save, self._save_args(row))
