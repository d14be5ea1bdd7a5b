"""The relay's event log and state database on SQLite and on PostgreSQL (per-test schema)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cqrskit.projections import ReadDatabase, SqliteReadDatabase


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Any, ReadDatabase]]:
    """(log with ``append``, state database on the same database) for each backend."""
    if request.param == "sqlite":
        from tests.support.sqlite_log import SqliteTestLog

        log = SqliteTestLog(str(tmp_path / "write.db"))
        db = SqliteReadDatabase(str(tmp_path / "write.db"))
        yield log, db
        await db.close()
        log.close()
        return
    import asyncpg
    from tests.support.pg_log import open_pg_log

    from cqrskit.projections.postgres import PostgresReadDatabase

    dsn: str = request.getfixturevalue("postgres_dsn")
    schema = f"cqrskit_t_{uuid.uuid4().hex[:16]}"
    pg = await open_pg_log(dsn, schema)
    pdb = PostgresReadDatabase(dsn, schema=schema)
    try:
        yield pg, pdb
    finally:
        await pdb.close()
        await pg.close()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def pg_read(postgres_dsn: str) -> AsyncIterator[tuple[str, ReadDatabase]]:
    """A PostgreSQL read database in a schema of its own: (spec for processes, database)."""
    import asyncpg

    from cqrskit.postgres import PostgresReadDatabase

    schema = f"cqrskit_t_{uuid.uuid4().hex[:16]}"
    db = PostgresReadDatabase(postgres_dsn, schema=schema)
    try:
        yield f"{postgres_dsn}#{schema}", db
    finally:
        await db.close()
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
