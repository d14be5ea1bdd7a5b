from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.support.sqlite_log import SqliteTestLog

from cqrskit.projections import SqliteReadDatabase


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[SqliteTestLog]:
    store = SqliteTestLog(str(tmp_path / "write.db"))
    yield store
    store.close()


@pytest.fixture(params=["same", "separate"])
async def read_db(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[SqliteReadDatabase]:
    """The read database: the write database's file, or a separate file."""
    name = "write.db" if request.param == "same" else "read.db"
    db = SqliteReadDatabase(str(tmp_path / name))
    yield db
    await db.close()


@pytest.fixture
def poison_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    flag = tmp_path / "poison.flag"
    monkeypatch.setenv("CQRSKIT_TEST_POISON_FLAG", str(flag))
    return flag


__all__ = ["os"]
