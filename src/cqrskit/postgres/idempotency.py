"""PostgreSQL idempotency rows: the key is claimed first (``INSERT ... ON CONFLICT DO
NOTHING``), so a duplicate in flight blocks on the key's index entry until the first attempt
ends. See :mod:`cqrskit.idempotency` for the behavior."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from cqrskit.eventlog import UnitOfWork, validate_identifier
from cqrskit.idempotency import ROW_COLUMNS as _COLS
from cqrskit.idempotency import IdempotencyRecord, IdempotencyRow, key_in_progress

__all__ = ["PostgresIdempotencyBackend", "SessionIdempotencyBackend", "postgres_idempotency_ddl"]


def postgres_idempotency_ddl(schema: str = "public", table: str = "cqrskit_idempotency") -> str:
    """The PostgreSQL DDL of the idempotency table (for your own migrations)."""
    s = validate_identifier(schema, "schema name")
    t = validate_identifier(table, "table name")
    idx = validate_identifier(f"{table}_created"[:63], "index name")
    return f"""CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.{t} (
    key text PRIMARY KEY,
    command_type text NOT NULL,
    payload_hash text NOT NULL,
    result text,
    token bigint,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS {idx} ON {s}.{t} (created_at);
"""


class PostgresIdempotencyBackend:
    """Idempotency rows in a PostgreSQL table. Claim first: ``INSERT ... ON CONFLICT DO
    NOTHING`` at the start of the transaction. A duplicate in flight blocks on the key's
    index entry until the first attempt ends, then reads its committed row (or, if it
    rolled back, claims the key itself)."""

    def __init__(self, store: Any, table: str) -> None:
        self.store = store
        self.schema: str = store.schema
        self._table = table
        s = validate_identifier(store.schema, "schema name")
        t = validate_identifier(table, "table name")
        self._sql_claim = (
            f"INSERT INTO {s}.{t} (key, command_type, payload_hash) VALUES ($1, '', '') "
            "ON CONFLICT (key) DO NOTHING"
        )
        self._sql_get = f"SELECT {_COLS} FROM {s}.{t} WHERE key = $1 AND result IS NOT NULL"
        # the token is the position of the command's last event; the PostgreSQL driver
        # gives event n (1-based) of a transaction position (xid << 20) + n - 1
        self._sql_save = (
            f"UPDATE {s}.{t} SET command_type = $2, payload_hash = $3, result = $4, "
            "token = CASE WHEN $5::int > 0 "
            "THEN (pg_current_xact_id()::text::bigint << 20) + $5::int - 1 END, "
            "created_at = now() WHERE key = $1"
        )
        self._sql_purge = f"DELETE FROM {s}.{t} WHERE created_at < $1 AND result IS NOT NULL"

    async def prepare(self) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.prepare`."""

    def close(self) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.close`."""

    async def create(self) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.create`."""
        async with self.store.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"cqrskit:{self.schema}"
            )
            await conn.execute(postgres_idempotency_ddl(self.schema, self._table))

    @staticmethod
    def _parse(r: Any) -> IdempotencyRecord:
        return IdempotencyRecord(r[0], r[1], r[2], r[3], r[4], r[5])

    async def claim(self, uow: UnitOfWork, key: str) -> IdempotencyRecord | None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.claim`."""
        conn = uow.connection  # type: ignore[attr-defined]
        status = await conn.execute(self._sql_claim, key)
        if status.endswith(" 1"):
            return None
        r = await conn.fetchrow(self._sql_get, key)
        if r is None:  # pragma: no cover - a committed claim always has its result
            raise key_in_progress(key, 0.0)
        return self._parse(r)

    async def save(self, uow: UnitOfWork, row: IdempotencyRow) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.save`."""
        await uow.connection.execute(  # type: ignore[attr-defined]
            self._sql_save, row.key, row.command_type, row.payload_hash, row.result, row.events
        )

    def release(self, key: str) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.release`."""

    def forget(self, uow: UnitOfWork) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.forget`."""

    async def lookup(self, key: str) -> IdempotencyRecord | None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.lookup`."""
        async with self.store.pool.acquire() as conn:
            r = await conn.fetchrow(self._sql_get, key)
        return None if r is None else self._parse(r)

    async def purge(self, before: datetime) -> int:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.purge`."""
        async with self.store.pool.acquire() as conn:
            status = await conn.execute(self._sql_purge, before)
        return int(status.rsplit(" ", 1)[-1])


class SessionIdempotencyBackend(PostgresIdempotencyBackend):
    """:class:`PostgresIdempotencyBackend` through a ``cqrskit.sqlalchemy`` unit of work's
    session."""

    async def claim(self, uow: UnitOfWork, key: str) -> IdempotencyRecord | None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.claim`."""
        conn = await uow.session.connection()  # type: ignore[attr-defined]
        claimed = await conn.exec_driver_sql(self._sql_claim, (key,))
        if claimed.rowcount == 1:
            return None
        r = (await conn.exec_driver_sql(self._sql_get, (key,))).first()
        if r is None:  # pragma: no cover - a committed claim always has its result
            raise key_in_progress(key, 0.0)
        return self._parse(r)

    async def save(self, uow: UnitOfWork, row: IdempotencyRow) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.save`."""
        conn = await uow.session.connection()  # type: ignore[attr-defined]
        await conn.exec_driver_sql(
            self._sql_save, (row.key, row.command_type, row.payload_hash, row.result, row.events)
        )
