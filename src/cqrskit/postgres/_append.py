"""The PostgreSQL store's event INSERT and the translation of its errors, methods of
:class:`~cqrskit.postgres.PostgresEventStore` defined here to keep that module short."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cqrskit.errors import ConcurrencyError, PersistenceError
from cqrskit.eventlog import NewEvent, PendingRow
from cqrskit.postgres._sql import (
    _CONFLICT_STATE,
    _literal,
    _nullable,
    _parse_conflict,
    _stream_from_detail,
)

if TYPE_CHECKING:
    from cqrskit.postgres._unitofwork import PostgresUnitOfWork
    from cqrskit.postgres.eventlog import PostgresEventStore


def columns(rows: list[PendingRow]) -> list[list[Any]]:
    """The rows' values column by column (the arrays of the INSERT ... RETURNING)."""
    cols: list[list[Any]] = [[] for _ in range(10)]
    for r in rows:
        enc = r.encoded
        md = r.metadata
        for col, value in zip(
            cols,
            (
                r.stream,
                r.index + 1,
                r.expected_version,
                enc.type,
                enc.schema_version,
                enc.data,
                md["message_id"],
                md["correlation_id"],
                md["causation_id"],
                md["timestamp"],
            ),
            strict=True,
        ):
            col.append(value)
    return cols


def render_insert(self: PostgresEventStore, uow: PostgresUnitOfWork) -> str:
    """The event INSERT of ``uow``, rendered with literals (a method of the store)."""
    # A plain multi-row VALUES insert, cheap to plan: a new stream (expected version
    # 0) needs no check (the unique index refuses version 1 if the stream exists);
    # any other stream gets its next version from the next_version function, which
    # also checks the expected version and that no younger transaction appended.
    # Rendered straight from the unit of work (UnitOfWork.pending_rows without its
    # per-row objects); the metadata literals are the same for every row.
    prefix, correlation, causation, timestamp = uow._lineage()
    uow._prefix = prefix
    events = uow._events
    if len(events) == 1 and self._writers is not None:
        # the statement prepared on every write connection (see _setup_writer)
        stream_id, event = events[0]
        first = uow._base.get(stream_id)
        enc = self._encode(event)
        kind = enc.type
        data = enc.data
        if (
            type(stream_id) is str
            and type(kind) is str
            and type(data) is str
            and type(prefix) is str
            and type(timestamp) is str
            and (correlation is None or type(correlation) is str)
            and (causation is None or type(causation) is str)
        ):
            # the commonest case in one check over all the values (see _sql._literal):
            # nothing to escape, so plain literals, the same under either setting of
            # standard_conforming_strings
            text = f"{stream_id}{kind}{data}{prefix}{correlation}{causation}{timestamp}"
            if text.isascii() and "'" not in text and "\\" not in text and "\x00" not in text:
                return (
                    f"EXECUTE cqrskit_append1('{stream_id}', "
                    f"{'NULL' if first is None else int(first)}, '{kind}', "
                    f"{int(enc.schema_version)}, '{data}', '{prefix}-0', "
                    + ("NULL, " if correlation is None else f"'{correlation}', ")
                    + ("NULL, " if causation is None else f"'{causation}', ")
                    + f"'{timestamp}'); "
                )
        lineage = f"{_nullable(correlation)}, {_nullable(causation)}, {_literal(timestamp)})"
        return (
            f"EXECUTE cqrskit_append1({_literal(stream_id)}, "
            f"{'NULL' if first is None else int(first)}, {_literal(enc.type)}, "
            f"{int(enc.schema_version)}, {_literal(enc.data)}, {_literal(prefix + '-0')}, "
            f"{lineage}; "
        )
    lineage = f"{_nullable(correlation)}, {_nullable(causation)}, {_literal(timestamp)})"
    prefix = _literal(prefix)[:-1]  # the message id literal without its closing quote
    base = "(pg_current_xact_id()::text::bigint << 20)"
    nv = self._next_version
    encode = self._encode
    bases = uow._base
    seen: dict[str, int] = {}
    values: list[str] = []
    for n, (stream_id, event) in enumerate(uow._events):
        i = seen.get(stream_id, 0)
        seen[stream_id] = i + 1
        first = bases.get(stream_id)  # the expected version before the stream's first
        enc = encode(event)
        stream = _literal(stream_id)
        if first == 0:
            version = str(i + 1)
        else:
            expected = "NULL" if first is None else str(int(first))
            version = f"{nv}({stream}, {expected}, {base}) + {i}"
        values.append(
            f"({base} + {n}, {stream}, {version}, {_literal(enc.type)}, "
            f"{int(enc.schema_version)}, {_literal(enc.data)}, {prefix}-{n}', {lineage}"
        )
    return self._sql_values + ", ".join(values) + "; "


async def translate_error(
    self: PostgresEventStore, exc: Exception, recorded: Sequence[NewEvent]
) -> Exception:
    """The error to raise for ``exc``, which the driver raised while appending
    ``recorded`` (a unit of work's events): :class:`~cqrskit.errors.ConcurrencyError`
    for a stream conflict (an expected version that did not hold, a concurrent or
    younger writer of the stream), else :class:`~cqrskit.errors.PersistenceError`."""
    state = getattr(exc, "sqlstate", None)
    if state == _CONFLICT_STATE:
        stream, actual, expected = _parse_conflict(exc)
        if getattr(exc, "hint", None) == "younger":
            return ConcurrencyError(
                f"stream {stream!r}: a transaction that started later appended version "
                f"{actual} first; this one must retry so that the stream's versions "
                "keep position order.",
                stream=stream,
                expected_version=expected,
                actual_version=actual,
                hint="retry the command (the retry behavior does it).",
            )
        return ConcurrencyError(
            f"stream {stream!r} is at version {actual}, expected {expected}.",
            stream=stream,
            expected_version=expected,
            actual_version=actual,
            hint="reload the stream and retry the command.",
        )
    if state == "23505" and "stream_version" in str(getattr(exc, "constraint_name", "")):
        dup = _stream_from_detail(getattr(exc, "detail", "") or "")
        now = None if dup is None else await self.stream_version(dup)
        expected = next((n.expected_version for n in recorded if n.stream == dup), None)
        text = (
            f"stream {dup!r} is at version {now}, expected {expected}."
            if expected is not None
            else f"another writer appended to stream {dup!r} concurrently; it is now at "
            f"version {now}."
        )
        return ConcurrencyError(
            text,
            stream=dup,
            expected_version=expected,
            actual_version=now,
            hint="reload the stream and retry the command.",
        )
    return PersistenceError(f"PostgreSQL refused the commit: {exc}")
