"""The PostgreSQL write side for read-side tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
from tests.support.bank import serializer

from cqrskit.eventlog import StoredEvent
from cqrskit.messages import Event
from cqrskit.postgres import PostgresEventStore


class PgTestLog(PostgresEventStore):
    """A :class:`PostgresEventStore` with a one-call append for tests."""

    @property
    def hooks(self) -> list[Any]:
        return self._hooks

    async def append(self, stream: str, *events: Event) -> Sequence[StoredEvent]:
        """Commit ``events`` to ``stream`` in one unit of work; return them as stored."""
        before = await self.stream_version(stream)
        uow = await self.begin()
        uow.record(stream, *events, expected_version=before)
        await uow.commit()
        return await self.read_stream(stream, before)


async def open_pg_log(dsn: str, schema: str, *, notify: bool = False) -> PgTestLog:
    store = await PgTestLog.open(dsn, schema=schema, encoder=serializer.encode, notify=notify)
    assert isinstance(store, PgTestLog)
    return store


async def from_env() -> PgTestLog:
    """Store factory for projector subprocesses (DSN and schema from the environment)."""
    import os

    return await open_pg_log(
        os.environ["CQRSKIT_TEST_PG_DSN"], os.environ["CQRSKIT_TEST_PG_SCHEMA"]
    )


async def invariants(dsn: str, write_schema: str, read: str) -> dict[str, int]:
    """Compare the bank read model in ``read`` with the log: lost, double-applied, reordered
    and wrong-sum counts (all 0 when the projection is exact)."""
    conn = await asyncpg.connect(dsn)
    try:
        expected = {
            r[0]: (int(r[1]), int(r[2]))
            for r in await conn.fetch(
                "SELECT stream, sum((data::jsonb ->> 'amount')::bigint), count(*) "
                f'FROM "{write_schema}".cqrskit_events GROUP BY stream'
            )
        }
        got = {
            r[0]: (int(r[1]), int(r[2]))
            for r in await conn.fetch(f'SELECT id, balance, applied FROM "{read}".accounts')
        }
        reordered = await conn.fetchval(f'SELECT count(*) FROM "{read}".order_errors')
    finally:
        await conn.close()
    lost = sum(max(0, e[1] - got.get(s, (0, 0))[1]) for s, e in expected.items())
    double = sum(max(0, g[1] - expected.get(s, (0, 0))[1]) for s, g in got.items())
    wrong = sum(1 for s, e in expected.items() if got.get(s, (0, 0))[0] != e[0])
    return {"lost": lost, "double": double, "reordered": int(reordered), "wrong_sum": wrong}
