"""Projection write batching on PostgreSQL: the SQLite suite's bodies with this directory's
fixtures, and the parity property against unbatched application on a schema per example."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.integration.sqlite.test_projection_batching import (  # noqa: F401
    PARITY,
    Recording,
    check_parity,
    programs,
    snapshot,
    test_a_failing_statement_parks_its_own_event,
    test_a_handler_that_swallows_a_send_error_still_fails_the_batch,
    test_inline_command_with_several_events,
    test_reads_see_earlier_and_own_writes,
    test_row_counts_and_the_connection_stay_exact,
    test_statements_are_sent_together_in_order,
)
from tests.support.mix import Op, mix, serializer
from tests.support.pg_log import PgTestLog

from cqrskit.postgres import PostgresReadDatabase
from cqrskit.projections import InlineProjections, ReadDatabase
from cqrskit.projections.db import Session

pytestmark = pytest.mark.postgres


def postgres_dbs(dsn: str) -> Callable[[], AbstractAsyncContextManager[ReadDatabase]]:
    @asynccontextmanager
    async def open_db() -> AsyncIterator[ReadDatabase]:
        schema = f"cqrskit_t_{uuid.uuid4().hex[:16]}"
        db = PostgresReadDatabase(dsn, schema=schema, max_size=2)
        try:
            yield db
        finally:
            await db.close()
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

    return open_db


@PARITY
@given(ops=programs, batch=st.integers(min_value=1, max_value=15))
def test_batched_equals_unbatched_postgres(
    postgres_dsn: str, ops: list[tuple[str, str, str, int]], batch: int
) -> None:
    asyncio.run(check_parity(postgres_dbs(postgres_dsn), ops, batch))


async def test_inline_statements_and_checkpoint_go_in_one_round_trip(
    log: PgTestLog, open_read_db: Callable[..., ReadDatabase]
) -> None:
    read_db = open_read_db(write=True)
    inline = InlineProjections(read_db, [mix], serializer)
    await inline.setup()
    inline.attach(log)
    recordings: list[Recording] = []
    wrap = read_db.inline

    def recorded(connection: Any) -> Session:
        recordings.append(Recording(wrap(connection)))
        return recordings[-1]

    read_db.inline = recorded  # type: ignore[method-assign]
    await log.append("a", Op("add", "a", 1), Op("add_log", "b", 2))
    [rec] = recordings
    assert rec.calls == [
        (
            "execute_all",
            'INSERT "sums__g1"; INSERT "sums__g1"; INSERT "logs__g1"; UPDATE cqrskit_checkpoints',
            4,
        )
    ]
    sums, logs, _ = await snapshot(read_db)
    assert dict(sums) == {"a": 1, "b": 2}
    assert [(r[1], r[3]) for r in logs] == [("b", "add_log")]
