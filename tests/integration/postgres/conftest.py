"""Per-test schemas on the shared PostgreSQL test database, and throwaway clusters."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from tests.conftest import missing
from tests.support.pg_cluster import PgCluster, PgToolsMissing


@pytest.fixture
async def pg_schema(postgres_dsn: str) -> AsyncIterator[str]:
    """A fresh schema ``cqrskit_t_<hex>``, dropped after the test."""
    name = f"cqrskit_t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(postgres_dsn)
    try:
        yield name
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A started PostgreSQL cluster of this test's own (free port, temporary directory),
    which the test may stop, crash and restart; stopped and removed afterwards."""
    cluster = PgCluster()
    try:
        cluster.create()
        cluster.start()
    except PgToolsMissing as exc:
        cluster.cleanup()
        missing(str(exc), "install the PostgreSQL server package to run this test")
    except BaseException:
        cluster.cleanup()
        raise
    try:
        yield cluster
    finally:
        cluster.cleanup()
