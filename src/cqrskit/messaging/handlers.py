"""Event handlers with side effects outside the read database, fed by a broker.

A handler that sends mail or calls an API cannot join the read database's transaction, so
it cannot be effectively once: it gets **at-least-once** delivery. The consumer calls it,
then records the message id in an inbox (``cqrskit_inbox``) in the same transaction as the
partition's checkpoint, then acknowledges the broker. A crash between the call and that
commit calls the handler again for the same message (same message id: make the side effect
idempotent with it — a handler declaring ``metadata: Metadata`` sees it as
``metadata.causation_id`` — e.g. as the mail's or the payment's idempotency key); everything
recorded in the inbox or the checkpoint is never handled again. A handler that keeps
failing is parked after ``max_attempts`` like a projection's event, holding its stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cqrskit.eventlog import StoredEvent
from cqrskit.mediator import Mediator
from cqrskit.messages import Event, Metadata
from cqrskit.messaging import intake
from cqrskit.messaging.targets import Checkpoint, Lane, Target
from cqrskit.projections.api import Projection
from cqrskit.projections.apply import as_decoder
from cqrskit.projections.db import ReadDatabase, Session, check_identifier

__all__ = ["EventHandlers", "HandlerTarget"]

DDL = """CREATE TABLE IF NOT EXISTS cqrskit_inbox (
    consumer TEXT NOT NULL,
    message_id TEXT NOT NULL,
    handled_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (consumer, message_id))"""

_CHUNK = 500
_PRUNE_EVERY = 600.0


@dataclass(frozen=True, slots=True)
class EventHandlers:
    """In-process event handlers run by a :class:`~cqrskit.messaging.Consumer`: at least
    once, deduplicated by an inbox keyed by message id (see the module docs).

    Args:
        name: the consumer group's name (a SQL identifier), e.g. ``"mailer"``.
        handlers: a :class:`~cqrskit.Mediator` — its registry's event handlers run exactly
            as in-process publishing runs them, inside a scope whose
            :class:`~cqrskit.Metadata` continues the event's lineage (a handler declaring
            ``metadata: Metadata`` sees the event's message id as ``causation_id`` and its
            correlation id) — or any ``async def publish(event)``.
        ordered_streams: a parked event holds the later events of its stream.
        inbox_days: inbox rows older than this are pruned (the checkpoint still drops
            redelivered messages by sequence; the inbox also catches a relay's
            republished copy under a new sequence number within this window).
    """

    name: str
    handlers: Mediator | Callable[[Event], Awaitable[Any]]
    ordered_streams: bool = True
    inbox_days: float = 7.0

    def __post_init__(self) -> None:
        check_identifier(self.name, "event handlers name")

    async def deliver(self, event: Event, stored: StoredEvent) -> None:
        """Run the handlers for ``event`` (decoded from ``stored``)."""
        handlers = self.handlers
        if not isinstance(handlers, Mediator):
            await handlers(event)
            return
        md = stored.metadata
        lineage = Metadata(
            message_id=_text(md.get("message_id")),
            correlation_id=_text(md.get("correlation_id")),
            causation_id=_text(md.get("causation_id")),
        )
        async with handlers.scope(metadata=lineage):
            await handlers.publish(event)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


class HandlerTarget(Target):
    """Runs :class:`EventHandlers` for a consumer (see the module docs)."""

    def __init__(
        self, handlers: EventHandlers, decoder: Any, max_attempts: int, max_bytes: int
    ) -> None:
        super().__init__(decoder, max_attempts, max_bytes)
        self.handlers = handlers
        self.name = handlers.name
        self.identity = Projection(handlers.name, tables={})
        self._decode = as_decoder(decoder)
        self.blocked: set[str] = set()
        self._pruned = 0.0

    async def install(self, session: Session) -> None:
        await super().install(session)
        await session.execute(DDL)

    async def load(self, session: Session, generation: int) -> None:
        self.blocked = set()
        if self.handlers.ordered_streams:
            rows = await session.fetchall(
                "SELECT DISTINCT stream FROM cqrskit_dead_letters WHERE projection = ? "
                "AND generation = ? AND position > 0",
                self.name,
                generation,
            )
            self.blocked = {str(r[0]) for r in rows}

    async def _call(self, stored: StoredEvent) -> str | None:
        """Decode and publish with bounded attempts; the last error text, or ``None``."""
        error: str | None = None
        for attempt in range(self.max_attempts):
            try:
                await self.handlers.deliver(self._decode(stored), stored)
                return None
            except Exception as exc:  # noqa: BLE001 - a failing handler is data: parked
                error = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < self.max_attempts:
                await asyncio.sleep(min(1.0, 0.05 * 2**attempt))
        return error

    async def _seen(self, read_db: ReadDatabase, ids: list[str]) -> set[str]:
        seen: set[str] = set()
        if not ids:
            return seen
        async with read_db.read_only() as s:
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i : i + _CHUNK]
                marks = ", ".join("?" for _ in chunk)
                rows = await s.fetchall(
                    "SELECT message_id FROM cqrskit_inbox WHERE consumer = ? "
                    f"AND message_id IN ({marks})",
                    self.name,
                    *chunk,
                )
                seen.update(str(r[0]) for r in rows)
        return seen

    async def write(
        self, read_db: ReadDatabase, batch: intake.Batch, lane: Lane, checkpoint: Checkpoint
    ) -> None:
        ids = [_id(i.stored) for i in batch.items if i.kind == "apply" and i.stored]
        seen = await self._seen(read_db, ids)
        handled, parks = await self._run(batch.items, seen)
        async with read_db.transaction(hold=lane.hold) as s:
            await self._record(s, handled)
            for item, reason in parks:
                await self._park(s, lane, item, reason)
            await checkpoint(s)
            now = time.monotonic()
            if now - self._pruned > _PRUNE_EVERY:
                self._pruned = now
                await s.execute(
                    "DELETE FROM cqrskit_inbox WHERE consumer = ? AND handled_at < ?",
                    self.name,
                    time.time() - self.handlers.inbox_days * 86400,
                )

    async def _run(
        self, items: Sequence[intake.Item], seen: set[str]
    ) -> tuple[list[str], list[tuple[intake.Item, str]]]:
        handled: list[str] = []
        parks: list[tuple[intake.Item, str]] = []
        blocked = set(self.blocked)
        for item in items:
            stored = item.stored
            if item.kind != "apply" or stored is None:
                parks.append((item, item.reason))
                if item.kind == "park" and stored is not None and self.handlers.ordered_streams:
                    blocked.add(stored.stream)
                continue
            if stored.stream in blocked:
                reason = f"not handled: an earlier event of stream {stored.stream!r} is parked"
                parks.append((intake.Item("park", item.delivery, stored), reason))
                continue
            message_id = _id(stored)
            if message_id in seen:
                continue
            error = await self._call(stored)
            if error is None:
                handled.append(message_id)
                seen.add(message_id)
            else:
                parks.append((intake.Item("park", item.delivery, stored), error))
                if self.handlers.ordered_streams:
                    blocked.add(stored.stream)
        return handled, parks

    async def _record(self, s: Session, handled: list[str]) -> None:
        if handled:
            now = time.time()
            await s.executemany(
                "INSERT INTO cqrskit_inbox (consumer, message_id, handled_at) VALUES (?, ?, ?) "
                "ON CONFLICT (consumer, message_id) DO NOTHING",
                [(self.name, m, now) for m in handled],
            )

    async def _park(self, s: Session, lane: Lane, item: intake.Item, reason: str) -> None:
        gen = lane.generation
        if item.kind == "reject" or item.stored is None:
            await intake.reject(
                s, self.name, gen, lane.partition, item.delivery, reason, self.max_bytes
            )
            return
        stored = item.stored
        await s.execute(
            "INSERT INTO cqrskit_dead_letters (projection, generation, position, stream, "
            "version, type, error, attempts, parked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (projection, generation, position) DO NOTHING",
            self.name,
            gen,
            stored.position,
            stored.stream,
            stored.version,
            stored.type,
            reason[:2000],
            self.max_attempts,
            time.time(),
        )
        await intake.save_message(
            s, self.name, gen, stored.position, lane.partition, item.delivery, self.max_bytes
        )
        if self.handlers.ordered_streams:
            self.blocked.add(stored.stream)

    async def write_items(self, s: Session, items: Sequence[intake.Item], lane: Lane) -> None:
        handled, parks = await self._run(items, set())
        await self._record(s, handled)
        for item, reason in parks:
            await self._park(s, lane, item, reason)

    async def attempt(self, session: Session, generation: int, stored: StoredEvent) -> str | None:
        error = await self._call(stored)
        if error is None:
            await self._record(session, [_id(stored)])
        return error


def _id(stored: StoredEvent) -> str:
    return str(stored.metadata.get("message_id") or f"position-{stored.position}")
