"""Ports of the write side: the event log (which is also the outbox) and the unit of work.

One table is both the outbox and the history: every recorded event gets a global
``position`` (ordered so that positions become visible in commit order), a ``stream`` id and
a per-stream ``version``. Drivers (``cqrskit.sqlite``, ``cqrskit.postgres``) implement
:class:`EventStore`; an in-memory implementation lives in core for tests.

This module defines the seam between the write side and the read side; the read side uses
only :class:`StoredEvent`, :meth:`EventStore.read_after`, :meth:`EventStore.head` and
:meth:`EventStore.wait_for`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cqrskit.messages import Event

__all__ = ["EventStore", "NewEvent", "StoredEvent", "UnitOfWork"]


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event recorded by a handler, not yet written.

    Attributes:
        stream: the stream id (e.g. ``"account-42"``).
        event: the event object.
        expected_version: the stream version the writer expects before this event
            (``0`` = the stream must be new), or ``None`` for no check.
    """

    stream: str
    event: Event
    expected_version: int | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as read back from the log.

    Attributes:
        position: global position; a reader that has read up to ``p`` never later sees a
            new event with a position ``<= p``. Positions increase but may have gaps.
        stream: stream id.
        version: version within the stream, 1-based and contiguous.
        type: the event's stable registered name (not the Python class path).
        schema_version: version of the event's schema, for upcasting.
        data: the encoded payload (JSON text by default).
        metadata: ``message_id``, ``correlation_id``, ``causation_id``, ``timestamp`` (ISO).
    """

    position: int
    stream: str
    version: int
    type: str
    schema_version: int
    data: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


class UnitOfWork(ABC):
    """The handler's view of one command's write transaction.

    A handler declares a parameter of a driver's unit-of-work type (or this base) and:
    changes state through the driver's connection, then ``record``\\ s events. The
    transaction behavior appends the events and commits everything atomically.
    """

    @abstractmethod
    def record(self, stream: str, *events: Event, expected_version: int | None = None) -> None:
        """Record events for ``stream``; they are written with the transaction.

        ``expected_version`` is the version the stream must be at before the first of these
        events (``0`` for a new stream); a mismatch raises
        :class:`~cqrskit.errors.ConcurrencyError` at commit.
        """

    @property
    @abstractmethod
    def recorded(self) -> Sequence[NewEvent]:
        """Events recorded so far in this unit of work."""


class EventStore(ABC):
    """A driver's event log: append (through a unit of work) and read by position."""

    @abstractmethod
    async def read_after(self, position: int, limit: int = 1000) -> list[StoredEvent]:
        """Up to ``limit`` events with position ``> position``, in position order.

        Never returns an event while an event with a lower position may still commit.
        """

    @abstractmethod
    async def head(self) -> int:
        """The highest position visible to :meth:`read_after` (0 for an empty log)."""

    @abstractmethod
    async def wait_for(self, position: int, timeout: float) -> bool:
        """Wait until an event with position ``> position`` may be readable.

        A hint only (returns ``True`` on a wake-up, ``False`` on timeout); callers must
        re-read and may be woken spuriously.
        """

    @abstractmethod
    async def read_stream(self, stream: str, after_version: int = 0) -> list[StoredEvent]:
        """Events of one stream with version ``> after_version``, in version order."""
