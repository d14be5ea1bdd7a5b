"""SQLite idempotency rows: inserted through the unit of work's connection, which holds
SQLite's write lock from ``BEGIN IMMEDIATE``, so a duplicate waits for the lock, then sees
the row. See :mod:`cqrskit.idempotency` for the behavior."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

from cqrskit.errors import ConfigurationError
from cqrskit.eventlog import StoredEvent, UnitOfWork, validate_identifier
from cqrskit.idempotency import ROW_COLUMNS as _COLS
from cqrskit.idempotency import IdempotencyRecord, IdempotencyRow

__all__ = ["SqliteIdempotencyBackend", "sqlite_idempotency_ddl"]


def sqlite_idempotency_ddl(table: str = "cqrskit_idempotency") -> str:
    """The SQLite DDL of the idempotency table (for your own migrations)."""
    t = validate_identifier(table, "table name")
    idx = validate_identifier(f"{table}_created"[:63], "index name")
    return (
        f"CREATE TABLE IF NOT EXISTS {t} (\n"
        "    scope TEXT NOT NULL DEFAULT '',\n"
        "    key TEXT NOT NULL,\n"
        "    command_type TEXT NOT NULL,\n"
        "    payload_hash TEXT NOT NULL,\n"
        "    result TEXT NOT NULL,\n"
        "    token INTEGER,\n"
        "    created_at TEXT NOT NULL,\n"
        "    PRIMARY KEY (scope, key)\n"
        ");\n"
        f"CREATE INDEX IF NOT EXISTS {idx} ON {t} (created_at);\n"
    )


class SqliteIdempotencyBackend:
    """Idempotency rows in a SQLite table, inserted through the unit of work's connection,
    which holds SQLite's write lock from BEGIN IMMEDIATE: a duplicate waits for the lock,
    then sees the row."""

    def __init__(self, store: Any, table: str) -> None:
        self.store = store
        self.path: str = store.path
        self._t = t = validate_identifier(table, "table name")
        self._table = table
        self._pending: dict[int, tuple[UnitOfWork, IdempotencyRow]] = {}
        self._sql_get = f"SELECT {_COLS}, scope FROM {t} WHERE scope = ? AND key = ?"
        self._sql_put = f"INSERT INTO {t} ({_COLS}, scope) VALUES (?, ?, ?, ?, ?, ?, ?)"
        self._reader: sqlite3.Connection | None = None
        store.add_inline_hook(self._hook)

    async def prepare(self) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.prepare` (checks the table)."""
        reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        columns = {
            r[1] for r in reader.execute("SELECT * FROM pragma_table_info(?)", (self._table,))
        }
        if "scope" not in columns:
            reader.close()
            what = "does not exist" if not columns else "predates scoped keys"
            raise ConfigurationError(
                f"the idempotency table {self._table!r} in {self.path} {what}.",
                hint="run the DDL from cqrskit.sqlite.sqlite_idempotency_ddl() (an older table: "
                "drop it first), or open with create_tables=True.",
            )
        self._reader = reader

    def close(self) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.close`."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    async def create(self) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.create`."""
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        try:
            conn.executescript(
                "BEGIN IMMEDIATE;\n" + sqlite_idempotency_ddl(self._table) + "COMMIT;"
            )
        finally:
            conn.close()
        await self.prepare()

    @staticmethod
    def _parse(r: Any) -> IdempotencyRecord:
        return IdempotencyRecord(r[0], r[1], r[2], r[3], r[4], datetime.fromisoformat(r[5]), r[6])

    async def claim(self, uow: UnitOfWork, key: str, scope: str) -> IdempotencyRecord | None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.claim`."""
        r = uow.connection.execute(self._sql_get, (scope, key)).fetchone()  # type: ignore[attr-defined]
        return None if r is None else self._parse(r)

    def _put(self, uow: UnitOfWork, row: IdempotencyRow, token: int | None) -> None:
        uow.connection.execute(  # type: ignore[attr-defined]
            self._sql_put,
            (
                row.key,
                row.command_type,
                row.payload_hash,
                row.result,
                token,
                datetime.now(UTC).isoformat(),
                row.scope,
            ),
        )

    async def save(self, uow: UnitOfWork, row: IdempotencyRow) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.save`."""
        if row.events:
            self._pending[id(uow)] = (uow, row)
        else:
            self._put(uow, row, None)

    async def _hook(self, uow: UnitOfWork, stored: list[StoredEvent]) -> None:
        pending = self._pending.pop(id(uow), None)
        if pending is not None and pending[0] is uow:
            self._put(uow, pending[1], stored[pending[1].events - 1].position)

    def release(self, key: str, scope: str) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.release`."""

    def forget(self, uow: UnitOfWork) -> None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.forget`."""
        self._pending.pop(id(uow), None)

    def _read(self) -> sqlite3.Connection:
        if self._reader is None:
            raise ConfigurationError(
                "the idempotency table is not ready.",
                hint="create Idempotency with: idem = await Idempotency.open(store)",
            )
        return self._reader

    async def lookup(self, key: str, scope: str) -> IdempotencyRecord | None:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.lookup`."""
        r = self._read().execute(self._sql_get, (scope, key)).fetchone()
        return None if r is None else self._parse(r)

    async def purge(self, before: datetime) -> int:
        """See :meth:`cqrskit.idempotency.IdempotencyBackend.purge`."""
        uow = await self.store.begin()
        try:
            cur = uow.connection.execute(
                f"DELETE FROM {self._t} WHERE created_at < ?", (before.isoformat(),)
            )
        except BaseException:
            await uow.rollback()
            raise
        await uow.commit()
        return int(cur.rowcount)
