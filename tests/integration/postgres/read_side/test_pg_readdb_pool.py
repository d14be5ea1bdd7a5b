"""PostgresReadDatabase opens one pool, however many sessions start at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import cqrskit.postgres.readdb as readdb
from cqrskit.postgres import PostgresReadDatabase

pytestmark = pytest.mark.postgres


async def test_concurrent_first_sessions_share_one_pool(
    postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[Any] = []
    real = readdb.asyncpg.create_pool

    async def counting(*args: Any, **kwargs: Any) -> Any:
        pool = await real(*args, **kwargs)
        created.append(pool)
        return pool

    monkeypatch.setattr(readdb.asyncpg, "create_pool", counting)
    db = PostgresReadDatabase(postgres_dsn, schema=pg_schema)

    async def query() -> int:
        async with db.read_only() as s:
            return int(await s.fetchval("SELECT 1"))

    try:
        assert await asyncio.gather(*(query() for _ in range(12))) == [1] * 12
    finally:
        await db.close()
    assert len(created) == 1  # before: one pool per concurrent first session, all but one leaked
