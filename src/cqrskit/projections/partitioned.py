"""The partitioned projector: a projection's log tailing split over worker processes.

:class:`PartitionedProjector` runs the same projections as the
:class:`~cqrskit.projections.Projector`, from the same event log, but split into N
partitions by stream (:func:`~cqrskit.messaging.partition_of`) that the worker processes
share through leases (:mod:`cqrskit.projections.partitions`). Each worker reads the log once
for all the partitions it holds (after the lowest of their checkpoints, with the same
gap-free ``read_after``), applies the events of those partitions in position order, and
commits the changes with every held partition's checkpoint in one read-database
transaction whose checkpoint statement matches each partition's lease epoch. A stream
lives in one partition, so its events are applied in order by one worker at a time; a
worker that lost a partition can never commit to it again.

Starting it on a projection the one-process projector ran before starts every partition
at that projection's checkpoint: nothing is lost or applied twice. The partitions'
checkpoints are also what a broker :class:`~cqrskit.messaging.Consumer` uses, so a
projection can move between the two with the same number of partitions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

from cqrskit.eventlog import EventStore, StoredEvent
from cqrskit.messaging.partitioning import check_partitions, partition_of
from cqrskit.projections.api import Projection
from cqrskit.projections.apply import Applier, infrastructure_fault
from cqrskit.projections.db import ReadDatabase, Session
from cqrskit.projections.partitions import PartitionLeases, PartitionLostError
from cqrskit.projections.signal import Signal

__all__ = ["PartitionedProjector"]

log = logging.getLogger("cqrskit.projections")


class PartitionedProjector:
    """Runs projections from the event log, partitioned across worker processes.

    Use as an async context manager, or ``await projector.run()`` until
    :meth:`request_stop`. Arguments are the :class:`~cqrskit.projections.Projector`'s,
    plus:

    Args:
        partitions: N (the same in every worker; a stream's partition is
            ``partition_of(stream, N)``).
        max_partitions: hold at most this many partitions per projection.
    """

    def __init__(
        self,
        store: EventStore,
        read_db: ReadDatabase,
        projections: Sequence[Projection],
        decoder: Any,
        *,
        partitions: int,
        batch_size: int = 500,
        lease_ttl: float = 5.0,
        max_attempts: int = 3,
        state_interval: float = 0.5,
        poll_interval: float = 1.0,
        max_partitions: int | None = None,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.read_db = read_db
        self.decoder = decoder
        self.partitions = check_partitions(partitions)
        self.batch_size = batch_size
        self.lease_ttl = lease_ttl
        self.max_attempts = max_attempts
        self.state_interval = state_interval
        self.poll_interval = min(poll_interval, lease_ttl / 4)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.signal = Signal()
        #: counters over the process's life: applied, batches
        self.counts: dict[str, int] = {}
        self._groups = [_LogGroup(self, p, max_partitions) for p in projections]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def owned(self, name: str) -> dict[int, int]:
        """Partitions (-> lease epoch) this worker holds for projection ``name``."""
        return next((dict(g.leases.owned) for g in self._groups if g.name == name), {})

    def leading(self, name: str) -> bool:
        """Whether this worker holds any partition of projection ``name``."""
        return bool(self.owned(name))

    def checkpoint(self, name: str) -> int:
        """The lowest position this worker committed among the partitions it holds of
        ``name`` (0 when it holds none)."""
        cps = self.checkpoints(name)
        return min(cps.values()) if cps else 0

    def checkpoints(self, name: str) -> dict[int, int]:
        """The positions this worker committed for the partitions it holds of ``name``."""
        return next((dict(g.cps) for g in self._groups if g.name == name), {})

    async def start(self) -> None:
        """Set the projections up, then start claiming partitions and applying."""
        self._stop.clear()
        for g in self._groups:
            await g.leases.setup()
        self._tasks = []
        for g in self._groups:
            self._tasks.append(asyncio.create_task(g.tick_loop(), name=f"leases:{g.name}"))
            self._tasks.append(asyncio.create_task(g.apply_loop(), name=f"projector:{g.name}"))

    async def stop(self) -> None:
        """Finish the batch in flight, release the partitions and stop."""
        self._stop.set()
        tasks, self._tasks = self._tasks, []
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in self._groups:
            await g.leases.release_all()

    async def run(self) -> None:
        """Start, then run until :meth:`request_stop`."""
        await self.start()
        await self._stop.wait()
        await self.stop()

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (safe from a signal handler)."""
        self._stop.set()

    async def __aenter__(self) -> PartitionedProjector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass


class _LogGroup:
    """One projection in this worker: the lease tick and the log-reading loop."""

    def __init__(
        self, owner: PartitionedProjector, projection: Projection, cap: int | None
    ) -> None:
        self.p = owner
        self.projection = projection
        self.name = projection.name
        self.leases = PartitionLeases(
            owner.read_db,
            projection,
            owner.partitions,
            owner.owner,
            owner.lease_ttl,
            mode="partitioned",
            max_partitions=cap,
        )
        self.applier = Applier(projection, owner.decoder, max_attempts=owner.max_attempts)
        #: partition -> committed position, for the partitions held
        self.cps: dict[int, int] = {}
        self.lock = asyncio.Lock()
        self.changed = asyncio.Event()
        self.failures = 0  # restarts of the apply loop since it last completed a round

    async def tick_loop(self) -> None:
        p = self.p
        failures = 0
        while not p._stop.is_set():
            try:
                async with self.lock:  # never between a batch's read of `owned` and commit
                    tick = await self.leases.tick()
                    if tick.release:
                        await self.leases.release(tick.release)
                failures = 0
                if tick.gained or tick.lost or tick.release:
                    self.changed.set()
                    p.signal.notify()
            except Exception:
                failures += 1
                log.exception("projection %s: lease tick failed", self.name)
            pause = p.lease_ttl / 4
            await p._pause(min(pause, 0.05 * 2**failures) if failures else pause)

    async def apply_loop(self) -> None:
        p = self.p
        self.failures = 0
        while not p._stop.is_set():
            try:
                await self._run()
            except PartitionLostError as exc:
                log.warning("projection %s: %s", self.name, exc)
            except Exception:
                # grows while failures repeat; back to the shortest once a round succeeds
                self.failures += 1
                log.exception("projection %s: worker failed; restarting", self.name)
                await p._pause(min(5.0, 0.05 * 2 ** min(self.failures, 7)))
            self.cps.clear()  # reload from the database after any failure

    async def _run(self) -> None:
        p, leases = self.p, self.leases
        next_check = 0.0
        backoff: float | None = None
        while not p._stop.is_set():
            owned = dict(leases.owned)
            now = time.monotonic()
            for part in owned:
                leases.progress[part] = now
            if not owned:
                self.cps.clear()
                self.changed.clear()
                try:
                    await asyncio.wait_for(self.changed.wait(), p.lease_ttl / 4)
                except TimeoutError:
                    pass
                continue
            await self._load(owned)
            if now >= next_check:
                next_check = now + p.state_interval
                await self._retry_flagged(owned)
            low = min(self.cps[part] for part in owned)
            mine, last = await self._read(owned, low)
            if last is not None:
                await self._commit(owned, mine, last)
                p.signal.notify()
                backoff = None
                self.failures = 0
                await asyncio.sleep(0)
                continue
            self.failures = 0  # caught up
            limit = p.poll_interval
            woke = await self._wait(low, backoff or limit)
            if woke:
                backoff = 0.001 if backoff is None else min(backoff * 2, limit)
            elif backoff is None or backoff >= limit:
                backoff = None
            else:
                backoff = min(backoff * 2, limit)

    async def _load(self, owned: dict[int, int]) -> None:
        for part in list(self.cps):
            if part not in owned:
                del self.cps[part]
        new = [part for part in owned if part not in self.cps]
        if not new:
            return
        async with self.p.read_db.transaction(hold=self.p.lease_ttl) as s:
            for part in new:
                self.cps[part] = (await self.leases.load(s, part)).position
            await self.applier.load_blocked(s, self.leases.generation)

    async def _wait(self, position: int, timeout: float) -> bool:
        p = self.p
        waiter = asyncio.ensure_future(p.store.wait_for(position, timeout))
        others = [asyncio.ensure_future(p._stop.wait()), asyncio.ensure_future(self.changed.wait())]
        done, pending = await asyncio.wait({waiter, *others}, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self.changed.clear()
        return waiter in done and not waiter.cancelled() and bool(waiter.result())

    async def _read(self, owned: dict[int, int], low: int) -> tuple[list[StoredEvent], int | None]:
        """This worker's next batch: up to ``batch_size`` events of its partitions, reading
        the log past the others' events (at most ``partitions`` reads), and the position
        read up to (``None``: nothing new). Commits then carry ``batch_size`` events of
        this worker, not of the whole log: the number of commits shrinks as workers are
        added, which is what makes a latency-bound read model scale out."""
        p, cps, n = self.p, self.cps, self.p.partitions
        mine: list[StoredEvent] = []
        last: int | None = None
        position = low
        for _ in range(max(1, n)):
            events = await p.store.read_after(position, p.batch_size)
            if not events:
                break
            mine += [
                e
                for e in events
                if (q := partition_of(e.stream, n)) in owned and e.position > cps[q]
            ]
            position = last = events[-1].position
            if len(mine) >= p.batch_size or len(events) < p.batch_size:
                break
        return mine, last

    async def _commit(self, owned: dict[int, int], mine: Sequence[StoredEvent], last: int) -> None:
        cps = self.cps
        gen = self.leases.generation
        db = self.p.read_db
        async with self.lock:
            if dict(self.leases.owned) != owned:
                return  # the tick changed the partitions since the read: read again
            try:
                async with db.transaction(hold=self.p.lease_ttl) as s:
                    await self.applier.apply_fast(s, gen, mine)
                    await self.leases.commit_log_position(s, owned, last)
            except PartitionLostError:
                raise
            except Exception as exc:
                if infrastructure_fault(exc):
                    raise
                log.info("projection %s: batch failed (%s); event by event", self.name, exc)
                async with db.transaction(hold=self.p.lease_ttl) as s:
                    await self.applier.load_blocked(s, gen)
                    parked = await self.applier.apply_careful(s, gen, mine)
                    await self.leases.commit_log_position(s, owned, last)
                if parked:
                    log.warning("projection %s: parked %d event(s)", self.name, parked)
        for part in owned:
            cps[part] = max(cps[part], last)
        counts = self.p.counts
        counts["applied"] = counts.get("applied", 0) + len(mine)
        counts["batches"] = counts.get("batches", 0) + 1

    async def _retry_flagged(self, owned: dict[int, int]) -> None:
        """Re-apply dead letters flagged for retry whose streams are in held partitions, in
        order per stream (a stream stops at its first event that fails again)."""
        db, gen, n = self.p.read_db, self.leases.generation, self.p.partitions
        async with db.read_only() as s:
            rows = await s.fetchall(
                "SELECT position, stream, version FROM cqrskit_dead_letters WHERE "
                "projection = ? AND generation = ? AND retry = 1 ORDER BY position",
                self.name,
                gen,
            )
        rows = [r for r in rows if partition_of(str(r[1]), n) in owned]
        if not rows:
            return
        async with self.lock:
            if dict(self.leases.owned) != owned:
                return
            async with db.transaction(hold=self.p.lease_ttl) as s:
                failed: set[str] = set()
                for position, stream, version in rows:
                    if stream in failed:
                        continue
                    error = await self._attempt(s, gen, int(position), str(stream), int(version))
                    if error is None:
                        await s.execute(
                            "DELETE FROM cqrskit_dead_letters WHERE projection = ? AND "
                            "generation = ? AND position = ?",
                            self.name,
                            gen,
                            position,
                        )
                        continue
                    failed.add(str(stream))
                    await s.execute(
                        "UPDATE cqrskit_dead_letters SET error = ?, attempts = attempts + 1, "
                        "parked_at = ?, retry = 0 WHERE projection = ? AND generation = ? "
                        "AND position = ?",
                        error[:2000],
                        time.time(),
                        self.name,
                        gen,
                        position,
                    )
                for position, _stream, _version in rows:
                    await s.execute(
                        "UPDATE cqrskit_dead_letters SET retry = 0 WHERE projection = ? "
                        "AND generation = ? AND position = ?",
                        self.name,
                        gen,
                        position,
                    )
                await self.applier.load_blocked(s, gen)
                await self.leases.commit_log_position(s, owned, min(self.cps[q] for q in owned))
        self.p.signal.notify()

    async def _attempt(
        self, s: Session, generation: int, position: int, stream: str, version: int
    ) -> str | None:
        found = [
            e for e in await self.p.store.read_stream(stream, version - 1) if e.position == position
        ]
        if not found:
            return "event not in the log"
        ctx = self.applier.context(s, generation)
        error: str | None = None
        for _ in range(self.applier.max_attempts):
            try:
                async with s.savepoint():
                    await self.applier.apply_one(ctx, found[0])
                    flush = getattr(self.applier, "flush", None)
                    if flush is not None:
                        await flush(ctx)
            except Exception as exc:  # a handler failure is data: stays parked
                if infrastructure_fault(exc):
                    raise
                error = f"{type(exc).__name__}: {exc}"
                continue
            return None
        return error
