"""The relay's bookkeeping in its state database.

A relay is recorded like a projection (mode ``relay``, no read-model tables) in the
projector's tables, so it shares their lease, fencing, checkpoint, status, lag and
dead-letter machinery: ``cqrskit_projections`` holds its lease, ``cqrskit_checkpoints`` the
position up to which the broker acknowledged everything, ``cqrskit_dead_letters`` the
events a broker refused. One more table holds the per-partition sequence counters:

``cqrskit_relay_sequences``  (relay, partitions, partition) -> the last sequence number
                             published, committed with the checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from cqrskit.eventlog import StoredEvent
from cqrskit.projections import schema
from cqrskit.projections.api import Projection
from cqrskit.projections.db import Session

__all__ = ["install", "load_blocked", "load_sequences", "park", "save_sequences"]

DDL = """CREATE TABLE IF NOT EXISTS cqrskit_relay_sequences (
    relay TEXT NOT NULL,
    partitions INTEGER NOT NULL,
    partition INTEGER NOT NULL,
    sequence BIGINT NOT NULL,
    PRIMARY KEY (relay, partitions, partition))"""


async def install(session: Session, identity: Projection) -> schema.ProjectionRow:
    """Create the tables if missing and the relay's row (mode ``relay``) if new."""
    row = await schema.ensure_projection(session, identity, "relay")
    await session.execute(DDL)
    return row


async def load_sequences(session: Session, relay: str, partitions: int) -> dict[int, int]:
    """Partition -> last published sequence number (absent: nothing published yet)."""
    rows = await session.fetchall(
        "SELECT partition, sequence FROM cqrskit_relay_sequences "
        "WHERE relay = ? AND partitions = ?",
        relay,
        partitions,
    )
    return {int(p): int(s) for p, s in rows}


async def save_sequences(
    session: Session, relay: str, partitions: int, sequences: Iterable[tuple[int, int]]
) -> None:
    """Store the last sequence number of each given partition."""
    rows = [(relay, partitions, p, s) for p, s in sequences]
    if rows:
        await session.executemany(
            "INSERT INTO cqrskit_relay_sequences (relay, partitions, partition, sequence) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (relay, partitions, partition) "
            "DO UPDATE SET sequence = excluded.sequence",
            rows,
        )


async def park(
    session: Session, relay: str, generation: int, event: StoredEvent, reason: str
) -> None:
    """Record ``event`` as refused (a dead letter of the relay)."""
    await session.execute(
        "INSERT INTO cqrskit_dead_letters (projection, generation, position, stream, "
        "version, type, error, attempts, parked_at) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?) "
        "ON CONFLICT (projection, generation, position) DO NOTHING",
        relay,
        generation,
        event.position,
        event.stream,
        event.version,
        event.type,
        reason[:2000],
        time.time(),
    )


async def load_blocked(session: Session, relay: str, generation: int) -> set[str]:
    """Streams with a parked event: their later events are parked too, in order."""
    rows = await session.fetchall(
        "SELECT DISTINCT stream FROM cqrskit_dead_letters WHERE projection = ? AND generation = ?",
        relay,
        generation,
    )
    return {str(r[0]) for r in rows}
