"""The SQLite read database waits for another writer's lock without freezing the event loop."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from cqrskit.sqlite import SqliteReadDatabase


async def test_waiting_for_the_write_lock_leaves_the_event_loop_free(tmp_path: Path) -> None:
    path = str(tmp_path / "read.db")
    db = SqliteReadDatabase(path)
    async with db.transaction() as s:
        await s.execute("CREATE TABLE t (n INTEGER)")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    released: list[bool] = []

    async def release() -> None:
        await asyncio.sleep(0.2)  # runs only if the waiting transaction lets the loop run
        holder.execute("ROLLBACK")
        released.append(True)

    releaser = asyncio.create_task(release())
    try:
        # a busy wait inside the synchronous BEGIN would hold the loop for the whole 5 s,
        # the releaser could not run, and this would end in "database is locked"
        async with db.transaction(lock_timeout=5.0) as s:
            assert released == [True]
            await s.execute("INSERT INTO t VALUES (1)")
    finally:
        await releaser
        holder.close()
    async with db.read_only() as s:
        assert [tuple(r) for r in await s.fetchall("SELECT n FROM t")] == [(1,)]
    await db.close()


async def test_the_lock_wait_is_bounded(tmp_path: Path) -> None:
    path = str(tmp_path / "read.db")
    db = SqliteReadDatabase(path)
    async with db.transaction() as s:
        await s.execute("CREATE TABLE t (n INTEGER)")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            async with db.transaction(lock_timeout=0.05):
                pass
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    async with db.transaction() as s:  # the writer connection is usable afterwards
        await s.execute("INSERT INTO t VALUES (2)")
    await db.close()
