"""Fixtures for the read-side tests on PostgreSQL: a schema per test (and a second one for
the separate-database layout), created and dropped here."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from tests.support.pg_log import PgTestLog, open_pg_log

from cqrskit.postgres import PostgresReadDatabase
from cqrskit.projections import ReadDatabase


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


@pytest.fixture(params=["same", "separate", "database"])
def layout(request: pytest.FixtureRequest) -> str:
    """Read models in the write schema, in a separate schema, or in a separate database."""
    return str(request.param)


@pytest.fixture
async def read_dsn(postgres_dsn: str, layout: str) -> AsyncIterator[str]:
    """The DSN of the read database: the write database, or one created for this test."""
    if layout != "database":
        yield postgres_dsn
        return
    name = f"cqrskit_t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield postgres_dsn.rsplit("/", 1)[0] + "/" + name
    finally:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture
def read_location(layout: str, schemas: Callable[[str], str]) -> str:
    """The schema read models live in (in the read database)."""
    return schemas("w") if layout == "same" else schemas("r")


@pytest.fixture
async def open_read_db(
    postgres_dsn: str, read_dsn: str, read_location: str, schemas: Callable[[str], str]
) -> AsyncIterator[Callable[..., ReadDatabase]]:
    opened: list[ReadDatabase] = []

    def make(name: str | None = None, *, write: bool = False) -> ReadDatabase:
        schema = schemas("w") if write else (schemas(name) if name else read_location)
        db = PostgresReadDatabase(postgres_dsn if write else read_dsn, schema=schema)
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
