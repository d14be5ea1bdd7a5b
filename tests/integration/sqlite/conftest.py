"""Fixtures for the read-side tests on SQLite; the PostgreSQL conftest mirrors them."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from tests.support.sqlite_log import SqliteTestLog

from cqrskit.projections import ReadDatabase
from cqrskit.sqlite import SqliteReadDatabase


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[SqliteTestLog]:
    store = SqliteTestLog(str(tmp_path / "write.db"))
    yield store
    store.close()


@pytest.fixture(params=["same", "separate"])
def read_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where read models live: the write database's file, or a separate file."""
    return str(tmp_path / ("write.db" if request.param == "same" else "read.db"))


@pytest.fixture
async def open_read_db(
    read_location: str, tmp_path: Path
) -> AsyncIterator[Callable[..., ReadDatabase]]:
    """``open_read_db()`` -> another handle on the read database; ``open_read_db("x")`` ->
    a different, fresh database; ``open_read_db(write=True)`` -> one on the write database."""
    opened: list[ReadDatabase] = []

    def make(name: str | None = None, *, write: bool = False) -> ReadDatabase:
        path = str(tmp_path / "write.db") if write else read_location
        db = SqliteReadDatabase(str(tmp_path / f"{name}.db") if name else path)
        opened.append(db)
        return db

    yield make
    for db in opened:
        await db.close()


@pytest.fixture
def read_db(open_read_db: Callable[..., ReadDatabase]) -> ReadDatabase:
    return open_read_db()


@pytest.fixture
def read_only_error() -> type[Exception]:
    return sqlite3.OperationalError


@pytest.fixture
def poison_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    flag = tmp_path / "poison.flag"
    monkeypatch.setenv("CQRSKIT_TEST_POISON_FLAG", str(flag))
    return flag
