"""The PostgreSQL write side for read-side tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
