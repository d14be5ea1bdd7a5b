"""Operations on projections: status (checkpoint, lag, dead letters), rebuild, retry."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cqrskit._partitioning import check_partitions
from cqrskit.errors import ConfigurationError
from cqrskit.eventlog import EventStore
from cqrskit.projections import schema
from cqrskit.projections.api import Projection
from cqrskit.projections.db import ReadDatabase

__all__ = [
    "DeadLetter",
    "ProjectionStatus",
    "RebuildProgress",
    "cancel_rebuild",
    "dead_letters",
    "projection_status",
    "rebuild_progress",
    "request_rebuild",
    "request_retry",
]

LAG_COUNT_CAP = 10_000


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    """Where a projection stands.

    Attributes:
        name: the projection.
        mode: ``"inline"``, ``"async"``, ``"partitioned"`` (log, split into partitions),
            ``"consumer"`` (fed by a broker) or ``"relay"`` (whoever ran it last).
        generation: the active generation; ``rebuilding``: the one being rebuilt, if any.
        checkpoint: last applied position (partitioned: the lowest partition's; see
            ``partition_status`` for each); ``head``: the log's last position.
        lag_events: events after the checkpoint (counted up to ``LAG_COUNT_CAP``;
            ``lag_capped`` says it is at least that).
        lag_seconds: age of the oldest unapplied event (0 when caught up).
        dead_letters: parked events of the active generation.
        lease_owner, lease_epoch: who holds the lease and its epoch.
        oldest_appender_pid, oldest_appender_seconds: the session (server pid) and age of
            the oldest open transaction that may still append to the event log and so
            holds every reader back at its position (PostgreSQL; ``None`` when there is
            none). See :meth:`cqrskit.eventlog.EventStore.oldest_appender`.
    """

    name: str
    mode: str
    generation: int
    rebuilding: int | None
    checkpoint: int
    head: int
    lag_events: int
    lag_capped: bool
    lag_seconds: float
    dead_letters: int
    lease_owner: str | None
    lease_epoch: int
    oldest_appender_pid: int | None = None
    oldest_appender_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A parked event: where it is, why, and how often it was tried."""

    projection: str
    generation: int
    position: int
    stream: str
    version: int
    type: str
    error: str
    attempts: int
    parked_at: float
    retry: bool


async def _lag(store: EventStore, checkpoint: int) -> tuple[int, bool, float]:
    # every committed event after the checkpoint, whether readers may read it yet or not
    # (on PostgreSQL an open appender holds reads back; the lag must still show)
    count, oldest = await store.backlog(checkpoint, LAG_COUNT_CAP + 1)
    seconds = 0.0 if oldest is None else max(0.0, time.time() - oldest)
    return min(count, LAG_COUNT_CAP), count > LAG_COUNT_CAP, seconds


async def projection_status(
    read_db: ReadDatabase, store: EventStore, names: Sequence[str] | None = None
) -> list[ProjectionStatus]:
    """The status of the named projections (all set-up ones by default), by name."""
    async with read_db.read_only() as s:
        await _require_tables(s)
        rows = await s.fetchall(
            "SELECT p.name, p.mode, p.active_generation, p.building_generation, c.position, "
            "p.lease_owner, p.lease_epoch, (SELECT count(*) FROM cqrskit_dead_letters d "
            "WHERE d.projection = p.name AND d.generation = p.active_generation) "
            "FROM cqrskit_projections p JOIN cqrskit_checkpoints c "
            "ON c.projection = p.name AND c.generation = p.active_generation ORDER BY p.name"
        )
    head = await store.last_position()
    appender = await store.oldest_appender()
    out = []
    for name, mode, gen, building, cp, owner, epoch, dead in rows:
        if names is not None and name not in names:
            continue
        if mode in ("partitioned", "consumer"):
            # its partitions' checkpoints: everything up to ``cp`` is applied, ``lag``
            # events of its partitions are not (each counted against its own partition)
            from cqrskit.projections.partitions import partitioned_lag

            cp, lag, capped, seconds = await partitioned_lag(read_db, store, name, int(cp))
        else:
            lag, capped, seconds = await _lag(store, int(cp))
        out.append(
            ProjectionStatus(
                name,
                mode,
                int(gen),
                building,
                int(cp),
                head,
                lag,
                capped,
                seconds,
                int(dead),
                owner,
                int(epoch),
                None if appender is None else appender.pid,
                None if appender is None else appender.seconds,
            )
        )
    return out


async def _require_tables(s: Any) -> None:
    # a read database nobody set up yet has no projections: say so instead of a SQL error
    try:
        async with s.savepoint():
            await s.fetchall("SELECT 1 FROM cqrskit_projections WHERE 1 = 0")
    except Exception:  # noqa: BLE001 - translated below
        raise ConfigurationError(
            "no projection was ever set up in this read database.",
            hint="start a projector or InlineProjections.setup() against it first.",
        ) from None


async def dead_letters(read_db: ReadDatabase, projection: str) -> list[DeadLetter]:
    """The parked events of ``projection``'s active generation, in position order."""
    async with read_db.read_only() as s:
        rows = await s.fetchall(
            "SELECT d.projection, d.generation, d.position, d.stream, d.version, d.type, "
            "d.error, d.attempts, d.parked_at, d.retry FROM cqrskit_dead_letters d "
            "JOIN cqrskit_projections p ON p.name = d.projection "
            "AND p.active_generation = d.generation WHERE d.projection = ? "
            "ORDER BY d.position",
            projection,
        )
    return [
        DeadLetter(
            str(r[0]),
            int(r[1]),
            int(r[2]),
            str(r[3]),
            int(r[4]),
            str(r[5]),
            str(r[6]),
            int(r[7]),
            float(r[8]),
            bool(r[9]),
        )
        for r in rows
    ]


async def request_retry(
    read_db: ReadDatabase, projection: str, *, stream: str | None = None
) -> int:
    """Flag parked events (of one stream, or all) for the projector to re-apply, in order.

    Returns how many were flagged. The lease holder retries them within
    ``state_interval``; those that fail again stay parked with more attempts.
    """
    sql = (
        "UPDATE cqrskit_dead_letters SET retry = 1 WHERE projection = ? AND generation = "
        "(SELECT active_generation FROM cqrskit_projections WHERE name = ?)"
    )
    params: list[Any] = [projection, projection]
    if stream is not None:
        sql += " AND stream = ?"
        params.append(stream)
    async with read_db.transaction() as s:
        return await s.execute(sql, *params)


async def request_rebuild(
    read_db: ReadDatabase, projection: Projection, *, partitions: int | None = None
) -> int:
    """Start a rebuild: create the next generation's empty tables; return its number.

    The projector holding the lease replays the log into them from position 0 while the
    active generation keeps serving queries, then switches the views over when caught up.
    For a partitioned projection the new generation gets partitions of its own, built by
    the :class:`~cqrskit.projections.PartitionedProjector` workers started with its number
    of partitions: ``partitions`` (to change it), else the active generation's; it switches
    over once it holds everything the active one holds (see
    :mod:`cqrskit.projections.partition_switch`). Asking again while a rebuild is pending
    returns the same generation.

    Raises:
        ConfigurationError: the projection is fed by broker consumers (a broker cannot be
            replayed from the start: rebuild from the log with partitioned workers);
            ``partitions`` for a projection that is not partitioned; ``partitions``
            other than the pending rebuild's.
    """
    from cqrskit.projections.partition_switch import prepare_build

    if partitions is not None:
        check_partitions(partitions)
    name = projection.name
    async with read_db.transaction() as s:
        await schema.install(s)
        row = await schema.load(s, name)
        mode = None if row is None else row.mode
        if mode == "consumer" and (row is None or row.building_generation is None):
            raise ConfigurationError(
                f"projection {name!r} is fed by broker consumers, which cannot rebuild it: "
                "a broker does not keep the whole log (retention).",
                hint="rebuild it from the event log: start partitioned log workers for it "
                "with the consumers' number of partitions (cqrskit projections run "
                "--partitions N ...; they may run beside the consumers), then request the "
                "rebuild again. After the switch the consumers continue on the new "
                "generation where they stopped.",
            )
        if partitions is not None and mode not in ("partitioned", "consumer"):
            raise ConfigurationError(
                f"projection {name!r} is not partitioned (mode {mode or 'not set up'}): "
                f"partitions={partitions} has nothing to change.",
                hint=f"to split it into {partitions} partitions no rebuild is needed: stop "
                f"its projector and start PartitionedProjector workers with partitions="
                f"{partitions} (cqrskit projections run --partitions {partitions}); each "
                "partition starts at the projector's checkpoint.",
            )
        generation = await schema.start_rebuild(s, projection)
        if mode in ("partitioned", "consumer"):
            await prepare_build(s, projection, generation, partitions)
        return generation


async def cancel_rebuild(read_db: ReadDatabase, projection: Projection) -> int | None:
    """Cancel the pending rebuild of a partitioned projection: drop the generation being
    built (tables, partitions, checkpoints); return its number (``None``: none pending).
    The active generation is untouched; the workers that built it stop doing so.

    Raises:
        ConfigurationError: the projection runs on the one-process projector, whose
            rebuild in flight cannot be cancelled.
    """
    from cqrskit.projections.partition_switch import cancel_build

    async with read_db.transaction() as s:
        await schema.install(s)
        row = await schema.load(s, projection.name)
        if row is None or row.building_generation is None:
            return None
        if row.mode not in ("partitioned", "consumer"):
            raise ConfigurationError(
                f"projection {projection.name!r} runs on the one-process projector (mode "
                f"{row.mode}): its rebuild into generation {row.building_generation} "
                "cannot be cancelled.",
                hint="let it switch over, then rebuild again if needed.",
            )
        await cancel_build(s, projection, row.building_generation)
        return row.building_generation


@dataclass(frozen=True, slots=True)
class RebuildProgress:
    """How far a pending rebuild is.

    Attributes:
        name: the projection.
        generation: the generation being rebuilt.
        position: every event up to here is applied in it (partitioned: its lowest
            partition's position).
        target: where the active generation stands (partitioned: its highest partition's
            position); the rebuild switches over once ``position`` reaches it.
        partitions: the new generation's number of partitions (``None``: not
            partitioned, or no partitioned worker took it up yet).
        active_partitions: the active generation's number of partitions (``None``: not
            partitioned).
    """

    name: str
    generation: int
    position: int
    target: int
    partitions: int | None
    active_partitions: int | None


async def rebuild_progress(read_db: ReadDatabase, name: str) -> RebuildProgress | None:
    """The pending rebuild of projection ``name`` (``None``: none pending)."""
    from cqrskit.projections.partitions import build_key

    async with read_db.read_only() as s:
        await _require_tables(s)
        row = await schema.load(s, name)
        if row is None or row.building_generation is None:
            return None
        gen, active = row.building_generation, row.active_generation
        built: Any = None
        current: Any = None
        try:
            async with s.savepoint():
                built = await s.fetchone(
                    "SELECT min(position), max(partitions) FROM cqrskit_partitions "
                    "WHERE projection = ?",
                    build_key(name, gen),
                )
                current = await s.fetchone(
                    "SELECT max(position), max(partitions) FROM cqrskit_partitions "
                    "WHERE projection = ?",
                    name,
                )
        except Exception:  # noqa: BLE001 - never partitioned: no partition tables
            built = current = None
        position = await schema.get_checkpoint(s, name, gen)
        target = await schema.get_checkpoint(s, name, active)
    partitions = active_partitions = None
    if built is not None and built[1] is not None:
        position, partitions = int(built[0]), int(built[1])
    if current is not None and current[1] is not None:
        target, active_partitions = int(current[0]), int(current[1])
    return RebuildProgress(name, gen, position, target, partitions, active_partitions)
