"""Rebuilding a partitioned projection in place, and changing its number of partitions.

:func:`~cqrskit.projections.request_rebuild` creates the next generation's empty tables and,
for a partitioned projection, its own partition rows (:func:`prepare_build`) — with the
active generation's N, or another one (``partitions=M``) — kept under
:func:`~cqrskit.projections.partitions.build_key`. The
:class:`~cqrskit.projections.PartitionedProjector` workers started with that N build it from
position 0 with their own leases and checkpoints, while the active generation's workers keep
serving it (same N: the same processes do both). A worker applies only to a generation whose
rows have its own N, so workers with the old and the new N never apply to the same one.

The switch (:class:`Switcher`, run by the worker holding partition 0 of the new
generation) makes the new generation active once it holds everything the active one
holds: every new partition's position is at or past every active partition's position
(``min(new) >= max(active)``). Under a steady stream of writes both sides chase the head of
the log, so that moment may not come by itself: once the new generation reached the
slowest active partition (``min(new) >= min(active)``), the switcher *holds* the active
partitions — it takes their leases, which fences their workers, and beats them — so that
the active side stands still while the new one passes it, usually within a batch. If that
takes longer than ``lease_ttl``, it lets go (the active workers claim their partitions back at
once) and tries again later, backing off. A switcher that dies while holding them stops
beating them: the active workers take them back after ``lease_ttl``.

The switch itself is one transaction: it checks the condition again under locks, repoints
the views, deletes the active rows, moves the new rows under the projection's name with a
new epoch above every old one and the placeholder owner ``switched>g<N>`` (fencing every
worker of either side; the new generation's workers claim them at their next tick, while a
worker of an older cqrskit, which knows no generations, sees them owned), carries a broker
consumer's sequence and cursor over when N is unchanged, and drops the old tables. Every
tick reads the projection's generations first (share-locked on PostgreSQL), so no group
claims a row of a generation it was not set up for.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractAsyncContextManager

from cqrskit._partitioning import check_partitions
from cqrskit.errors import ConfigurationError
from cqrskit.projections import schema
from cqrskit.projections.api import Projection, physical_table
from cqrskit.projections.db import Session
from cqrskit.projections.partitions import (
    SWITCH_OWNER,
    GenerationMovedError,
    PartitionLeases,
    build_key,
    install,
    key_partitions,
    switched_owner,
)

__all__ = ["Switcher", "cancel_build", "prepare_build"]

log = logging.getLogger("cqrskit.projections")


async def prepare_build(
    session: Session, projection: Projection, generation: int, partitions: int | None
) -> int | None:
    """Create the partition rows of ``generation`` (being rebuilt) at its checkpoint, with
    ``partitions`` (default: the active generation's number); return the number, or
    ``None`` when neither is known (the first partitioned worker then decides).

    Raises:
        ConfigurationError: ``generation`` already has rows with another number.
    """
    name = projection.name
    await install(session)
    key = build_key(name, generation)
    have = await key_partitions(session, key)
    if have is not None:
        if partitions is not None and partitions != have:
            raise ConfigurationError(
                f"projection {name!r} is already being rebuilt into generation {generation} "
                f"with {have} partitions (asked for {partitions}).",
                hint="wait for that rebuild to switch over, or cancel it "
                "(cqrskit projections rebuild --cancel, cancel_rebuild()) and request it "
                "again.",
            )
        return have
    n = check_partitions(partitions) if partitions is not None else None
    if n is None:
        n = await key_partitions(session, name)
        if n is None:
            return None
    position = await schema.get_checkpoint(session, name, generation)
    now = time.time()
    await session.executemany(
        "INSERT INTO cqrskit_partitions (projection, partition, partitions, position, "
        "floor_position, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (projection, partition) DO NOTHING",
        [(key, p, n, position, position, now) for p in range(n)],
    )
    return await key_partitions(session, key)  # another worker's, if it came first


async def cancel_build(session: Session, projection: Projection, generation: int) -> None:
    """Drop ``generation`` (being rebuilt) of a partitioned projection: its tables, rows
    and dead letters (its number is not used again). Its workers are fenced (their rows
    are gone) and stop building at their next tick.

    Raises:
        GenerationMovedError: ``generation`` is no longer being rebuilt (it switched over).
    """
    name = projection.name
    changed = await session.execute(
        "UPDATE cqrskit_projections SET building_generation = NULL WHERE name = ? "
        "AND building_generation = ?",
        name,
        generation,
    )
    if changed != 1:  # switched over (or cancelled) meanwhile: its tables are in use
        raise GenerationMovedError(
            f"projection {name}: generation {generation} is no longer being rebuilt"
        )
    key = build_key(name, generation)
    await session.execute("DELETE FROM cqrskit_partitions WHERE projection = ?", key)
    await session.execute("DELETE FROM cqrskit_workers WHERE projection = ?", key)
    for table in projection.tables:
        await session.execute(
            f"DROP TABLE IF EXISTS {session.qualify(physical_table(table, generation))}"
        )
    await session.execute(
        "DELETE FROM cqrskit_dead_letters WHERE projection = ? AND generation = ?",
        name,
        generation,
    )
    # the checkpoint row stays (at -1): the next rebuild takes the next number, so a worker
    # that still builds this generation can never meet rows of a new one under its key
    await session.execute(
        "UPDATE cqrskit_checkpoints SET position = -1 WHERE projection = ? AND generation = ?",
        name,
        generation,
    )


class Switcher:
    """Switches a partitioned projection over to the generation ``leases`` build, once it
    caught up (see the module docs). Run :meth:`step` from the building worker holding
    partition 0, every tick (more often while :attr:`holding`).

    Args:
        leases: the building generation's leases of this worker.
        active: the active generation.
        lease_ttl: the workers' lease time-to-live.
    """

    def __init__(self, leases: PartitionLeases, active: int, lease_ttl: float) -> None:
        assert leases.building is not None
        self.leases = leases
        self.read_db = leases.read_db
        self.projection = leases.projection
        self.name = leases.name
        self.active = active
        self.building = leases.building
        self.lease_ttl = lease_ttl
        self.owner = f"{SWITCH_OWNER}g{self.building}:{leases.owner}"
        #: the active partitions held (partition -> epoch), while holding them
        self.held: dict[int, int] | None = None
        self._held_at = 0.0
        self._next_try = 0.0
        self._pause = lease_ttl

    @property
    def holding(self) -> bool:
        """Whether the active generation's partitions are held for the switch now."""
        return self.held is not None

    async def step(self) -> bool:
        """Look, and hold or switch as the module docs say; ``True`` once switched.

        Raises:
            GenerationMovedError: the generations changed meanwhile (let go of everything).
        """
        now = time.monotonic()
        if self.held is None and now < self._next_try:
            return False
        active, built, n_built = await self._positions()
        if n_built < self.leases.partitions:
            return False
        low_b = min(built)
        high_a = max(active.values()) if active else await self._active_checkpoint()
        low_a = min(active.values()) if active else high_a
        if low_b >= high_a and await self._switch():
            return True
        if self.held is not None:
            if not await self._beat() or now - self._held_at > self.lease_ttl:
                log.info(
                    "projection %s: generation %d did not pass generation %d within %.1f s; "
                    "letting it go on and trying again later",
                    self.name,
                    self.building,
                    self.active,
                    self.lease_ttl,
                )
                await self.let_go()
                self._next_try = now + self._pause
                self._pause = min(self._pause * 2, 60 * self.lease_ttl)
            return False
        if active and low_b >= low_a:
            await self._hold()
        return False

    async def _positions(self) -> tuple[dict[int, int], list[int], int]:
        async with self.read_db.read_only() as s:
            rows = await s.fetchall(
                "SELECT projection, partition, position FROM cqrskit_partitions "
                "WHERE projection IN (?, ?)",
                self.name,
                self.leases.key,
            )
        active = {int(r[1]): int(r[2]) for r in rows if r[0] == self.name}
        built = [int(r[2]) for r in rows if r[0] == self.leases.key]
        return active, built, len(built)

    async def _active_checkpoint(self) -> int:
        async with self.read_db.read_only() as s:
            return await schema.get_checkpoint(s, self.name, self.active)

    async def _lock_generations(self, s: Session) -> None:
        row = await s.fetchone(
            "SELECT active_generation, building_generation FROM cqrskit_projections "
            "WHERE name = ?" + s.flavor.for_update,
            self.name,
        )
        if row is None or (int(row[0]), row[1]) != (self.active, self.building):
            raise GenerationMovedError(
                f"projection {self.name}: the rebuild of generation {self.building} moved on"
            )

    def _tx(self) -> AbstractAsyncContextManager[Session]:
        return self.read_db.transaction(
            lock_timeout=max(0.05, self.lease_ttl / 4), hold=self.lease_ttl
        )

    async def _hold(self) -> None:
        async with self._tx() as s:
            await self._lock_generations(s)
            await s.execute(
                "UPDATE cqrskit_partitions SET owner = ?, epoch = epoch + 1, beat = beat + 1 "
                "WHERE projection = ?",
                self.owner,
                self.name,
            )
            rows = await s.fetchall(
                "SELECT partition, epoch FROM cqrskit_partitions WHERE projection = ?",
                self.name,
            )
        self.held = {int(r[0]): int(r[1]) for r in rows}
        self._held_at = time.monotonic()
        log.info(
            "projection %s: generation %d caught up; holding generation %d's %d partitions "
            "for the switch",
            self.name,
            self.building,
            self.active,
            len(self.held),
        )

    async def _beat(self) -> bool:
        """Keep the held partitions from expiring; ``False`` when one was taken back."""
        assert self.held is not None
        async with self._tx() as s:
            changed = await s.execute(
                "UPDATE cqrskit_partitions SET beat = beat + 1 WHERE projection = ? AND owner = ?",
                self.name,
                self.owner,
            )
        return changed == len(self.held)

    async def let_go(self) -> None:
        """Give the held partitions back to the active generation's workers (at once)."""
        if self.held is None:
            return
        self.held = None
        try:
            async with self._tx() as s:
                await s.execute(
                    "UPDATE cqrskit_partitions SET owner = NULL, epoch = epoch + 1, "
                    "beat = beat + 1 WHERE projection = ? AND owner = ?",
                    self.name,
                    self.owner,
                )
        except Exception:  # they expire after lease_ttl anyway
            log.exception("projection %s: could not give the held partitions back", self.name)

    async def _switch(self) -> bool:
        name, key, n = self.name, self.leases.key, self.leases.partitions
        async with self._tx() as s:
            lock = s.flavor.for_update
            await self._lock_generations(s)
            active = await s.fetchall(
                "SELECT partition, epoch, position, sequence, broker_cursor, partitions "
                f"FROM cqrskit_partitions WHERE projection = ? ORDER BY partition{lock}",
                name,
            )
            built = await s.fetchall(
                "SELECT partition, epoch, position FROM cqrskit_partitions "
                f"WHERE projection = ? ORDER BY partition{lock}",
                key,
            )
            if len(built) != n:
                return False
            if self.held is not None and {int(r[0]): int(r[1]) for r in active} != self.held:
                return False  # an active worker took a partition back: not frozen
            if active:
                high_a = max(int(r[2]) for r in active)
            else:
                high_a = await schema.get_checkpoint(s, name, self.active)
            low_b = min(int(r[2]) for r in built)
            if low_b < high_a:
                return False
            epoch = max(int(r[1]) for r in [*active, *built]) + 1
            await s.execute("DELETE FROM cqrskit_partitions WHERE projection = ?", name)
            await s.execute(
                "UPDATE cqrskit_partitions SET projection = ?, owner = ?, epoch = ?, "
                "beat = beat + 1, updated_at = ? WHERE projection = ?",
                name,
                switched_owner(self.building),
                epoch,
                time.time(),
                key,
            )
            if active and int(active[0][5]) == n:
                # a broker consumer's place in each partition stays valid with the same N:
                # consumers resume there, skipping what the log workers applied (the floor)
                await s.executemany(
                    "UPDATE cqrskit_partitions SET sequence = ?, broker_cursor = ? "
                    "WHERE projection = ? AND partition = ?",
                    [(int(r[3]), str(r[4] or ""), name, int(r[0])) for r in active],
                )
            await s.execute("DELETE FROM cqrskit_workers WHERE projection = ?", key)
            await schema.set_checkpoint(s, name, self.building, low_b)
            await schema.switch_over(s, self.projection, self.active, self.building)
        self.held = None
        log.info(
            "projection %s: switched to generation %d (%d partitions) at position %d",
            name,
            self.building,
            n,
            low_b,
        )
        return True
