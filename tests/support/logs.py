"""What the shared read-side tests need from a write side (SQLite or PostgreSQL)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from cqrskit.eventlog import EventStore, StoredEvent
from cqrskit.messages import Event
from cqrskit.pipeline import ScopedBehavior


class AppendLog(Protocol):
    """An event store with a one-call ``append`` and access to its inline hooks."""

    @property
    def hooks(self) -> list[Any]: ...

    async def append(self, stream: str, *events: Event) -> Sequence[StoredEvent]: ...

    async def head(self) -> int: ...

    async def last_position(self) -> int: ...

    def transaction(self) -> ScopedBehavior: ...

    def resolver(self) -> Any: ...


__all__ = ["EventStore", "AppendLog"]
