"""Partitions of a projection: leases, fair shares and per-partition checkpoints.

A partitioned projection's work is split into N partitions by the stream id
(:func:`~cqrskit.messaging.partition_of`, CRC-32 modulo N), so every event of a stream is
applied by one partition, in order. Worker processes share the partitions through two
tables in the read database:

``cqrskit_partitions``  one row per (projection, partition): its lease (owner, epoch,
                        heartbeat counter) and its checkpoint — ``position`` (every event
                        of this partition at or below it is applied or parked),
                        ``floor_position`` (applied by a log reader up to there: broker
                        messages at or below it are skipped), ``sequence`` and
                        ``broker_cursor`` (a broker consumer's last processed message) and
                        the gap being waited for, if any.
``cqrskit_workers``     one row per live worker process (owner, heartbeat counter).

Every worker ticks every ``lease_ttl / 4``: it beats its own row and its partitions (only
those whose loop showed progress recently: a hung loop loses its partitions), counts the
live workers (a row whose counter moved within ``lease_ttl`` by the observer's monotonic
clock), and moves towards its fair share: ``N // workers`` (+1 for the first
``N % workers`` owners by name). Above it, it releases partitions (after their loop
stopped); below it, it claims free ones and ones whose heartbeat stood still for
``lease_ttl``. A claim raises the epoch; every batch commits its checkpoint with a
statement that matches the epoch, so a worker that lost a partition (paused, partitioned
away) can never commit to it again: the fencing that keeps per-stream order across
handovers. A dead or hung worker's partitions move within ``lease_ttl`` plus one tick.

Generations: the rows of the active generation are kept under the projection's name;
those of a generation being rebuilt (:func:`~cqrskit.projections.request_rebuild`) under
:func:`build_key` (``balances@g2``), with their own number of partitions, leases, workers
and checkpoints, so the active generation keeps serving while the new one is built
(:mod:`cqrskit.projections.partition_switch` switches them over). Every tick first reads
the projection's generations (on PostgreSQL with a share lock that the switch waits for):
a group whose generation was switched or dropped stops with :class:`GenerationMovedError`
before it could claim a row of another generation.

Clocks: no wall-clock time is compared between processes (``updated_at`` and
``gap_since`` are for humans).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from cqrskit._partitioning import check_partitions, partition_of
from cqrskit.errors import ConfigurationError
from cqrskit.eventlog import EventStore, StoredEvent
from cqrskit.projections import schema
from cqrskit.projections.api import Projection
from cqrskit.projections.db import ReadDatabase, Session
from cqrskit.projections.runner import LeaseLostError

__all__ = [
    "GenerationMovedError",
    "PARTITIONED_MODES",
    "PartitionLeases",
    "PartitionLostError",
    "PartitionState",
    "PartitionStatus",
    "Tick",
    "build_key",
    "partition_mismatch",
    "partition_status",
    "partitioned_lag",
    "switched_owner",
    "token_positions",
]

log = logging.getLogger("cqrskit.projections")

PARTITIONED_MODES = ("partitioned", "consumer")
"""Modes of ``cqrskit_projections`` rows whose checkpoints live in ``cqrskit_partitions``."""

DDL = (
    """CREATE TABLE IF NOT EXISTS cqrskit_partitions (
        projection TEXT NOT NULL,
        partition INTEGER NOT NULL,
        partitions INTEGER NOT NULL,
        owner TEXT,
        epoch BIGINT NOT NULL DEFAULT 0,
        beat BIGINT NOT NULL DEFAULT 0,
        position BIGINT NOT NULL,
        floor_position BIGINT NOT NULL,
        sequence BIGINT NOT NULL DEFAULT 0,
        broker_cursor TEXT NOT NULL DEFAULT '',
        gap_sequence BIGINT,
        gap_since DOUBLE PRECISION,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (projection, partition))""",
    """CREATE TABLE IF NOT EXISTS cqrskit_workers (
        projection TEXT NOT NULL,
        owner TEXT NOT NULL,
        beat BIGINT NOT NULL,
        PRIMARY KEY (projection, owner))""",
)

SWITCH_OWNER = "switch>"
"""Owner prefix of the active generation's partitions while a rebuild's switch holds them."""


def switched_owner(generation: int) -> str:
    """The owner a switch gives the partitions of ``generation`` it made active: free for
    that generation's workers to claim at once (see :meth:`PartitionLeases.tick`)."""
    return f"switched>g{generation}"


_LAG_CAP = 10_000
_SCAN_CAP = 5_000


class PartitionLostError(LeaseLostError):
    """Another worker took the partition over; this one must not commit to it."""


class GenerationMovedError(LeaseLostError):
    """The generation a group of partitions works on is no longer the one it was set up
    for (a rebuild switched over, or was requested or cancelled): set the group up again."""


def build_key(name: str, generation: int) -> str:
    """The key of the partition rows of ``name``'s generation being rebuilt
    (``balances@g2``); the active generation's rows are kept under the name itself. A
    projection name never holds ``@``, so keys never collide."""
    return f"{name}@g{generation}"


def partition_mismatch(
    name: str,
    mine: int,
    active: int,
    active_n: int,
    building: int | None = None,
    building_n: int | None = None,
) -> ConfigurationError:
    """The error of a worker started with ``mine`` partitions for a projection split into
    ``active_n`` (and, if a rebuild is pending, being rebuilt into ``building_n``): names
    the numbers and the commands that fix it."""
    text = (
        f"projection {name!r} is split into {active_n} partitions in this read database "
        f"(generation {active}); this worker was started with {mine}."
    )
    if building is not None and building_n is not None:
        text += f" A rebuild into generation {building} with {building_n} partitions is pending."
        hint = (
            f"start this worker with --partitions {active_n} (partitions={active_n}) to "
            f"serve generation {active}, or with {building_n} to build generation "
            f"{building}; to build it with {mine} instead, cancel the rebuild "
            f"(cqrskit projections rebuild --cancel ...) and request it again with "
            f"--partitions {mine}."
        )
    else:
        hint = (
            f"start it with --partitions {active_n} (partitions={active_n}) like the other "
            f"workers; to change the number to {mine}, rebuild the projection: "
            f"cqrskit projections rebuild --projection <module:attr of {name!r}> "
            f"--partitions {mine} (in code: request_rebuild(read_db, projection, "
            f"partitions={mine})); workers started with {mine} build the new generation "
            f"while those with {active_n} keep serving, and take over at the switch."
        )
    return ConfigurationError(text, hint=hint)


@dataclass(slots=True)
class PartitionState:
    """A partition's checkpoint as the owner holds it in memory."""

    position: int
    floor: int
    sequence: int
    cursor: str


@dataclass(frozen=True, slots=True)
class Tick:
    """What one :meth:`PartitionLeases.tick` changed.

    Attributes:
        gained: partitions claimed in this tick, with their new epochs.
        lost: partitions another worker took over (stop their loops; do not release).
        release: partitions above the fair share (stop their loops, then
            :meth:`PartitionLeases.release` them).
    """

    gained: dict[int, int]
    lost: frozenset[int]
    release: frozenset[int]


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    """Where one partition of a projection stands.

    Attributes:
        projection, partition, partitions: which partition, of how many.
        owner, epoch: who holds its lease and the lease's epoch.
        position: every event of this partition at or below it is applied (or parked).
        sequence: the last broker sequence processed (broker consumers; 0 otherwise).
        lag_events: events of this partition in the log after ``position`` (counted up to
            10,000 when the event log was given, else ``None``).
        gap_sequence, gap_seconds: the missing broker sequence the partition waits for,
            and for how long (``None`` when there is no gap).
        updated_at: wall-clock time of the last checkpoint commit.
        generation: the generation these partitions apply to (the active one, or the one
            being rebuilt when asked for).
    """

    projection: str
    partition: int
    partitions: int
    owner: str | None
    epoch: int
    position: int
    sequence: int
    lag_events: int | None
    gap_sequence: int | None
    gap_seconds: float | None
    updated_at: float
    generation: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


async def install(session: Session) -> None:
    """Create the bookkeeping tables (the projector's and the partitions') if missing."""
    await schema.install(session)
    for stmt in DDL:
        await session.execute(stmt)


async def key_partitions(session: Session, key: str) -> int | None:
    """The number of partitions of the rows kept under ``key`` (``None``: no rows)."""
    value = await session.fetchval(
        "SELECT max(partitions) FROM cqrskit_partitions WHERE projection = ?", key
    )
    return None if value is None else int(value)


class PartitionLeases:
    """One worker's view of a partitioned projection's leases (see the module docs).

    Args:
        read_db: where the leases and checkpoints live.
        projection: the projection (or consumer group) whose partitions are shared.
        partitions: N.
        owner: this worker's unique id.
        lease_ttl: seconds without a heartbeat before a partition or a worker counts as
            gone.
        mode: recorded in ``cqrskit_projections`` (``"partitioned"`` or ``"consumer"``).
        max_partitions: never hold more than this many (default: no limit).
        building: the generation being rebuilt whose partitions these are (kept under
            :func:`build_key`); ``None`` (default): the active generation's.
    """

    def __init__(
        self,
        read_db: ReadDatabase,
        projection: Projection,
        partitions: int,
        owner: str,
        lease_ttl: float,
        *,
        mode: str,
        max_partitions: int | None = None,
        building: int | None = None,
    ) -> None:
        self.read_db = read_db
        self.projection = projection
        self.name = projection.name
        #: the generation being rebuilt (``None``: these are the active generation's)
        self.building = building
        #: the rows' key in ``cqrskit_partitions`` and ``cqrskit_workers``
        self.key = self.name if building is None else build_key(self.name, building)
        #: how log lines name these partitions
        self.label = self.name if building is None else f"{self.name} (rebuild g{building})"
        self.partitions = check_partitions(partitions)
        self.owner = owner
        self.lease_ttl = lease_ttl
        self.mode = mode
        self.max_partitions = max_partitions
        #: partition -> epoch, for the partitions this worker holds
        self.owned: dict[int, int] = {}
        #: partition -> monotonic time its loop last showed progress (set by the loops)
        self.progress: dict[int, float] = {}
        #: the generation these partitions apply to (set by :meth:`setup`)
        self.generation = building or 1
        #: for the active generation's partitions: the generation being rebuilt, if any
        self.pending: int | None = None
        self._marks: dict[int, tuple[str | None, int, int]] = {}
        self._since: dict[int, float] = {}
        self._members: dict[str, tuple[int, float]] = {}

    async def setup(self) -> int:
        """Create tables and this generation's rows (each partition starts at the
        generation's checkpoint, so moving from the one-process projector loses and repeats
        nothing); return the generation.

        Raises:
            ConfigurationError: the rows exist with another number of partitions.
            GenerationMovedError: the generation being rebuilt is no longer ``building``.
        """
        async with self.read_db.transaction() as s:
            await install(s)
            if self.building is None:
                row = await schema.ensure_projection(s, self.projection, self.mode)
                self.generation = row.active_generation
                self.pending = row.building_generation
            else:
                found = await schema.load(s, self.name)
                if found is None or found.building_generation != self.building:
                    raise GenerationMovedError(
                        f"projection {self.name}: generation {self.building} is no longer "
                        "being rebuilt"
                    )
                row = found
            checkpoint = await schema.get_checkpoint(s, self.name, self.generation)
            rows = await s.fetchall(
                "SELECT partition, partitions FROM cqrskit_partitions WHERE projection = ?",
                self.key,
            )
            other = {int(r[1]) for r in rows} - {self.partitions}
            if other:
                if self.building is None:
                    raise partition_mismatch(
                        self.name,
                        self.partitions,
                        self.generation,
                        sorted(other)[0],
                        row.building_generation,
                        None
                        if row.building_generation is None
                        else await key_partitions(s, build_key(self.name, row.building_generation)),
                    )
                raise ConfigurationError(
                    f"projection {self.name!r} is being rebuilt into generation "
                    f"{self.building} with {sorted(other)[0]} partitions; this worker was "
                    f"started with {self.partitions}.",
                    hint=f"start the workers that build it with --partitions {sorted(other)[0]}.",
                )
            have = {int(r[0]) for r in rows}
            now = time.time()
            missing = [
                (self.key, p, self.partitions, checkpoint, checkpoint, now)
                for p in range(self.partitions)
                if p not in have
            ]
            if missing:
                await s.executemany(
                    "INSERT INTO cqrskit_partitions (projection, partition, partitions, "
                    "position, floor_position, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (projection, partition) DO NOTHING",
                    missing,
                )
        return self.generation

    # -- the tick ------------------------------------------------------------------------

    def _live_members(self, rows: Sequence[Any], now: float) -> list[str]:
        members = self._members
        seen: dict[str, tuple[int, float]] = {}
        for owner, beat in rows:
            owner, beat = str(owner), int(beat)
            old = members.get(owner)
            seen[owner] = (beat, now) if old is None or old[0] != beat else old
        self._members = seen
        live = {o for o, (_b, since) in seen.items() if now - since < self.lease_ttl}
        live.add(self.owner)
        return sorted(live)

    def target(self, live: Sequence[str]) -> int:
        """This worker's fair share of the partitions among ``live`` workers."""
        base, extra = divmod(self.partitions, len(live))
        share = base + (1 if live.index(self.owner) < extra else 0)
        if self.max_partitions is not None:
            share = min(share, self.max_partitions)
        return share

    async def _check_generation(self, s: Session) -> None:
        """Raise :class:`GenerationMovedError` unless these partitions' generation is still
        the one they were set up for (on PostgreSQL the projection's row stays share-locked
        until the tick ends: a switch waits for the tick, the tick for a switch)."""
        sql = (
            "SELECT active_generation, building_generation FROM cqrskit_projections WHERE name = ?"
        )
        row = await s.fetchone(sql + s.flavor.for_share, self.name)
        current = None if row is None else row[0] if self.building is None else row[1]
        if current is None or int(current) != self.generation:
            raise GenerationMovedError(
                f"projection {self.label}: generation {self.generation} is no longer "
                f"{'being rebuilt' if self.building is not None else 'active'}"
            )
        if self.building is None:
            self.pending = None if row is None or row[1] is None else int(row[1])

    async def tick(self) -> Tick:
        """Beat, count live workers, claim or mark for release (see the module docs).

        Raises:
            GenerationMovedError: the generation changed (nothing was claimed or beaten).
        """
        now = time.monotonic()
        fresh = now - self.lease_ttl / 2
        gained: dict[int, int] = {}
        lost: set[int] = set()
        # a peer stuck inside a transaction (paused, hung) must not stall the tick: bounded
        # lock waits, claims and clean-ups skip rows someone holds a lock on, and (``hold``)
        # a peer frozen mid-transaction is ended by the server, which frees its rows
        async with self.read_db.transaction(
            lock_timeout=max(0.05, self.lease_ttl / 4), hold=self.lease_ttl
        ) as s:
            await self._check_generation(s)
            await s.execute(
                "INSERT INTO cqrskit_workers (projection, owner, beat) VALUES (?, ?, 1) "
                "ON CONFLICT (projection, owner) DO UPDATE SET beat = cqrskit_workers.beat + 1",
                self.key,
                self.owner,
            )
            members = await s.fetchall(
                "SELECT owner, beat FROM cqrskit_workers WHERE projection = ?", self.key
            )
            live = self._live_members(members, now)
            gone = [
                o for o, (_b, since) in self._members.items() if now - since > 3 * self.lease_ttl
            ]
            skip_locked = s.flavor.skip_locked
            for o in gone:
                if skip_locked is not None:
                    # the row of a peer frozen inside its tick is locked: leave it for later
                    await s.execute(
                        "DELETE FROM cqrskit_workers WHERE projection = ? AND owner IN "
                        "(SELECT owner FROM cqrskit_workers WHERE projection = ? AND owner = ?"
                        f"{skip_locked})",
                        self.key,
                        self.key,
                        o,
                    )
                else:
                    await s.execute(
                        "DELETE FROM cqrskit_workers WHERE projection = ? AND owner = ?",
                        self.key,
                        o,
                    )
            rows = await s.fetchall(
                "SELECT partition, owner, epoch, beat FROM cqrskit_partitions "
                "WHERE projection = ? ORDER BY partition",
                self.key,
            )
            for p, epoch in list(self.owned.items()):
                if self.progress.get(p, now) < fresh:
                    continue  # its loop is stuck: let the lease run out
                changed = await s.execute(
                    "UPDATE cqrskit_partitions SET beat = beat + 1 "
                    "WHERE projection = ? AND partition = ? AND epoch = ?",
                    self.key,
                    p,
                    epoch,
                )
                if changed != 1:
                    lost.add(p)
            target = self.target(live)
            want = target - (len(self.owned) - len(lost))
            candidates: list[tuple[int, int, int, bool]] = []
            for p, owner, epoch, beat in rows:
                p, epoch, beat = int(p), int(epoch), int(beat)
                mark = (owner, epoch, beat)
                if self._marks.get(p) != mark:
                    self._marks[p], self._since[p] = mark, now
                if p in self.owned:
                    continue
                idle = now - self._since[p]
                # rows a switch just made this generation's are free for its groups (an
                # older cqrskit, which knows no generations, sees an owner: it waits)
                free = owner is None or owner == switched_owner(self.generation)
                if free or idle >= self.lease_ttl:
                    orphan = not free and idle >= 2 * self.lease_ttl
                    candidates.append((p, epoch, beat, orphan))
            if candidates and (want > 0 or any(c[3] for c in candidates)):
                if skip_locked is not None:
                    # skip rows inside a transaction of their (stuck?) owner: not now
                    marks = ", ".join("?" for _ in candidates)
                    unlocked = {
                        int(r[0])
                        for r in await s.fetchall(
                            "SELECT partition FROM cqrskit_partitions WHERE projection = ? "
                            f"AND partition IN ({marks}){skip_locked}",
                            self.key,
                            *(c[0] for c in candidates),
                        )
                    }
                    candidates = [c for c in candidates if c[0] in unlocked]
                for p, epoch, beat, orphan in candidates:
                    if want <= 0 and not orphan:
                        continue
                    changed = await s.execute(
                        "UPDATE cqrskit_partitions SET owner = ?, epoch = epoch + 1, "
                        "beat = beat + 1 WHERE projection = ? AND partition = ? AND epoch = ? "
                        "AND beat = ?",
                        self.owner,
                        self.key,
                        p,
                        epoch,
                        beat,
                    )
                    if changed == 1:
                        gained[p] = epoch + 1
                        want -= 1
        holders = {int(r[0]): str(r[1] or "") for r in rows}
        for p in lost:
            self.owned.pop(p, None)
            if holders.get(p, "").startswith(SWITCH_OWNER):
                log.info("projection %s: partition %d held for a rebuild's switch", self.label, p)
            else:
                log.warning("projection %s: partition %d was taken over", self.label, p)
        for p, epoch in gained.items():
            self.owned[p] = epoch
            self.progress[p] = now
            log.info("projection %s: partition %d claimed (epoch %d)", self.label, p, epoch)
        over = len(self.owned) - target
        release = sorted(self.owned, reverse=True)[: max(0, over)]
        return Tick(gained, frozenset(lost), frozenset(release))

    async def release(self, partitions: Iterable[int]) -> None:
        """Give ``partitions`` up (their loops must have stopped): the next claimer takes
        them at once. Raising the epoch fences anything still in flight."""
        ps = [p for p in partitions if p in self.owned]
        if not ps:
            return
        async with self.read_db.transaction(hold=self.lease_ttl) as s:
            for p in ps:
                await s.execute(
                    "UPDATE cqrskit_partitions SET owner = NULL, epoch = epoch + 1, "
                    "beat = beat + 1 WHERE projection = ? AND partition = ? AND epoch = ?",
                    self.key,
                    p,
                    self.owned[p],
                )
        for p in ps:
            self.owned.pop(p, None)
            log.info("projection %s: partition %d released", self.label, p)

    async def release_all(self) -> None:
        """Release every held partition and leave the worker table (a graceful stop)."""
        try:
            await self.release(list(self.owned))
            async with self.read_db.transaction() as s:
                await s.execute(
                    "DELETE FROM cqrskit_workers WHERE projection = ? AND owner = ?",
                    self.key,
                    self.owner,
                )
        except Exception:
            log.exception("projection %s: could not release the partitions", self.label)

    # -- checkpoints ---------------------------------------------------------------------

    async def load(self, session: Session, partition: int) -> PartitionState:
        """The checkpoint of ``partition``.

        Raises:
            PartitionLostError: the partition's row is gone (its generation moved on).
        """
        row = await session.fetchone(
            "SELECT position, floor_position, sequence, broker_cursor FROM cqrskit_partitions "
            "WHERE projection = ? AND partition = ?",
            self.key,
            partition,
        )
        if row is None:  # the generation moved on (a switch, a cancelled rebuild)
            raise PartitionLostError(f"projection {self.label}: partition {partition} is gone")
        return PartitionState(int(row[0]), int(row[1]), int(row[2]), str(row[3] or ""))

    async def commit_log_position(
        self, session: Session, owned: dict[int, int], position: int
    ) -> None:
        """A log reader's checkpoint: every partition in ``owned`` (partition -> epoch) has
        applied everything up to ``position``. One statement, matching every epoch.

        Raises:
            PartitionLostError: a partition's epoch moved on (the transaction must roll back).
        """
        greatest = session.flavor.greatest
        match = " OR ".join("(partition = ? AND epoch = ?)" for _ in owned)
        params: list[Any] = [position, position, time.time(), self.key]
        for p, epoch in owned.items():
            params += [p, epoch]
        changed = await session.execute(
            f"UPDATE cqrskit_partitions SET position = {greatest}(position, ?), "
            f"floor_position = {greatest}(floor_position, ?), beat = beat + 1, updated_at = ? "
            f"WHERE projection = ? AND ({match})",
            *params,
        )
        if changed != len(owned):
            raise PartitionLostError(
                f"projection {self.label}: a partition of {sorted(owned)} was taken over"
            )

    async def commit_consumer(
        self,
        session: Session,
        partition: int,
        epoch: int,
        state: PartitionState,
        gap: tuple[int, float] | None,
    ) -> None:
        """A broker consumer's checkpoint for ``partition``, matching ``epoch``; ``gap`` is
        the missing sequence and since when (wall clock) it is waited for, if any.

        Raises:
            PartitionLostError: the epoch moved on (the transaction must roll back).
        """
        changed = await session.execute(
            "UPDATE cqrskit_partitions SET position = ?, sequence = ?, broker_cursor = ?, "
            "gap_sequence = ?, gap_since = ?, beat = beat + 1, updated_at = ? "
            "WHERE projection = ? AND partition = ? AND epoch = ?",
            state.position,
            state.sequence,
            state.cursor,
            None if gap is None else gap[0],
            None if gap is None else gap[1],
            time.time(),
            self.key,
            partition,
            epoch,
        )
        if changed != 1:
            raise PartitionLostError(
                f"projection {self.label}: partition {partition} was taken over"
            )


# -- status and consistency ----------------------------------------------------------------


async def _rows(session: Session, names: Sequence[str]) -> dict[str, dict[int, Any]]:
    marks = ", ".join("?" for _ in names)
    rows = await session.fetchall(
        "SELECT projection, partition, partitions, owner, epoch, position, sequence, "
        "gap_sequence, gap_since, updated_at FROM cqrskit_partitions "
        f"WHERE projection IN ({marks}) ORDER BY projection, partition",
        *names,
    )
    out: dict[str, dict[int, Any]] = {}
    for r in rows:
        out.setdefault(str(r[0]), {})[int(r[1])] = r
    return out


async def _scan(store: EventStore, low: int, high: int, cap: int) -> tuple[list[StoredEvent], bool]:
    """Events with positions in ``(low, high]`` (at most ``cap``); and whether all came."""
    out: list[StoredEvent] = []
    position = low
    while len(out) < cap:
        batch = await store.read_after(position, min(1000, cap - len(out)))
        if not batch:
            return out, True
        for e in batch:
            if e.position > high:
                return out, True
            out.append(e)
        position = batch[-1].position
    return out, False


async def partition_status(
    read_db: ReadDatabase,
    name: str,
    store: EventStore | None = None,
    *,
    generation: int | None = None,
) -> list[PartitionStatus]:
    """Each partition of projection (or consumer group) ``name``: owner, checkpoint, gap,
    and — given the event log — lag in events (counted up to 10,000).

    ``generation``: the partitions of that generation (the one being rebuilt: its own
    partitions, leases and checkpoints); default: the active generation's."""
    async with read_db.read_only() as s:
        try:
            async with s.savepoint():
                row = await schema.load(s, name)
                active = None if row is None else row.active_generation
                key, gen = name, active
                if generation is not None and generation != active:
                    key, gen = build_key(name, generation), generation
                found = await _rows(s, [key])
        except Exception:  # noqa: BLE001 - no partitioned projection was ever set up here
            found, key, gen = {}, name, None
    rows = found.get(key, {})
    lags: dict[int, int] | None = None
    if store is not None and rows:
        n = int(next(iter(rows.values()))[2])
        low = min(int(r[5]) for r in rows.values())
        events, _all = await _scan(store, low, await store.head(), _LAG_CAP)
        lags = dict.fromkeys(rows, 0)
        for e in events:
            p = partition_of(e.stream, n)
            if p in rows and e.position > int(rows[p][5]):
                lags[p] += 1
    now = time.time()
    return [
        PartitionStatus(
            name,
            p,
            int(r[2]),
            r[3],
            int(r[4]),
            int(r[5]),
            int(r[6]),
            None if lags is None else lags[p],
            None if r[7] is None else int(r[7]),
            None if r[8] is None else max(0.0, now - float(r[8])),
            float(r[9]),
            gen,
        )
        for p, r in sorted(rows.items())
    ]


async def partitioned_lag(
    read_db: ReadDatabase, store: EventStore, name: str, default: int
) -> tuple[int, int, bool, float]:
    """A partitioned projection's (checkpoint, lag in events, lag capped, lag in seconds):
    the checkpoint is the highest position up to which every partition applied everything
    (a quiet partition does not hold it back); the lag counts each partition's unapplied
    events (up to 10,000) and the seconds are the age of the oldest of them."""
    async with read_db.read_only() as s:
        found = (await _rows(s, [name])).get(name)
    if not found:
        return default, 0, False, 0.0
    n = int(next(iter(found.values()))[2])
    at = {p: int(r[5]) for p, r in found.items()}
    low = min(at.get(p, 0) for p in range(n))
    head = await store.head()
    events, complete = await _scan(store, low, head, _LAG_CAP)
    behind = [e for e in events if e.position > at.get(partition_of(e.stream, n), 0)]
    checkpoint = behind[0].position - 1 if behind else (head if complete else low)
    seconds = 0.0
    if behind:
        stamp = behind[0].metadata.get("timestamp")
        try:
            seconds = max(0.0, time.time() - datetime.fromisoformat(str(stamp)).timestamp())
        except ValueError:
            seconds = 0.0
    return max(low, checkpoint), len(behind), not complete, seconds


async def token_positions(
    session: Session, store: EventStore, names: Sequence[str], token: int | None
) -> dict[str, int]:
    """The effective checkpoint of each partitioned projection in ``names`` for ``token``.

    A partitioned projection has reached ``token`` when no partition still has an event at
    or below it to apply: each partition's ``position`` is at or past it, or the log holds
    no event of that partition between its ``position`` and the token (read from the log,
    at most 5,000 events; beyond that the projection counts as behind). Returns ``token``
    for a projection that reached it, else its lowest partition position.
    """
    found = await _rows(session, names)
    out: dict[str, int] = {}
    for name in names:
        rows = found.get(name)
        if not rows:
            out[name] = 0
            continue
        n = int(next(iter(rows.values()))[2])
        at = {p: int(r[5]) for p, r in rows.items()}
        low = min(at.get(p, 0) for p in range(n))
        if token is None or low >= token:
            out[name] = low if token is None else max(low, token)
            continue
        if await store.head() < token:
            # not all of the log up to the token is readable yet (PostgreSQL's horizon):
            # the events a partition still lacks cannot be ruled out
            out[name] = low
            continue
        events, complete = await _scan(store, low, token, _SCAN_CAP)
        behind = not complete or any(
            e.position > at.get(partition_of(e.stream, n), 0) for e in events
        )
        out[name] = low if behind else token
    return out
