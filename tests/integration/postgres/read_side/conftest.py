"""Fixtures for the read-side tests on PostgreSQL: a schema per test (and a second one for
the separate-database layout), created and dropped here."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from tests.support.pg_log import PgTestLog, open_pg_log

from cqrskit.projections import ReadDatabase
from cqrskit.projections.postgres import PostgresReadDatabase


@pytest.fixture
async def schemas(postgres_dsn: str) -> AsyncIterator[Callable[[str], str]]:
    base = f"cqrskit_t_{uuid.uuid4().hex[:16]}"
    made: list[str] = []

    def name(suffix: str) -> str:
        schema = f"{base}_{suffix}"
        if schema not in made:
            made.append(schema)
        return schema

    yield name
    conn = await asyncpg.connect(postgres_dsn)
    try:
        for schema in made:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def log(postgres_dsn: str, schemas: Callable[[str], str]) -> AsyncIterator[PgTestLog]:
    store = await open_pg_log(postgres_dsn, schemas("w"))
    yield store
    await store.close()


@pytest.fixture(params=["same", "separate"])
def read_location(request: pytest.FixtureRequest, schemas: Callable[[str], str]) -> str:
    """Where read models live: the write schema, or a separate schema."""
    return schemas("w") if request.param == "same" else schemas("r")


@pytest.fixture
async def open_read_db(
    postgres_dsn: str, read_location: str, schemas: Callable[[str], str]
) -> AsyncIterator[Callable[..., ReadDatabase]]:
    opened: list[ReadDatabase] = []

    def make(name: str | None = None, *, write: bool = False) -> ReadDatabase:
        schema = schemas("w") if write else (schemas(name) if name else read_location)
        db = PostgresReadDatabase(postgres_dsn, schema=schema)
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
    return asyncpg.exceptions.ReadOnlySQLTransactionError  # type: ignore[no-any-return]


@pytest.fixture
def poison_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    flag = tmp_path / "poison.flag"
    monkeypatch.setenv("CQRSKIT_TEST_POISON_FLAG", str(flag))
    return flag
