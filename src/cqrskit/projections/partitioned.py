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

Rebuilds: a worker runs up to two groups per projection — the active generation's
partitions (when their number is the worker's N) and those of a generation being rebuilt
(when theirs is), each with its own leases, checkpoints and log-reading loop; the worker
holding the new generation's partition 0 switches it over once it caught up
(:mod:`cqrskit.projections.partition_switch`). A batch's transaction stores the
checkpoint *first* (the fenced statement), then applies: a fenced worker touches nothing,
and every transaction that ends in the old generation's tables takes the partition rows'
locks before the tables', in the order the switch takes them.
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

from cqrskit._partitioning import check_partitions, partition_of
from cqrskit._stopping import cancel_and_wait, check_stop_timeout, finish_or_abandon
from cqrskit.errors import ConfigurationError
from cqrskit.eventlog import EventStore, StoredEvent
from cqrskit.projections import schema
from cqrskit.projections.api import Projection
from cqrskit.projections.apply import Applier, infrastructure_fault
from cqrskit.projections.db import ReadDatabase, Session
from cqrskit.projections.partition_switch import Switcher, prepare_build
from cqrskit.projections.partitions import (
    GenerationMovedError,
    PartitionLeases,
    PartitionLostError,
    build_key,
    install,
    key_partitions,
    partition_mismatch,
)
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
            ``partition_of(stream, N)``). A worker serves the active generation when its
            partitions number N, and builds a generation being rebuilt
            (:func:`~cqrskit.projections.request_rebuild`) whose partitions number N; one
            that can do neither stops with a :class:`~cqrskit.errors.ConfigurationError`
            naming both numbers — at :meth:`start`, or when a rebuild switched to another
            number (:meth:`run` then raises it; :attr:`error` holds it).
        max_partitions: hold at most this many partitions per projection (and generation).
        stop_timeout: seconds :meth:`stop` waits for the batches in flight to commit
            before abandoning them (cancelled; their transactions roll back and their
            checkpoints do not move, so whoever takes the partitions next applies those
            events); the partitions are released either way, so another worker takes them
            at once instead of after ``lease_ttl`` (default 10; a finite number >= 0).

    Raises:
        ConfigurationError: ``stop_timeout`` is negative or not finite.
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
        stop_timeout: float = 10.0,
    ) -> None:
        self.stop_timeout = check_stop_timeout(stop_timeout)
        self.store = store
        self.read_db = read_db
        self.decoder = decoder
        self.partitions = check_partitions(partitions)
        self.batch_size = batch_size
        self.lease_ttl = lease_ttl
        self.max_attempts = max_attempts
        self.state_interval = state_interval
        self.poll_interval = min(poll_interval, lease_ttl / 4)
        self.max_partitions = max_partitions
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.signal = Signal()
        #: counters over the process's life: applied, batches, switches
        self.counts: dict[str, int] = {}
        #: why the worker stopped by itself (a number of partitions it cannot work with)
        self.error: ConfigurationError | None = None
        self._slots = [_Slot(self, p) for p in projections]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def _group(self, name: str, building: bool) -> _LogGroup | None:
        slot = next((s for s in self._slots if s.name == name), None)
        if slot is None:
            return None
        return slot.build if building else slot.serve

    def owned(self, name: str, *, building: bool = False) -> dict[int, int]:
        """Partitions (-> lease epoch) this worker holds for projection ``name`` (of the
        generation being rebuilt with ``building=True``)."""
        g = self._group(name, building)
        return {} if g is None else dict(g.leases.owned)

    def leading(self, name: str) -> bool:
        """Whether this worker holds any partition of projection ``name``."""
        return bool(self.owned(name))

    def checkpoint(self, name: str) -> int:
        """The lowest position this worker committed among the partitions it holds of
        ``name`` (0 when it holds none)."""
        cps = self.checkpoints(name)
        return min(cps.values()) if cps else 0

    def checkpoints(self, name: str, *, building: bool = False) -> dict[int, int]:
        """The positions this worker committed for the partitions it holds of ``name``."""
        g = self._group(name, building)
        return {} if g is None else dict(g.cps)

    def generations(self, name: str) -> tuple[int | None, int | None]:
        """The generations of ``name`` this worker works on: (served, being built)."""
        slot = next((s for s in self._slots if s.name == name), None)
        if slot is None:
            return None, None
        return (
            None if slot.serve is None else slot.serve.leases.generation,
            None if slot.build is None else slot.build.leases.generation,
        )

    async def start(self) -> None:
        """Set the projections up, then start claiming partitions and applying.

        Raises:
            ConfigurationError: this worker's number of partitions fits neither the active
                generation nor one being rebuilt.
        """
        self._stop.clear()
        self.error = None
        for slot in self._slots:
            await slot.setup()
        self._tasks = [
            asyncio.create_task(slot.run(), name=f"partitions:{slot.name}") for slot in self._slots
        ]

    async def stop(self, timeout: float | None = None) -> None:
        """Finish the batches in flight, release the partitions and stop.

        A batch still running after ``timeout`` seconds (default :attr:`stop_timeout`) is
        abandoned: its loop is cancelled, its transaction rolls back (its partitions'
        checkpoints do not move: the next holder applies those events), and the partitions
        are released all the same, so another worker takes them at once instead of after
        ``lease_ttl``. It returns within about ``timeout`` plus a second and the releases: a
        loop whose unwinding hangs as well (a rollback, a subscription's close) is cancelled
        again, then left behind (fenced).

        Raises:
            ConfigurationError: ``timeout`` is negative or not finite.
        """
        limit = self.stop_timeout if timeout is None else check_stop_timeout(timeout, "timeout")
        self._stop.set()
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        await finish_or_abandon(
            tasks,
            [slot.abandon for slot in self._slots],
            limit,
            log,
            f"partitioned projector {self.owner}",
        )

    async def run(self) -> None:
        """Start, then run until :meth:`request_stop`.

        Raises:
            ConfigurationError: see :meth:`start`; also when a rebuild switched the
                projection to a number of partitions other than this worker's (it stops).
        """
        await self.start()
        await self._stop.wait()
        await self.stop()
        if self.error is not None:
            raise self.error

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (safe from a signal handler)."""
        self._stop.set()

    async def __aenter__(self) -> PartitionedProjector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _fail(self, error: ConfigurationError) -> None:
        if self.error is None:
            self.error = error
        log.error("partitioned projector %s stops: %s", self.owner, error)
        self._stop.set()

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass


class _Slot:
    """One projection in this worker: the groups it runs (the active generation's
    partitions, a rebuilt generation's, or both), their lease ticks, the switch."""

    def __init__(self, owner: PartitionedProjector, projection: Projection) -> None:
        self.p = owner
        self.projection = projection
        self.name = projection.name
        self.serve: _LogGroup | None = None
        self.build: _LogGroup | None = None
        self.switcher: Switcher | None = None
        self.tasks: dict[_LogGroup, asyncio.Task[None]] = {}
        self.active = 0
        #: the generation being rebuilt when the groups were set up
        self.pending: int | None = None

    def groups(self) -> list[_LogGroup]:
        return [g for g in (self.serve, self.build) if g is not None]

    async def _plan(self) -> tuple[int, int | None, int | None, int | None]:
        """(active generation and its N, generation being rebuilt and its N)."""
        async with self.p.read_db.transaction() as s:
            await install(s)
            row = await schema.ensure_projection(s, self.projection, "partitioned")
            active_n = await key_partitions(s, self.name)
            building = row.building_generation
            building_n: int | None = None
            if building is not None:
                building_n = await key_partitions(s, build_key(self.name, building))
                if building_n is None:  # requested before any partitioned worker ran
                    building_n = await prepare_build(
                        s, self.projection, building, self.p.partitions
                    )
        return row.active_generation, active_n, building, building_n

    async def setup(self) -> None:
        """Choose and set up the groups for the generations as they are now."""
        for attempt in range(5):
            try:
                await self._setup()
                return
            except GenerationMovedError:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)

    async def _setup(self) -> None:
        p, n = self.p, self.p.partitions
        active, active_n, building, building_n = await self._plan()
        serve = active_n is None or active_n == n
        build = building is not None and building_n == n
        if not serve and not build:
            assert active_n is not None
            raise partition_mismatch(self.name, n, active, active_n, building, building_n)
        if serve and building is not None and not build:
            log.warning(
                "projection %s: generation %d is being rebuilt with %s partitions by the "
                "workers started with that number; this worker (%d partitions) serves "
                "generation %d until the switch, then stops (start it again with "
                "--partitions %s)",
                self.name,
                building,
                building_n,
                n,
                active,
                building_n,
            )
        if not serve:
            log.info(
                "projection %s: this worker builds generation %d (%d partitions); "
                "generation %d (%s partitions) is served by the workers started with that "
                "number",
                self.name,
                building,
                n,
                active,
                active_n,
            )
        self.active, self.pending = active, building
        if serve and (self.serve is None or self.serve.leases.generation != active):
            g = _LogGroup(p, self.projection, None)
            await g.leases.setup()
            self.serve = g
        elif not serve:
            self.serve = None
        if build and building is not None:
            if self.build is None or self.build.leases.building != building:
                g = _LogGroup(p, self.projection, building)
                await g.leases.setup()
                self.build = g
                self.switcher = Switcher(g.leases, active, p.lease_ttl)
        else:
            self.build = None
            self.switcher = None

    async def run(self) -> None:
        p = self.p
        failures = 0
        next_tick = 0.0
        try:
            self._start_loops()
            while not p._stop.is_set():
                try:
                    try:
                        again = False
                        if time.monotonic() >= next_tick:
                            next_tick = time.monotonic() + p.lease_ttl / 4
                            again = await self._tick()
                        if not again:
                            again = await self._switch()
                    except GenerationMovedError as exc:
                        log.info("projection %s: %s; setting up again", self.name, exc)
                        again = True
                    if again:
                        await self._reconcile()
                        next_tick = 0.0
                    failures = 0
                except ConfigurationError as exc:
                    p._fail(exc)
                    break
                except Exception as exc:
                    failures += 1
                    next_tick = 0.0
                    if infrastructure_fault(exc):
                        log.warning("projection %s: lease tick failed (%s)", self.name, exc)
                    else:
                        log.exception("projection %s: lease tick failed", self.name)
                await self._wait(failures, next_tick)
        except asyncio.CancelledError:
            for task in self.tasks.values():  # gone without a word (a crash, in tests)
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            raise
        await self._let_go()

    async def _wait(self, failures: int, next_tick: float) -> None:
        p = self.p
        pause = max(0.0, next_tick - time.monotonic())
        if failures:
            pause = min(p.lease_ttl / 4, 0.05 * 2**failures)
        elif self.switcher is not None and self.switcher.holding and self.build is not None:
            # the active side stands still: look again as soon as the new one committed
            # (here, or within 50 ms for the other workers' commits)
            self.build.committed.clear()
            waiter = asyncio.ensure_future(self.build.committed.wait())
            stopper = asyncio.ensure_future(p._stop.wait())
            await asyncio.wait({waiter, stopper}, timeout=min(pause, 0.05))
            waiter.cancel()
            stopper.cancel()
            await asyncio.gather(waiter, stopper, return_exceptions=True)
            return
        await p._pause(pause)

    async def _tick(self) -> bool:
        """Tick every group's leases; ``True`` when the groups must be set up again (a
        rebuild was requested or cancelled)."""
        p = self.p
        for g in self.groups():
            async with g.lock:  # never between a batch's read of `owned` and commit
                tick = await g.leases.tick()
                if tick.release:
                    await g.leases.release(tick.release)
            if tick.gained or tick.lost or tick.release:
                g.changed.set()
                p.signal.notify()
        return self.serve is not None and self.serve.leases.pending != self.pending

    async def _switch(self) -> bool:
        """Run the switch from the worker holding the new generation's partition 0;
        ``True`` once it switched over."""
        if self.switcher is None or self.build is None or 0 not in self.build.leases.owned:
            if self.switcher is not None:
                await self.switcher.let_go()  # partition 0 moved on: so does the switch
            return False
        if not await self.switcher.step():
            return False
        p = self.p
        p.counts["switches"] = p.counts.get("switches", 0) + 1
        p.signal.notify()
        return True

    def _start_loops(self) -> None:
        for g in self.groups():
            if g not in self.tasks:
                self.tasks[g] = asyncio.create_task(
                    g.apply_loop(), name=f"projector:{g.leases.label}"
                )

    async def _stop_loops(self, keep: set[_LogGroup]) -> None:
        gone = [g for g in self.tasks if g not in keep]
        for g in gone:
            g.stopping.set()
            g.changed.set()
        tasks = [self.tasks[g] for g in gone]
        if tasks:
            # cancelled meanwhile (a stop's timeout abandons this): so are the loops
            pending: set[asyncio.Task[None]] = set(tasks)
            try:
                _done, pending = await asyncio.wait(tasks, timeout=self.p.lease_ttl)
            finally:
                for t in pending:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        for g in gone:
            self.tasks.pop(g, None)
        for g in gone:
            await g.leases.release_all()

    async def _reconcile(self) -> None:
        """Set the groups up again for the generations as they are now: keep those still
        valid, stop the others (their partitions are fenced already), start the new."""
        if self.switcher is not None:
            await self.switcher.let_go()
        try:
            await self.setup()
        finally:
            await self._stop_loops({g for g in (self.serve, self.build) if g is not None})
        self._start_loops()

    async def abandon(self) -> None:
        """After a stop's timeout cancelled :meth:`run`: cancel any loop still running
        (its transaction rolls back), then give back what a switch held and release the
        partitions (the epoch guard makes a release of a partition lost meanwhile a
        no-op)."""
        tasks = list(self.tasks.values())
        self.tasks.clear()
        await cancel_and_wait(tasks)
        if self.switcher is not None:
            await self.switcher.let_go()
        for g in self.groups():
            await g.leases.release_all()

    async def _let_go(self) -> None:
        """A graceful stop: give back anything held for a switch, finish the batches in
        flight, release the partitions."""
        if self.switcher is not None:
            await self.switcher.let_go()
        await self._stop_loops(set())


class _LogGroup:
    """One generation's partitions of a projection in this worker: the log-reading loop
    (the lease tick runs in the projection's :class:`_Slot`)."""

    def __init__(
        self, owner: PartitionedProjector, projection: Projection, building: int | None
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
            max_partitions=owner.max_partitions,
            building=building,
        )
        self.applier = Applier(projection, owner.decoder, max_attempts=owner.max_attempts)
        #: partition -> committed position, for the partitions held
        self.cps: dict[int, int] = {}
        self.lock = asyncio.Lock()
        self.changed = asyncio.Event()
        #: set after each committed batch (the switch waits on it)
        self.committed = asyncio.Event()
        #: set to end this group's loop (its generation moved on)
        self.stopping = asyncio.Event()
        self.failures = 0  # restarts of the apply loop since it last completed a round

    def halted(self) -> bool:
        return self.p._stop.is_set() or self.stopping.is_set()

    async def apply_loop(self) -> None:
        self.failures = 0
        while not self.halted():
            try:
                await self._run()
            except PartitionLostError as exc:
                log.warning("%s", exc)
                # until the tick says which partitions this worker still holds
                self.changed.clear()
                await self._pause(self.p.lease_ttl / 4, self.changed)
            except Exception:
                # grows while failures repeat; back to the shortest once a round succeeds
                self.failures += 1
                log.exception("projection %s: worker failed; restarting", self.leases.label)
                # the worker's own pause (what its stop ends); a group halted meanwhile
                # ends its loop once the pause is over (at most 5 s)
                await self.p._pause(min(5.0, 0.05 * 2 ** min(self.failures, 7)))
            self.cps.clear()  # reload from the database after any failure

    async def _pause(self, seconds: float, *events: asyncio.Event) -> None:
        """Wait ``seconds``, or less when stopped or one of ``events`` is set."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self.stopping, self.p._stop, *events)]
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)

    async def _run(self) -> None:
        p, leases = self.p, self.leases
        next_check = 0.0
        backoff: float | None = None
        while not self.halted():
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
        others = [
            asyncio.ensure_future(p._stop.wait()),
            asyncio.ensure_future(self.changed.wait()),
            asyncio.ensure_future(self.stopping.wait()),
        ]
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
            # the fenced checkpoint first: a fenced worker touches no table, and the
            # partition rows are locked before the tables (the switch's order)
            try:
                async with db.transaction(hold=self.p.lease_ttl) as s:
                    await self.leases.commit_log_position(s, owned, last)
                    await self.applier.apply_fast(s, gen, mine)
            except PartitionLostError:
                raise
            except Exception as exc:
                if infrastructure_fault(exc):
                    raise
                log.info("projection %s: batch failed (%s); event by event", self.leases.label, exc)
                async with db.transaction(hold=self.p.lease_ttl) as s:
                    await self.leases.commit_log_position(s, owned, last)
                    await self.applier.load_blocked(s, gen)
                    parked = await self.applier.apply_careful(s, gen, mine)
                if parked:
                    log.warning("projection %s: parked %d event(s)", self.leases.label, parked)
        for part in owned:
            cps[part] = max(cps[part], last)
        counts = self.p.counts
        counts["applied"] = counts.get("applied", 0) + len(mine)
        counts["batches"] = counts.get("batches", 0) + 1
        self.committed.set()

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
                await self.leases.commit_log_position(s, owned, min(self.cps[q] for q in owned))
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
