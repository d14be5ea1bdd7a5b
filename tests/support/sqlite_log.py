"""The write side for read-side tests: the real SQLite event store plus an ``append`` helper."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tests.support.bank import serializer

from cqrskit.eventlog import StoredEvent
from cqrskit.messages import Event
from cqrskit.sqlite import SqliteEventStore


class SqliteTestLog(SqliteEventStore):
    """A :class:`SqliteEventStore` (JSON serializer) with a one-call append for tests."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, encoder=serializer.encode)

    @property
    def hooks(self) -> list[object]:
        return self._hooks  # type: ignore[return-value]

    async def append(self, stream: str, *events: Event) -> Sequence[StoredEvent]:
        """Commit ``events`` to ``stream`` in one unit of work; return them as stored."""
        uow = await self.begin()
        uow.record(stream, *events)
        last = await uow.commit()
        assert last is not None
        return await self.read_after(last - len(events), len(events))


def from_env() -> SqliteTestLog:
    """Store factory for projector subprocesses: the path comes from CQRSKIT_TEST_LOG."""
    return SqliteTestLog(os.environ["CQRSKIT_TEST_LOG"])
