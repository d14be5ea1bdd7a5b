"""Message bases: ``Command[R]``, ``Query[R]``, ``Event`` and per-dispatch ``Metadata``.

The bases are empty, slot-less markers: subclass them with a frozen dataclass, a pydantic
model or a msgspec ``Struct``. The type parameter of ``Command`` and ``Query`` is the
handler's result type; the mediator's ``send``/``ask`` return it, and type checkers infer
it from the message.
"""

from __future__ import annotations

import inspect
import itertools
import os
import time
import typing
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

__all__ = ["Command", "Event", "Message", "Metadata", "Query", "result_type"]

R_co = TypeVar("R_co", covariant=True)


class Message:
    """Common base of commands, queries and events."""

    __slots__ = ()


class Command(Message, Generic[R_co]):
    """A request to change state, handled by exactly one handler returning ``R_co``."""

    __slots__ = ()


class Query(Message, Generic[R_co]):
    """A request to read state, handled by exactly one handler returning ``R_co``.

    A streaming query declares ``Query[AsyncIterator[Row]]`` and is consumed with
    ``mediator.stream(query)``.
    """

    __slots__ = ()


class Event(Message):
    """Something that happened; delivered to any number of handlers."""

    __slots__ = ()


_LOW_54 = (1 << 54) - 1
_HEX2 = tuple(f"{i:02x}" for i in range(256))
_D3 = tuple(f"{i:03d}" for i in range(1000))

_high = ""  # the ids' first 16 hex digits: 60 random bits and the uuid4 version nibble
_blocks = itertools.count()
_ids: Iterator[str] = iter(())


def result_type(message_type: type) -> Any:
    """The ``R`` in ``class X(Command[R])`` or ``Query[R]`` (possibly a string forward
    reference), or ``inspect.Parameter.empty`` when the class declares none."""
    for base in getattr(message_type, "__orig_bases__", ()):
        origin = typing.get_origin(base)
        if isinstance(origin, type) and issubclass(origin, Message):
            args = typing.get_args(base)
            if args:
                return args[0]
    return inspect.Parameter.empty


def _seed() -> None:
    """Fresh random bits and block counter (at import and in every forked child, which
    also drops the ids its parent had made ahead)."""
    global _high, _blocks, _ids
    _high = "%016x" % (int.from_bytes(os.urandom(8)) & ~0xF000 | 0x4000)
    _blocks = itertools.count(int.from_bytes(os.urandom(8)) >> 11)
    _ids = iter(())


_seed()
if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_seed)


def _new_id() -> str:
    """A unique id in the layout of a hex uuid4: 60 random bits per process and a 62-bit
    counter (no system call per id, unlike ``uuid4()``; a forked child draws new bits).

    Ids are made 256 at a time (one block of the counter): taking the next one costs a
    step of an iterator, where formatting a 128-bit integer per id cost ~3x more."""
    for made in _ids:
        return made
    return _next_block()


def _next_block() -> str:
    """Make the next 256 ids: the low 64 bits are the variant bits (10), the block number
    and a byte. Threads that run out at once each take a block of their own."""
    global _ids
    head = _high + "%014x" % (next(_blocks) & _LOW_54 | 1 << 55)
    ids = _ids = iter([head + byte for byte in _HEX2])
    return next(ids)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_iso_cache: tuple[int | None, str] = (None, "")  # (second, its text): swapped as one


def _iso_utc(ns: int) -> str:
    """``ns`` (nanoseconds since the epoch) as ISO 8601 UTC with microseconds, a fixed
    width: the date and time part is formatted once per second, the fraction from two
    table lookups (formatting it with ``:06d`` cost ~2x more)."""
    global _iso_cache
    second, rest = divmod(ns, 1_000_000_000)
    cached, prefix = _iso_cache
    if second != cached:
        t = time.gmtime(second)
        prefix = (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}."
        )
        _iso_cache = (second, prefix)
    return f"{prefix}{_D3[rest // 1_000_000]}{_D3[rest // 1000 % 1000]}+00:00"


class Metadata:
    """Identity and lineage of one dispatch, created only when something asks for it.

    A handler or behavior receives it by declaring a parameter annotated ``Metadata``.
    Ids and the timestamp are generated on first access, so a dispatch that never reads them
    never pays for a uuid or a clock read.

    Attributes:
        message_id: unique id of this message (32 hex digits laid out as a uuid4).
        correlation_id: id shared by every message caused, directly or not, by one origin.
        causation_id: the ``message_id`` of the message whose handling caused this one.
        timestamp: when the dispatch started (UTC).
    """

    __slots__ = (
        "_message_id",
        "_correlation_id",
        "_timestamp",
        "_ns",
        "causation_id",
        "parent",
    )

    def __init__(
        self,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        timestamp: datetime | None = None,
        parent: Metadata | None = None,
    ) -> None:
        self._message_id = message_id
        self._correlation_id = correlation_id
        self._timestamp = timestamp
        self._ns: int | None = None
        self.parent = parent
        if parent is not None and causation_id is None:
            causation_id = parent.message_id
        self.causation_id = causation_id

    @property
    def message_id(self) -> str:
        """Unique id of the message (generated on first access)."""
        mid = self._message_id
        if mid is None:
            mid = self._message_id = _new_id()
        return mid

    @property
    def correlation_id(self) -> str:
        """The origin's id: inherited from the parent dispatch, else this message's id."""
        cid = self._correlation_id
        if cid is None:
            cid = self.parent.correlation_id if self.parent is not None else self.message_id
            self._correlation_id = cid
        return cid

    @property
    def timestamp(self) -> datetime:
        """When the dispatch started, UTC (read on first access)."""
        ts = self._timestamp
        if ts is None:
            ns = self._ns
            if ns is None:
                ns = self._ns = time.time_ns()
            ts = self._timestamp = _EPOCH + timedelta(microseconds=ns // 1000)
        return ts

    def timestamp_iso(self) -> str:
        """:attr:`timestamp` as ISO 8601 text, computed without building the datetime when
        it has not been read yet (then always with microseconds)."""
        ts = self._timestamp
        if ts is not None:
            return ts.isoformat()
        ns = self._ns
        if ns is None:
            ns = self._ns = time.time_ns()
        return _iso_utc(ns)

    def _event_lineage(self) -> tuple[str, str, str, str]:
        """What the events recorded while handling this message carry: their message-id
        prefix and causation id (this message's id), correlation id and timestamp text —
        the properties' values, read in one call."""
        mid = self._message_id
        if mid is None:
            mid = self._message_id = _new_id()
        cid = self._correlation_id
        if cid is None:  # the correlation_id property, inline
            parent = self.parent
            cid = self._correlation_id = mid if parent is None else parent.correlation_id
        ts = self._timestamp
        if ts is not None:
            return mid, cid, mid, ts.isoformat()
        ns = self._ns
        if ns is None:
            ns = self._ns = time.time_ns()
        return mid, cid, mid, _iso_utc(ns)

    def as_dict(self) -> dict[str, str | None]:
        """Return the ids and the ISO timestamp as a JSON-ready dict."""
        return {
            "message_id": self.message_id,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "timestamp": self.timestamp_iso(),
        }

    def __repr__(self) -> str:
        return (
            f"Metadata(message_id={self.message_id!r}, correlation_id={self.correlation_id!r}, "
            f"causation_id={self.causation_id!r})"
        )


_new_object = object.__new__


def _metadata_of(parent: Metadata | None) -> Metadata:
    """``Metadata(parent=parent)`` without the keyword call: the metadata a dispatch makes
    when something first asks for it (~40 % fewer instructions)."""
    md: Metadata = _new_object(Metadata)
    md._message_id = md._correlation_id = md._timestamp = md._ns = md.causation_id = None
    md.parent = parent
    if parent is not None:
        md.causation_id = parent.message_id
    return md
