"""A minimal SQLite event log for read-side tests, standing in for the write side.

Appends serialize on SQLite's write lock, so positions become visible in commit order.
Inline hooks run inside the append transaction, before COMMIT, like the real stores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from cqrskit.eventlog import EventStore, StoredEvent
from cqrskit.mediator import record_token
from cqrskit.messages import Event

Hook = Callable[[Any, Sequence[StoredEvent]], Awaitable[None]]


class Uow:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection


class SqliteTestLog(EventStore):
    def __init__(self, path: str) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 10000")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS events (position INTEGER PRIMARY KEY AUTOINCREMENT, "
            "stream TEXT NOT NULL, version INTEGER NOT NULL, type TEXT NOT NULL, "
            "data TEXT NOT NULL, metadata TEXT NOT NULL, UNIQUE (stream, version))"
        )
        self.hooks: list[Hook] = []
        self._new = asyncio.Event()

    def add_inline_hook(self, hook: Hook) -> None:
        self.hooks.append(hook)

    async def append(self, stream: str, *events: Event) -> list[StoredEvent]:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute(
                "SELECT coalesce(max(version), 0) FROM events WHERE stream = ?", (stream,)
            ).fetchone()[0]
            stored = []
            meta = {"timestamp": datetime.now(UTC).isoformat()}
            for e in events:
                version += 1
                data = json.dumps(dataclasses.asdict(e))  # type: ignore[call-overload]
                cur = conn.execute(
                    "INSERT INTO events (stream, version, type, data, metadata) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (stream, version, type(e).__name__, data, json.dumps(meta)),
                )
                stored.append(
                    StoredEvent(
                        cur.lastrowid or 0, stream, version, type(e).__name__, 1, data, meta
                    )
                )
            for hook in self.hooks:
                await hook(Uow(conn), stored)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        record_token(stored[-1].position)
        self._new.set()
        self._new = asyncio.Event()
        return stored

    def _rows(self, sql: str, *params: Any) -> list[StoredEvent]:
        rows = self.conn.execute(sql, params).fetchall()
        return [StoredEvent(r[0], r[1], r[2], r[3], 1, r[4], json.loads(r[5])) for r in rows]

    async def read_after(self, position: int, limit: int = 1000) -> list[StoredEvent]:
        return self._rows(
            "SELECT position, stream, version, type, data, metadata FROM events "
            "WHERE position > ? ORDER BY position LIMIT ?",
            position,
            limit,
        )

    async def head(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0])

    async def wait_for(self, position: int, timeout: float) -> bool:
        if await self.head() > position:
            return True
        try:
            await asyncio.wait_for(self._new.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def read_stream(self, stream: str, after_version: int = 0) -> list[StoredEvent]:
        return self._rows(
            "SELECT position, stream, version, type, data, metadata FROM events "
            "WHERE stream = ? AND version > ? ORDER BY version",
            stream,
            after_version,
        )

    def close(self) -> None:
        self.conn.close()


def from_env() -> SqliteTestLog:
    """Store factory for projector subprocesses: the path comes from CQRSKIT_TEST_LOG."""
    return SqliteTestLog(os.environ["CQRSKIT_TEST_LOG"])
