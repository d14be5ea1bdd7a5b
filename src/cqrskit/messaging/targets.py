"""What a consumer writes a batch into: a projection (this module) or event handlers
(:mod:`cqrskit.messaging.handlers`).

A :class:`Target` turns a classified batch (:class:`~cqrskit.messaging.intake.Batch`) into
one read-database transaction that ends with the partition's fenced checkpoint, and
re-applies parked messages flagged for retry. :class:`ProjectionTarget` runs the
projection's handlers through the projector's own :class:`~cqrskit.projections.apply.Applier`
(fast path in one transaction; on a handler error, the careful path with a savepoint per
event and bounded attempts), so a projection behaves the same fed by the log or a broker.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cqrskit.eventlog import StoredEvent
from cqrskit.messaging import intake
from cqrskit.messaging.envelope import Envelope
from cqrskit.messaging.source import Delivery
from cqrskit.projections import schema
from cqrskit.projections.api import Projection, ProjectionContext
from cqrskit.projections.apply import Applier, infrastructure_fault
from cqrskit.projections.db import ReadDatabase, Session
from cqrskit.projections.partitions import PartitionLostError, PartitionState

__all__ = ["Lane", "ProjectionTarget", "Target"]

log = logging.getLogger("cqrskit.messaging")

Checkpoint = Callable[[Session], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Lane:
    """One partition's context, as a target sees it.

    Attributes:
        partition: the partition.
        generation: the projection's active generation.
        read: a delivery -> its trusted envelope, or why it is rejected.
        plan: classify deliveries against a checkpoint (see :func:`intake.plan_batch`).
        checkpoint: a checkpoint state -> the fenced statement that stores it.
        hold: the ``hold`` of the lane's write transactions (see
            :meth:`~cqrskit.projections.ReadDatabase.transaction`): a worker frozen inside
            one cannot keep the partition's rows locked past its lease.
    """

    partition: int
    generation: int
    read: Callable[[Delivery], Envelope | str]
    plan: Callable[[Sequence[Delivery], PartitionState], intake.Batch]
    checkpoint: Callable[[PartitionState], Checkpoint]
    hold: float | None = None


class Target(ABC):
    """A consumer group's destination (see the module docs).

    Attributes:
        name: the group's name (the projection's, or the handlers').
        identity: the projection row it is recorded under.
    """

    name: str
    identity: Projection

    def __init__(self, decoder: Any, max_attempts: int, max_bytes: int) -> None:
        self.max_attempts = max(1, max_attempts)
        self.max_bytes = max_bytes
        self.known = intake.type_check(decoder)

    async def install(self, session: Session) -> None:
        """Create the target's own tables (the parked messages' wire form ...)."""
        await schema.install(session)  # on PostgreSQL: serializes concurrent DDL first
        await session.execute(intake.DDL)

    @abstractmethod
    async def load(self, session: Session, generation: int) -> None:
        """Reload what the target keeps in memory (streams held by parked events)."""

    @abstractmethod
    async def write(
        self, read_db: ReadDatabase, batch: intake.Batch, lane: Lane, checkpoint: Checkpoint
    ) -> None:
        """Write ``batch`` and ``checkpoint`` in one transaction (or the careful path's).

        Raises:
            PartitionLostError: the checkpoint's epoch moved on; nothing was committed.
        """

    @abstractmethod
    async def attempt(self, session: Session, generation: int, stored: StoredEvent) -> str | None:
        """Apply one parked event again (a retry), with bounded attempts; ``None`` on
        success, else the error text."""

    async def retry(
        self, read_db: ReadDatabase, lane: Lane, state: PartitionState
    ) -> PartitionState:
        """Re-apply ``lane``'s dead letters flagged for retry, in order; a stream stops at
        its first event that fails again. A rejected message is read again (a key added
        since may verify it) and, if trusted now, takes its place in the sequence."""
        name, gen, p = self.name, lane.generation, lane.partition
        async with read_db.transaction(hold=lane.hold) as s:
            rows = await s.fetchall(
                "SELECT d.position, d.stream, m.headers, m.body FROM cqrskit_dead_letters d "
                "JOIN cqrskit_parked_messages m ON m.projection = d.projection "
                "AND m.generation = d.generation AND m.position = d.position "
                "WHERE d.projection = ? AND d.generation = ? AND d.retry = 1 "
                "AND m.partition = ? ORDER BY d.position",
                name,
                gen,
                p,
            )
            failed: set[str] = set()
            done = 0
            for position, stream, headers, body in rows:
                position = int(position)
                delivery = Delivery(*intake.unwire(str(headers), str(body)))
                if position < 0:
                    error, state = await self._retry_rejected(s, lane, state, delivery)
                elif stream in failed:
                    continue
                else:
                    error = await self._retry_parked(s, lane, delivery)
                    if error is not None:
                        failed.add(str(stream))
                if error is None:
                    done += 1
                    await _forget(s, name, gen, position)
                else:
                    await s.execute(
                        "UPDATE cqrskit_dead_letters SET error = ?, attempts = attempts + 1, "
                        "parked_at = ?, retry = 0 WHERE projection = ? AND generation = ? "
                        "AND position = ?",
                        error[:2000],
                        time.time(),
                        name,
                        gen,
                        position,
                    )
            # rows left behind a stream that failed again: not retried this time
            await s.execute(
                "UPDATE cqrskit_dead_letters SET retry = 0 WHERE projection = ? "
                "AND generation = ? AND retry = 1 AND position IN (SELECT m.position "
                "FROM cqrskit_parked_messages m WHERE m.projection = ? AND m.generation = ? "
                "AND m.partition = ?)",
                name,
                gen,
                name,
                gen,
                p,
            )
            await self.load(s, gen)
            await lane.checkpoint(state)(s)
        if rows:
            log.info("consumer %s: partition %d: retried %d, %d ok", name, p, len(rows), done)
        return state

    async def _retry_rejected(
        self, s: Session, lane: Lane, state: PartitionState, delivery: Delivery
    ) -> tuple[str | None, PartitionState]:
        env = lane.read(delivery)
        if isinstance(env, str):
            return env, state
        batch = lane.plan([delivery], state)
        if batch.gap is not None:
            return (
                f"trusted now, but ahead of the partition (sequence {env.sequence}; the "
                f"partition waits for {batch.gap})",
                state,
            )
        await self.write_items(s, batch.items, lane)
        return None, batch.state

    async def _retry_parked(self, s: Session, lane: Lane, delivery: Delivery) -> str | None:
        env = lane.read(delivery)
        if isinstance(env, str):
            return env
        item = intake.admit(delivery, env, self.max_bytes, self.known)
        if item.kind != "apply":
            return item.reason
        assert item.stored is not None
        return await self.attempt(s, lane.generation, item.stored)

    @abstractmethod
    async def write_items(self, s: Session, items: Sequence[intake.Item], lane: Lane) -> None:
        """Write ``items`` inside an open transaction (the careful way)."""


async def _forget(s: Session, name: str, generation: int, position: int) -> None:
    for table in ("cqrskit_dead_letters", "cqrskit_parked_messages"):
        await s.execute(
            f"DELETE FROM {table} WHERE projection = ? AND generation = ? AND position = ?",
            name,
            generation,
            position,
        )


class _ParkingApplier(Applier):
    """The projector's applier; a parked event also keeps its message's wire form, and a
    message parked twice (redelivered before its ack) is recorded once."""

    def __init__(self, target: ProjectionTarget, projection: Projection, decoder: Any) -> None:
        super().__init__(projection, decoder, max_attempts=target.max_attempts)
        self.target = target
        self.lane: Lane | None = None
        self.items: Sequence[intake.Item] = ()
        self._messages: dict[int, Delivery] | None = None

    def message(self, position: int) -> Delivery | None:
        """The delivery of the event at ``position`` in the batch being written."""
        if self._messages is None:  # built on the first park only: the hot path skips it
            self._messages = {i.stored.position: i.delivery for i in self.items if i.stored}
        return self._messages.get(position)

    async def park(
        self, session: Session, generation: int, stored: StoredEvent, error: str, attempts: int
    ) -> None:
        await session.execute(
            "INSERT INTO cqrskit_dead_letters (projection, generation, position, stream, "
            "version, type, error, attempts, parked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (projection, generation, position) DO NOTHING",
            self.projection.name,
            generation,
            stored.position,
            stored.stream,
            stored.version,
            stored.type,
            error[:2000],
            attempts,
            time.time(),
        )
        if self.projection.ordered_streams:
            self.blocked.add(stored.stream)
        delivery = self.message(stored.position)
        if delivery is not None and self.lane is not None:
            await intake.save_message(
                session,
                self.projection.name,
                generation,
                stored.position,
                self.lane.partition,
                delivery,
                self.target.max_bytes,
            )


class ProjectionTarget(Target):
    """A projection fed by a broker (see the module docs)."""

    def __init__(
        self, projection: Projection, decoder: Any, max_attempts: int, max_bytes: int
    ) -> None:
        super().__init__(decoder, max_attempts, max_bytes)
        self.name = projection.name
        self.identity = projection
        self.applier = _ParkingApplier(self, projection, decoder)

    async def load(self, session: Session, generation: int) -> None:
        await self.applier.load_blocked(session, generation)

    async def write(
        self, read_db: ReadDatabase, batch: intake.Batch, lane: Lane, checkpoint: Checkpoint
    ) -> None:
        items = batch.items
        try:
            async with read_db.transaction(hold=lane.hold) as s:
                await self._items(s, items, lane, careful=False)
                await checkpoint(s)
            return
        except PartitionLostError:
            raise
        except Exception as exc:
            if infrastructure_fault(exc):
                raise
            log.info("consumer %s: batch failed (%s); applying event by event", self.name, exc)
        async with read_db.transaction(hold=lane.hold) as s:
            await self.applier.load_blocked(s, lane.generation)
            await self._items(s, items, lane, careful=True)
            await checkpoint(s)

    async def write_items(self, s: Session, items: Sequence[intake.Item], lane: Lane) -> None:
        await self._items(s, items, lane, careful=True)

    async def _items(
        self, s: Session, items: Sequence[intake.Item], lane: Lane, *, careful: bool
    ) -> None:
        applier, gen = self.applier, lane.generation
        applier.lane = lane
        applier.items, applier._messages = items, None
        run: list[StoredEvent] = []

        async def flush() -> None:
            if run:
                if careful:
                    await applier.apply_careful(s, gen, run)
                else:
                    await applier.apply_fast(s, gen, run)
                run.clear()

        for item in items:
            if item.kind == "apply":
                assert item.stored is not None
                run.append(item.stored)
                continue
            await flush()
            if item.kind == "park":
                assert item.stored is not None
                await applier.park(s, gen, item.stored, item.reason, 0)
            else:
                await intake.reject(
                    s, self.name, gen, lane.partition, item.delivery, item.reason, self.max_bytes
                )
        await flush()

    async def attempt(self, session: Session, generation: int, stored: StoredEvent) -> str | None:
        ctx = self.applier.context(session, generation)
        error: str | None = None
        for _ in range(self.max_attempts):
            try:
                async with session.savepoint():
                    await self.applier.apply_one(ctx, stored)
                    await _flush(self.applier, ctx)
            except Exception as exc:  # a handler failure is data: stays parked
                if infrastructure_fault(exc):
                    raise
                error = f"{type(exc).__name__}: {exc}"
                continue
            return None
        return error


async def _flush(applier: Applier, ctx: ProjectionContext) -> None:
    # statement batching (when the applier queues writes) must send them in the savepoint
    flush = getattr(applier, "flush", None)
    if flush is not None:
        await flush(ctx)
