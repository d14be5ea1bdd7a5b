"""The SQLite driver passes the conformance kit; plus DDL, settings and multi-process checks."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from cqrskit.errors import ConfigurationError, UnavailableError
from cqrskit.eventlog import EventStore, UnitOfWork
from cqrskit.sqlite import SqliteEventStore, SqliteUnitOfWork, sqlite_ddl
from cqrskit.testing.eventlog import EventStoreConformance, Opened


class TestSqliteEventStore(EventStoreConformance):
    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    async def make_store(self) -> EventStore:
        store = SqliteEventStore(self.tmp / "kit.db")
        store._writer.execute("CREATE TABLE IF NOT EXISTS state (key TEXT NOT NULL)")
        return store

    async def close_store(self, store: EventStore) -> None:
        assert isinstance(store, SqliteEventStore)
        store.close()

    async def write_state(self, uow: UnitOfWork, key: str) -> None:
        assert isinstance(uow, SqliteUnitOfWork)
        uow.connection.execute("INSERT INTO state (key) VALUES (?)", (key,))

    async def state_keys(self, store: EventStore) -> set[str]:
        assert isinstance(store, SqliteEventStore)
        with closing(sqlite3.connect(store.path)) as conn:
            return {r[0] for r in conn.execute("SELECT key FROM state")}


def test_inserts_use_nameless_placeholders(tmp_path: Path) -> None:
    """The INSERTs are bound from tuples: "?1" is a named placeholder to Python
    3.12.0-3.12.3, which warn about binding it from a sequence (CPython gh-117995)."""
    store = SqliteEventStore(tmp_path / "q.db")
    try:
        for sql in (store._sql_insert_first, store._sql_insert_after, store._sql_insert_next):
            assert re.search(r"[?:@$]\w", sql) is None, sql
    finally:
        store.close()


def test_ddl_is_printable_and_creates_the_tables(tmp_path: Path) -> None:
    ddl = sqlite_ddl("my_events")
    assert 'CREATE TABLE IF NOT EXISTS "my_events"' in ddl
    assert "UNIQUE INDEX" in ddl
    conn = sqlite3.connect(tmp_path / "own.db")
    conn.executescript(ddl)
    conn.close()
    store = SqliteEventStore(tmp_path / "own.db", table="my_events", create_tables=False)
    store.close()


def test_missing_table_without_create_names_the_ddl(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="sqlite_ddl"):
        SqliteEventStore(tmp_path / "none.db", create_tables=False)


def test_schema_version_mismatch_is_refused(tmp_path: Path) -> None:
    SqliteEventStore(tmp_path / "v.db").close()
    with closing(sqlite3.connect(tmp_path / "v.db")) as conn:
        conn.execute("UPDATE cqrskit_schema SET version = 99")
        conn.commit()
    with pytest.raises(ConfigurationError, match="version 99"):
        SqliteEventStore(tmp_path / "v.db")


@pytest.mark.parametrize("table", ["Events", "x; drop table y", "1x", ""])
def test_table_names_are_validated(tmp_path: Path, table: str) -> None:
    with pytest.raises(ConfigurationError, match="must match"):
        SqliteEventStore(tmp_path / "t.db", table=table)
    with pytest.raises(ConfigurationError):
        sqlite_ddl(table)


def test_memory_database_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="database file"):
        SqliteEventStore(":memory:")


def test_settings_applied_and_checked(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "s.db", synchronous="FULL")
    try:
        assert store._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._writer.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        store.close()


async def test_reader_never_sees_uncommitted_rows(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "r.db")
    try:
        uow = await store.begin()
        uow.record("s", Opened("s", "x"))
        store._append(uow.connection, uow)
        assert await store.read_after(0) == []
        assert await store.head() == 0
        await uow.rollback()
        assert await store.read_after(0) == []
    finally:
        store.close()


async def test_two_stores_on_one_file_take_turns(tmp_path: Path) -> None:
    """A second writer (another process in real life) waits for the lock, then commits."""
    a = SqliteEventStore(tmp_path / "two.db")
    b = SqliteEventStore(tmp_path / "two.db", lock_timeout=5.0)
    try:
        ua = await a.begin()
        ua.record("s", Opened("s", "a"), expected_version=0)
        pending = asyncio.ensure_future(b.begin())
        await asyncio.sleep(0)
        assert not pending.done()
        await ua.commit()
        ub = await asyncio.wait_for(pending, 10)
        ub.record("s", Opened("s", "b"), expected_version=1)
        await ub.commit()
        assert [e.version for e in await a.read_stream("s")] == [1, 2]
    finally:
        a.close()
        b.close()


async def test_serializer_from_cqrskit_serialization_plugs_in(tmp_path: Path) -> None:
    from cqrskit.serialization import EventTypes, JsonSerializer

    types = EventTypes()
    types.register(Opened, "account.opened", version=2)
    serializer = JsonSerializer(types)
    store = SqliteEventStore(tmp_path / "ser.db", encoder=serializer.encode)
    try:
        uow = await store.begin()
        uow.record("s", Opened("s", "ada"))
        await uow.commit()
        [stored] = await store.read_after(0)
        assert (stored.type, stored.schema_version) == ("account.opened", 2)
        assert serializer.decode_stored(stored) == Opened("s", "ada")
    finally:
        store.close()


async def test_a_write_lock_held_elsewhere_past_lock_timeout_is_unavailable(
    tmp_path: Path,
) -> None:
    """Another process's write transaction past ``lock_timeout``: the command fails with
    UnavailableError (503 over HTTP, retry later) and writes nothing."""
    path = tmp_path / "log.db"
    store = SqliteEventStore(path, lock_timeout=0.2)

    async def commit_one() -> None:
        uow = await store.begin()
        uow.record("s", Opened("s", "x"))
        await uow.commit()

    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(UnavailableError, match="holds the write lock"):
            await commit_one()
        other.execute("ROLLBACK")
        assert await store.read_stream("s") == []
        await commit_one()
        assert len(await store.read_stream("s")) == 1
    finally:
        other.close()
        store.close()


def _open_fds_on(path: Path) -> int:
    fd_dir = Path("/proc/self/fd")
    count = 0
    for fd in fd_dir.iterdir():
        try:
            if Path(os.readlink(fd)) == path:
                count += 1
        except OSError:
            continue
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_a_refused_store_leaves_no_connection_open(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    with pytest.raises(ConfigurationError):
        SqliteEventStore(path, create_tables=False)  # no event log there
    assert _open_fds_on(path.resolve()) == 0
