"""Applying events to one projection generation, with poison-event parking.

A batch is first applied on the fast path: every event in one transaction, no savepoints,
the handlers' writes queued and sent together (:mod:`cqrskit.projections.batch`). If a
handler or a statement fails, the caller rolls the transaction back and re-applies the
batch on the careful path: one savepoint per event, each statement sent when the handler
issues it (so a failing statement fails its own event, and a handler that catches its own
statement's error sees it as before), bounded attempts, and a failing event parked in
``cqrskit_dead_letters`` (with the later events of its stream when order matters).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from cqrskit.eventlog import EventStore, StoredEvent
from cqrskit.messages import Event
from cqrskit.projections.api import Handler, Projection, ProjectionContext
from cqrskit.projections.batch import BatchContext, BatchSession
from cqrskit.projections.db import Session

__all__ = ["Applier", "as_decoder"]

_MAX_ERROR = 2000
_UNSEEN: Any = object()


def as_decoder(decoder: Any) -> Callable[[StoredEvent], Event]:
    """Accept a callable or an object with ``decode_stored`` (a serializer)."""
    decode = getattr(decoder, "decode_stored", decoder)
    if not callable(decode):
        raise TypeError(f"not a decoder: {decoder!r}")
    return decode  # type: ignore[no-any-return]


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]


class Applier:
    """Applies stored events to one projection; shared by inline and async modes.

    Args:
        projection: the projection.
        decoder: stored event -> event object.
        max_attempts: attempts of one event on the careful path before it is parked.
        batch_writes: queue the handlers' writes on the fast path and send them together
            (``False``: each statement is sent when the handler issues it).
    """

    def __init__(
        self,
        projection: Projection,
        decoder: Any,
        *,
        max_attempts: int = 3,
        batch_writes: bool = True,
    ) -> None:
        self.projection = projection
        self._decode = as_decoder(decoder)
        # a serializer's registry lets unhandled types be skipped without decoding them
        types = getattr(decoder, "event_types", None)
        self._type_for: Callable[[str], type] | None = getattr(types, "type_for", None)
        self.max_attempts = max(1, max_attempts)
        self.batch_writes = batch_writes
        # stored type name -> handler, or None for types this projection ignores
        self._by_name: dict[str, Handler | None] = {}
        self.blocked: set[str] = set()
        #: the highest position this applier parked (an upper bound: its transaction may
        #: have rolled back)
        self.last_parked = 0
        # handlers that need their statements run at once (see projections.batch)
        self._unbatched: set[Any] = set()

    async def apply_one(self, ctx: ProjectionContext, stored: StoredEvent) -> None:
        """Decode ``stored`` and run its handler (events of other types are skipped)."""
        name = stored.type
        handler = self._by_name.get(name, _UNSEEN)
        if handler is None:
            return
        if handler is not _UNSEEN:
            event = self._decode(stored)
        elif self._type_for is not None:
            handler = self._by_name[name] = self._handler_by_name(name)
            if handler is None:
                return
            event = self._decode(stored)
        else:
            event = self._decode(stored)
            handler = self._by_name[name] = self.projection.handler_for(type(event))
            if handler is None:
                return
        ctx.stored = stored
        session = ctx.session
        if isinstance(session, BatchSession):
            await session.call(handler, event, ctx)
        else:
            await handler(event, ctx)

    def _handler_by_name(self, name: str) -> Handler | None:
        # A type this process cannot decode is not known to be irrelevant: a newer release
        # may handle it (a rolling upgrade). Its SerializationError propagates, so the
        # event is parked with the reason — retried after the upgrade — never skipped.
        assert self._type_for is not None
        return self.projection.handler_for(self._type_for(name))

    def context(
        self, session: Session, generation: int, *, batched: bool = False
    ) -> ProjectionContext:
        """A handler context writing ``generation``'s tables through ``session``; when
        ``batched``, its writes are queued until a read, a savepoint or :meth:`flush`
        (see projections.batch)."""
        tables = self.projection.physical_tables(generation, session.qualify)
        if batched:
            return BatchContext(BatchSession(session, self._unbatched), generation, tables)
        return ProjectionContext(session, generation, tables)

    @staticmethod
    async def flush(ctx: ProjectionContext) -> None:
        """Send the writes ``ctx``'s handlers queued."""
        session = ctx.session
        if isinstance(session, BatchSession):
            await session.flush()

    async def apply_fast(
        self, session: Session, generation: int, events: Sequence[StoredEvent]
    ) -> None:
        """Apply a batch with no savepoints; raises on the first handler or statement error."""
        ctx = self.context(session, generation, batched=self.batch_writes)
        batch = ctx.session if isinstance(ctx.session, BatchSession) else None
        call = batch.call if batch is not None else _call
        blocked = self.blocked
        by_name = self._by_name
        decode = self._decode
        # the per-event hot path of a catch-up: apply_one inlined for known types
        for stored in events:
            if blocked and stored.stream in blocked:
                await self.park(ctx.session, generation, stored, _blocked_text(stored), 0)
                continue
            handler = by_name.get(stored.type, _UNSEEN)
            if handler is None:
                continue
            if handler is _UNSEEN:
                await self.apply_one(ctx, stored)
                continue
            ctx.stored = stored
            await call(handler, decode(stored), ctx)
        if batch is not None:
            await batch.flush()

    async def apply_careful(
        self, session: Session, generation: int, events: Sequence[StoredEvent]
    ) -> int:
        """Apply a batch event by event in savepoints; park failures. Return how many parked."""
        ctx = self.context(session, generation)
        parked = 0
        for stored in events:
            if self.blocked and stored.stream in self.blocked:
                await self.park(session, generation, stored, _blocked_text(stored), 0)
                parked += 1
                continue
            error = await self._attempt(session, ctx, stored)
            if error is not None:
                await self.park(session, generation, stored, error, self.max_attempts)
                parked += 1
        return parked

    async def _attempt(
        self, session: Session, ctx: ProjectionContext, stored: StoredEvent
    ) -> str | None:
        """Try ``max_attempts`` times; return the last error text, or ``None`` on success."""
        error = None
        for _ in range(self.max_attempts):
            try:
                async with session.savepoint():
                    await self.apply_one(ctx, stored)
            except Exception as exc:  # a handler failure is data: park it
                if infrastructure_fault(exc):
                    raise  # not the event's fault: the worker restarts and tries again
                error = _error_text(exc)
                continue
            return None
        return error

    async def park(
        self,
        session: Session,
        generation: int,
        stored: StoredEvent,
        error: str,
        attempts: int,
    ) -> None:
        """Record ``stored`` as a dead letter of this projection generation."""
        await session.execute(
            "INSERT INTO cqrskit_dead_letters (projection, generation, position, stream, "
            "version, type, error, attempts, parked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            self.projection.name,
            generation,
            stored.position,
            stored.stream,
            stored.version,
            stored.type,
            error,
            attempts,
            time.time(),
        )
        if stored.position > self.last_parked:
            self.last_parked = stored.position
        if self.projection.ordered_streams:
            self.blocked.add(stored.stream)

    async def load_blocked(self, session: Session, generation: int) -> None:
        """Reload the streams blocked by parked events (after a rollback or a takeover)."""
        self.blocked = set()
        if not self.projection.ordered_streams:
            return
        rows = await session.fetchall(
            "SELECT DISTINCT stream FROM cqrskit_dead_letters "
            "WHERE projection = ? AND generation = ?",
            self.projection.name,
            generation,
        )
        self.blocked = {r[0] for r in rows}

    async def retry_requested(self, session: Session, generation: int, store: EventStore) -> int:
        """Re-apply dead letters flagged for retry, per stream in order; return how many
        succeeded. A stream stops at its first event that fails again."""
        rows = await session.fetchall(
            "SELECT position, stream, version FROM cqrskit_dead_letters "
            "WHERE projection = ? AND generation = ? AND retry = 1 ORDER BY position",
            self.projection.name,
            generation,
        )
        ctx = self.context(session, generation)
        done = 0
        failed: set[str] = set()
        name = self.projection.name
        for position, stream, version in rows:
            if stream in failed:
                continue
            found = [
                e
                for e in await store.read_stream(stream, int(version) - 1)
                if e.position == position
            ]
            error = await self._attempt(session, ctx, found[0]) if found else "event not in the log"
            key = (name, generation, position)
            if error is None:
                await session.execute(
                    "DELETE FROM cqrskit_dead_letters "
                    "WHERE projection = ? AND generation = ? AND position = ?",
                    *key,
                )
                done += 1
                continue
            failed.add(stream)
            await session.execute(
                "UPDATE cqrskit_dead_letters SET error = ?, attempts = attempts + ?, "
                "parked_at = ? WHERE projection = ? AND generation = ? AND position = ?",
                error,
                self.max_attempts,
                time.time(),
                *key,
            )
        # clear only the requests read above (those still parked: failed again, or behind
        # a failure); one committed since then (another stream's) stays set for next time
        for position, stream, _ in rows:
            if stream in failed:
                await session.execute(
                    "UPDATE cqrskit_dead_letters SET retry = 0 "
                    "WHERE projection = ? AND generation = ? AND position = ?",
                    name,
                    generation,
                    position,
                )
        await self.load_blocked(session, generation)
        return done


async def _call(handler: Handler, event: Event, ctx: ProjectionContext) -> None:
    await handler(event, ctx)


def _blocked_text(stored: StoredEvent) -> str:
    return f"not applied: an earlier event of stream {stored.stream!r} is parked"


_FAULT_SQLSTATES = frozenset({"40001", "40P01", "53300", "55P03", "57P01", "57P02", "57P03"})


def infrastructure_fault(error: BaseException) -> bool:
    """Whether ``error`` (or one of its causes) is a database or connection fault — a lost
    connection, a deadlock, a lock timeout, a locked SQLite file — rather than a bug in the
    projection's handler. Such an event is retried by the restarted worker, never parked."""
    seen: BaseException | None = error
    for _ in range(16):
        if seen is None:
            return False
        if isinstance(seen, ConnectionError):
            return True
        code = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(code, str) and (code.startswith("08") or code in _FAULT_SQLSTATES):
            return True
        if type(seen).__name__ == "OperationalError" and (
            "database is locked" in str(seen) or "disk I/O error" in str(seen)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
