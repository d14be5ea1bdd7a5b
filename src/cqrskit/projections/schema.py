"""Bookkeeping tables in the read database and the statements on them.

``cqrskit_projections``   one row per projection: active and rebuilding generation, mode,
                          and the lease (owner, epoch, heartbeat counter).
``cqrskit_checkpoints``   per (projection, generation): the last applied position.
``cqrskit_dead_letters``  parked (poison) events with the error and the attempts.
``cqrskit_lease_holders`` per projection: the host and process id that took the current
                          lease epoch (to end a frozen holder of SQLite's write lock); the
                          host column names the process exactly (:func:`process_identity`).

Every statement uses ``?`` placeholders and runs on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from cqrskit.projections.api import Projection, physical_table
from cqrskit.projections.db import Session

__all__ = ["LeaseHolder", "ProjectionRow", "ensure_projection", "install"]

DDL = (
    """CREATE TABLE IF NOT EXISTS cqrskit_projections (
        name TEXT PRIMARY KEY,
        active_generation INTEGER NOT NULL,
        building_generation INTEGER,
        mode TEXT NOT NULL,
        lease_owner TEXT,
        lease_epoch BIGINT NOT NULL DEFAULT 0,
        lease_beat BIGINT NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS cqrskit_checkpoints (
        projection TEXT NOT NULL,
        generation INTEGER NOT NULL,
        position BIGINT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (projection, generation))""",
    """CREATE TABLE IF NOT EXISTS cqrskit_dead_letters (
        projection TEXT NOT NULL,
        generation INTEGER NOT NULL,
        position BIGINT NOT NULL,
        stream TEXT NOT NULL,
        version BIGINT NOT NULL,
        type TEXT NOT NULL,
        error TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        parked_at DOUBLE PRECISION NOT NULL,
        retry INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (projection, generation, position))""",
    """CREATE TABLE IF NOT EXISTS cqrskit_lease_holders (
        name TEXT PRIMARY KEY,
        epoch BIGINT NOT NULL,
        host TEXT NOT NULL,
        pid BIGINT NOT NULL,
        taken_at DOUBLE PRECISION NOT NULL)""",
)


@dataclass(frozen=True, slots=True)
class ProjectionRow:
    """A projection's bookkeeping row."""

    name: str
    active_generation: int
    building_generation: int | None
    mode: str
    lease_owner: str | None
    lease_epoch: int
    lease_beat: int


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """The process that took a projection's current lease epoch."""

    epoch: int
    host: str
    pid: int


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def process_state(pid: int) -> tuple[str, str] | None:
    """``(state letter, start time in clock ticks since boot)`` of process ``pid`` from
    ``/proc/<pid>/stat`` (Linux), or ``None`` where it cannot be read."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None or ")" not in stat:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and ")"
    return (fields[0], fields[19]) if len(fields) > 19 else None


def process_identity(pid: int) -> str:
    """What names process ``pid`` (as this process sees it) across hosts, containers and
    pid reuse: the host name, then — where ``/proc`` shows them — the boot, the pid
    namespace and the process's start time. Recorded as a lease holder's ``host``; a
    standby compares it before it may end a frozen holder (:meth:`ReadDatabase.end_frozen_writer`),
    so a process of another host, another container (pid namespace) or a later process that
    reuses the pid never matches."""
    parts = [socket.gethostname()]
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace: int | None = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = None
    state = process_state(pid)
    if boot and namespace and state:
        parts += [f"boot={boot}", f"pidns={namespace}", f"start={state[1]}"]
    return " ".join(parts)


_INSTALL_LOCK = 7263541  # the advisory lock key of install()


async def install(session: Session) -> None:
    """Create the bookkeeping tables if missing."""
    # concurrent CREATE TABLE IF NOT EXISTS can collide in a server's catalog: serialize it
    lock = session.flavor.advisory_lock(_INSTALL_LOCK)
    if lock is not None:
        await session.execute(lock)
    for stmt in DDL:
        await session.execute(stmt)


async def installed(session: Session) -> bool:
    """Whether every bookkeeping table exists (a read-only check; raises if none does)."""
    await session.fetchone("SELECT name FROM cqrskit_projections LIMIT 1")
    try:
        async with session.savepoint():
            await session.fetchone("SELECT name FROM cqrskit_lease_holders LIMIT 1")
    except Exception:  # noqa: BLE001 - a table added by a later release: install() adds it
        return False
    return True


async def load(session: Session, name: str) -> ProjectionRow | None:
    """The projection's row, or ``None`` if it was never set up."""
    row = await session.fetchone(
        "SELECT name, active_generation, building_generation, mode, lease_owner, "
        "lease_epoch, lease_beat FROM cqrskit_projections WHERE name = ?",
        name,
    )
    return None if row is None else ProjectionRow(*row)


async def create_generation(session: Session, projection: Projection, generation: int) -> None:
    """Create ``generation``'s tables and its checkpoint (at 0)."""
    for stmt in projection.ddl(generation, session.qualify):
        await session.execute(stmt)
    await session.execute(
        "INSERT INTO cqrskit_checkpoints (projection, generation, position, updated_at) "
        "VALUES (?, ?, 0, ?)",
        projection.name,
        generation,
        time.time(),
    )


async def point_views(session: Session, projection: Projection, generation: int) -> None:
    """(Re)create one view per logical table, reading ``generation``'s physical table."""
    for table in projection.tables:
        view = session.qualify(table)
        await session.execute(f"DROP VIEW IF EXISTS {view}")
        await session.execute(
            f"CREATE VIEW {view} AS SELECT * FROM "
            f"{session.qualify(physical_table(table, generation))}"
        )


async def ensure_projection(session: Session, projection: Projection, mode: str) -> ProjectionRow:
    """Install the bookkeeping, set the projection up (generation 1) if new, record ``mode``."""
    await install(session)
    row = await load(session, projection.name)
    if row is None:
        await create_generation(session, projection, 1)
        await point_views(session, projection, 1)
        await session.execute(
            "INSERT INTO cqrskit_projections (name, active_generation, mode) VALUES (?, 1, ?)",
            projection.name,
            mode,
        )
    elif row.mode != mode:
        await session.execute(
            "UPDATE cqrskit_projections SET mode = ? WHERE name = ?", mode, projection.name
        )
    row = await load(session, projection.name)
    assert row is not None
    return row


async def get_checkpoint(session: Session, name: str, generation: int) -> int:
    """The last applied position of (projection, generation)."""
    value = await session.fetchval(
        "SELECT position FROM cqrskit_checkpoints WHERE projection = ? AND generation = ?",
        name,
        generation,
    )
    return int(value or 0)


async def max_parked(session: Session, name: str, generation: int) -> int:
    """The highest position of a parked event of ``generation`` (0: none)."""
    value = await session.fetchval(
        "SELECT max(position) FROM cqrskit_dead_letters WHERE projection = ? AND generation = ?",
        name,
        generation,
    )
    return int(value or 0)


async def set_checkpoint(session: Session, name: str, generation: int, position: int) -> None:
    """Raise the checkpoint to ``position`` (never lowers it)."""
    await session.execute(
        f"UPDATE cqrskit_checkpoints SET position = {session.flavor.greatest}(position, ?), "
        "updated_at = ? "
        "WHERE projection = ? AND generation = ?",
        position,
        time.time(),
        name,
        generation,
    )


async def fence(
    session: Session, name: str, epoch: int, *, hold: float | None = None, beat: bool = True
) -> bool:
    """Check the lease is still ours (and, with ``beat``, beat it); ``False`` means another
    took over.

    The fence locks the projection's row until the transaction ends, so a standby's take
    waits for it. With ``hold`` (seconds) on PostgreSQL, the server ends this session if it
    then sits idle in the transaction that long (``idle_in_transaction_session_timeout``,
    for this transaction only): a holder that froze mid-transaction (SIGSTOP, a stalled
    host) cannot keep the row locked, so a standby takes over, and the frozen one's
    transaction can never commit.

    ``beat=False`` locks the row without writing a new version of it: a leader committing
    hundreds of batches a second beats only every so often (the caller decides), so the
    lease row does not pile up dead versions while a long transaction elsewhere holds
    PostgreSQL's xmin back.
    """
    flavor = session.flavor
    idle = None if hold is None else flavor.idle_limit(hold)
    if not beat:
        # (SQLite's BEGIN IMMEDIATE already holds the database's write lock: no suffix)
        where = (
            f"FROM cqrskit_projections WHERE name = ? AND lease_epoch = ?{flavor.for_no_key_update}"
        )
        if idle is not None:
            limit, value = idle
            row = await session.fetchone(f"SELECT {limit} {where}", value, name, epoch)
        else:
            row = await session.fetchone(f"SELECT 1 {where}", name, epoch)
        return row is not None
    sql = (
        "UPDATE cqrskit_projections SET lease_beat = lease_beat + 1 "
        "WHERE name = ? AND lease_epoch = ?"
    )
    if idle is not None:
        # RETURNING runs for the fenced row only: one round trip, nothing set if not ours
        limit, value = idle
        return await session.execute(f"{sql} RETURNING {limit}", name, epoch, value) == 1
    return await session.execute(sql, name, epoch) == 1


async def take_lease(session: Session, name: str, owner: str, seen: ProjectionRow) -> int | None:
    """Take the lease if it is still as ``seen``; return the new epoch, else ``None``.

    Records this process (:func:`process_identity`, pid) as the holder of the new epoch."""
    changed = await session.execute(
        "UPDATE cqrskit_projections SET lease_owner = ?, lease_epoch = lease_epoch + 1 "
        "WHERE name = ? AND lease_epoch = ? AND lease_beat = ?",
        owner,
        name,
        seen.lease_epoch,
        seen.lease_beat,
    )
    if changed != 1:
        return None
    epoch = seen.lease_epoch + 1
    await session.execute(
        "INSERT INTO cqrskit_lease_holders (name, epoch, host, pid, taken_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET epoch = excluded.epoch, "
        "host = excluded.host, pid = excluded.pid, taken_at = excluded.taken_at",
        name,
        epoch,
        process_identity(os.getpid()),
        os.getpid(),
        time.time(),
    )
    return epoch


async def lease_holder(session: Session, name: str) -> LeaseHolder | None:
    """The process that took ``name``'s current lease epoch, if recorded."""
    row = await session.fetchone(
        "SELECT h.epoch, h.host, h.pid FROM cqrskit_lease_holders h "
        "JOIN cqrskit_projections p ON p.name = h.name AND p.lease_epoch = h.epoch "
        "WHERE h.name = ?",
        name,
    )
    return None if row is None else LeaseHolder(int(row[0]), str(row[1]), int(row[2]))


async def release_lease(session: Session, name: str, epoch: int) -> None:
    """Give the lease up so a standby takes over at once."""
    await session.execute(
        "UPDATE cqrskit_projections SET lease_owner = NULL, lease_beat = lease_beat + 1 "
        "WHERE name = ? AND lease_epoch = ?",
        name,
        epoch,
    )


async def start_rebuild(session: Session, projection: Projection) -> int:
    """Create the next generation's empty tables and mark it as rebuilding; return it."""
    row = await load(session, projection.name)
    if row is None:
        row = await ensure_projection(session, projection, "async")
    if row.building_generation is not None:
        return row.building_generation
    top = await session.fetchval(
        "SELECT max(generation) FROM cqrskit_checkpoints WHERE projection = ?", projection.name
    )
    generation = int(top) + 1
    await create_generation(session, projection, generation)
    await session.execute(
        "UPDATE cqrskit_projections SET building_generation = ? WHERE name = ?",
        generation,
        projection.name,
    )
    return generation


async def switch_over(session: Session, projection: Projection, old: int, new: int) -> None:
    """Make ``new`` the active generation, repoint the views and drop ``old``'s tables."""
    await point_views(session, projection, new)
    await session.execute(
        "UPDATE cqrskit_projections SET active_generation = ?, building_generation = NULL "
        "WHERE name = ?",
        new,
        projection.name,
    )
    for table in projection.tables:
        await session.execute(f"DROP TABLE IF EXISTS {session.qualify(physical_table(table, old))}")
    await session.execute(
        "DELETE FROM cqrskit_checkpoints WHERE projection = ? AND generation = ?",
        projection.name,
        old,
    )
    await session.execute(
        "DELETE FROM cqrskit_dead_letters WHERE projection = ? AND generation = ?",
        projection.name,
        old,
    )
