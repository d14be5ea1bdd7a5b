"""The SQLite event-log layout (version 2: no AUTOINCREMENT, positions kept by triggers),
version 1 tables still in use, and the store's in-process write lock."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from cqrskit.sqlite import SCHEMA_VERSION, SqliteEventStore
from cqrskit.testing.eventlog import Opened

V1_DDL = """
CREATE TABLE cqrskit_events (
    position INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL,
    version INTEGER NOT NULL, type TEXT NOT NULL, schema_version INTEGER NOT NULL,
    data TEXT NOT NULL, message_id TEXT NOT NULL, correlation_id TEXT, causation_id TEXT,
    recorded_at TEXT NOT NULL);
CREATE UNIQUE INDEX cqrskit_events_stream_version ON cqrskit_events (stream, version);
CREATE TABLE cqrskit_schema (name TEXT PRIMARY KEY, version INTEGER NOT NULL);
INSERT INTO cqrskit_schema VALUES ('cqrskit_events', 1);
"""


async def append(store: SqliteEventStore, stream: str, n: int = 1) -> int:
    uow = await store.begin()
    for i in range(n):
        uow.record(stream, Opened(stream, f"o{i}"))
    last = await uow.commit()
    assert last is not None
    return last


async def test_new_tables_use_layout_2_without_autoincrement(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "l.db")
    try:
        sql = store._writer.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'cqrskit_events'"
        ).fetchone()[0]
        assert "AUTOINCREMENT" not in sql.upper()
        version = store._writer.execute("SELECT version FROM cqrskit_schema").fetchone()[0]
        assert version == SCHEMA_VERSION == 2
        await append(store, "a", 3)
        # no sqlite_sequence row is written per commit any more
        assert store._writer.execute(
            "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_sequence'"
        ).fetchone() == (0,)
    finally:
        store.close()


async def test_positions_are_never_handed_out_twice(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "p.db")
    try:
        await append(store, "a", 2)
        newest = await append(store, "b")
        conn = sqlite3.connect(tmp_path / "p.db", isolation_level=None)
        try:
            with pytest.raises(sqlite3.IntegrityError, match="newest event cannot be deleted"):
                conn.execute("DELETE FROM cqrskit_events WHERE position = ?", (newest,))
            with pytest.raises(sqlite3.IntegrityError, match="newest event cannot be deleted"):
                conn.execute("DELETE FROM cqrskit_events")
            with pytest.raises(sqlite3.IntegrityError, match="positions never change"):
                conn.execute("UPDATE cqrskit_events SET position = position + 100")
            # archiving older events is allowed
            conn.execute("DELETE FROM cqrskit_events WHERE position < ?", (newest,))
        finally:
            conn.close()
        after = await append(store, "c")
        assert after == newest + 1
        assert [e.position for e in await store.read_after(0)] == [newest, after]
    finally:
        store.close()


async def test_version_1_tables_keep_working(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "v1.db")
    conn.executescript(V1_DDL)
    conn.close()
    store = SqliteEventStore(tmp_path / "v1.db", create_tables=False)
    try:
        first = await append(store, "a", 2)
        second = await append(store, "a")
        assert second == first + 1
        events = await store.read_stream("a")
        assert [(e.version, e.position) for e in events] == [(1, 1), (2, 2), (3, 3)]
    finally:
        store.close()
    store = SqliteEventStore(tmp_path / "v1.db")  # create_tables=True leaves it as it is
    try:
        sql = store._writer.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'cqrskit_events'"
        ).fetchone()[0]
        assert "AUTOINCREMENT" in sql.upper()
    finally:
        store.close()


async def test_write_lock_is_first_come_first_served_and_survives_cancellation(
    tmp_path: Path,
) -> None:
    store = SqliteEventStore(tmp_path / "w.db")
    order: list[str] = []
    try:
        first = await store.begin()

        async def command(name: str) -> None:
            uow = await store.begin()
            order.append(name)
            uow.record(name, Opened(name, name))
            await uow.commit()

        waiting = [asyncio.create_task(command(n)) for n in ("x", "y", "z")]
        # a waiter cancelled while queued leaves the queue
        cancelled = asyncio.create_task(command("never"))
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(store._write_lock._waiters) == 4
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert len(store._write_lock._waiters) == 3
        await first.commit()
        # "x" was handed the lock; cancelling it before it ran passes the lock on
        waiting[0].cancel()
        await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 10.0)
        assert order == ["y", "z"]
        assert not store._write_lock.held
        assert [e.stream for e in await store.read_after(0)] == ["y", "z"]
        # and the store still works
        await append(store, "after")
    finally:
        store.close()
