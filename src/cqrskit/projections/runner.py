"""The projector: tails the event log and applies batches to a read database.

One :class:`Projector` runs one worker task per projection. A worker first takes the
projection's lease (standing by while another process holds a live one), then loops: read a
batch after its checkpoint, apply it and raise the checkpoint in one read-database
transaction that also checks the lease epoch (fencing), announce it, and when there is
nothing to read wait on the store's wake-up hint (never a fixed sleep on that path).

Every wait is bounded. A lease holder's transaction lasts at most ``3/4 lease_ttl`` (a handler
awaiting something that never comes is cancelled and rolled back; a batch that is merely
slow is retried in halves); on PostgreSQL the server ends a holder's session that froze
inside a transaction (SIGSTOP) after ``lease_ttl`` idle; a standby's lease attempts wait at
most ``lease_ttl / 4`` for a lock; :meth:`Projector.stop` returns within ``lease_ttl`` plus
a grace period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from cqrskit import _failpoints
from cqrskit._stopping import cancel_and_wait, check_stop_timeout
from cqrskit.errors import ConcurrencyError
from cqrskit.eventlog import EventStore, StoredEvent
from cqrskit.projections import schema
from cqrskit.projections.api import Projection
from cqrskit.projections.apply import Applier, infrastructure_fault
from cqrskit.projections.db import ReadDatabase
from cqrskit.projections.signal import Applied, Signal

__all__ = ["LeaseLostError", "Projector"]

log = logging.getLogger("cqrskit.projections")


class LeaseLostError(ConcurrencyError):
    """Another projector took this projection's lease over; this one stops writing."""


_WORK_SHARE = 0.75  # of lease_ttl: the longest a lease holder's transaction may last


class _Stopped(Exception):
    pass


class _Overran(Exception):
    """A lease holder's transaction ran past ``lease_ttl`` and was rolled back."""


class _Worker:
    def __init__(self, owner: Projector, projection: Projection) -> None:
        self.p = owner
        self.projection = projection
        self.name = projection.name
        self.epoch: int | None = None
        self.checkpoint = 0
        self.batch_size = owner.batch_size
        #: monotonic time of the last fence that beat the lease
        self.beaten = 0.0
        #: generation -> an upper bound of its parked positions (as this leader knows)
        self.parked: dict[int, int] = {}
        self.failures = 0  # restarts since the worker last completed a round

    # -- lease ---------------------------------------------------------------------------

    async def acquire(self) -> int:
        """Take the lease: at once when free, else once its heartbeat stood still for
        ``lease_ttl`` (on this process's monotonic clock). The lease row is watched in
        read-only snapshots, which no holder's lock blocks; a take waits at most
        ``lease_ttl / 4`` for a lock, then tries again at the next look."""
        p = self.p
        seen: tuple[int, int] | None = None
        since = time.monotonic()
        while not p._stop.is_set():
            async with p.read_db.read_only() as s:
                row = await schema.load(s, self.name)
            if row is None:  # not set up (start() does it; a rebuild tool may drop it)
                async with p.read_db.transaction(lock_timeout=p.lease_ttl / 4) as s:
                    row = await schema.ensure_projection(s, self.projection, "async")
            mark = (row.lease_epoch, row.lease_beat)
            if mark != seen:
                seen, since = mark, time.monotonic()
            free = row.lease_owner is None or row.lease_owner == p.owner
            expired = time.monotonic() - since >= p.lease_ttl
            if free or expired:
                epoch = await self._take(row, expired and not free)
                if epoch is not None:
                    log.info("projection %s: lease taken (epoch %d)", self.name, epoch)
                    return epoch
            await p._pause(p.lease_ttl / 4)
        raise _Stopped

    async def _take(self, seen: schema.ProjectionRow, expired: bool) -> int | None:
        p = self.p
        for _ in range(2):
            try:
                async with p.read_db.transaction(lock_timeout=p.lease_ttl / 4) as s:
                    return await schema.take_lease(s, self.name, p.owner, seen)
            except Exception as exc:
                if not infrastructure_fault(exc):
                    raise
                # the holder's lock is still there (or the database is busy)
                log.info("projection %s: lease not taken yet (%s)", self.name, exc)
            if not (expired and await self._end_frozen_holder(seen)):
                return None  # look again at the next poll
        return None

    async def _end_frozen_holder(self, seen: schema.ProjectionRow) -> bool:
        """A holder whose lease expired while it holds the database's write lock is frozen
        (SIGSTOP, a blocked event loop): where nothing else can free that lock (SQLite),
        the read database ends the holder process. ``True`` when it did."""
        p = self.p
        async with p.read_db.read_only() as s:
            holder = await schema.lease_holder(s, self.name)
        if holder is None or holder.epoch != seen.lease_epoch:
            return False
        if not await p.read_db.end_frozen_writer(holder.host, holder.pid):
            return False
        log.warning(
            "projection %s: ended the frozen lease holder %s (pid %d)",
            self.name,
            seen.lease_owner,
            holder.pid,
        )
        return True

    @asynccontextmanager
    async def _holding(self, epoch: int) -> AsyncIterator[Any]:
        """A transaction of the lease holder: fenced first (the lease row stays locked until
        it ends), and over after ``3/4 lease_ttl`` whatever happens inside — before a
        standby may find the lease expired, and before PostgreSQL's own backstop (the
        fence's idle timeout of ``lease_ttl``) ends the session."""
        p = self.p
        deadline = asyncio.timeout(p.lease_ttl * _WORK_SHARE)
        try:
            # the deadline covers the work, never the COMMIT (whose outcome a cancellation
            # would leave unknown): once it expired nothing was committed
            async with p.read_db.transaction() as s, deadline:
                await self._fence(s, epoch)
                yield s
        except Exception as exc:
            if deadline.expired():
                raise _Overran(
                    f"projection {self.name}: a transaction ran past 3/4 of lease_ttl "
                    f"({p.lease_ttl:g}s) and was rolled back"
                ) from exc
            raise

    # -- main loop -----------------------------------------------------------------------

    async def run(self) -> None:
        p = self.p
        self.failures = 0
        while not p._stop.is_set():
            try:
                self.epoch = await self.acquire()
                await self.lead(self.epoch)
                await self.release()
            except _Stopped:
                break
            except LeaseLostError:
                log.warning("projection %s: lease lost; standing by", self.name)
            except _Overran as exc:
                # one event's handler outlasted the lease: step back so that a standby
                # takes over (this process would most likely hang on it again)
                log.error("%s; handing the lease over", exc)
                await self.release()
                self.epoch = None
                await p._pause(p.lease_ttl)
            except Exception:
                # grows while failures repeat; back to the shortest once a round succeeds
                self.failures += 1
                log.exception("projection %s: worker failed; restarting", self.name)
                await p._pause(min(5.0, 0.05 * 2 ** min(self.failures, 7)))
            finally:
                self.epoch = None
                p.signal.applied(self.name, None)

    async def lead(self, epoch: int) -> None:
        p = self.p
        async with p.read_db.transaction() as s:
            row = await schema.load(s, self.name)
            assert row is not None
            active = row.active_generation
            applier = Applier(self.projection, p.decoder, max_attempts=p.max_attempts)
            await applier.load_blocked(s, active)
            self.checkpoint = await schema.get_checkpoint(s, self.name, active)
            self.parked = {active: await schema.max_parked(s, self.name, active)}
        self.publish(active)
        building: tuple[int, Applier] | None = None
        bcp = 0
        next_check = time.monotonic()
        backoff: float | None = None
        while not p._stop.is_set():
            now = time.monotonic()
            if now >= next_check:
                next_check = now + p.state_interval
                # a look, without the write lock: an idle leader looks at every poll; the
                # lock is taken below only when there is something to write
                async with self._look() as s:
                    row = await schema.load(s, self.name)
                    retries = await s.fetchval(
                        "SELECT count(*) FROM cqrskit_dead_letters "
                        "WHERE projection = ? AND generation = ? AND retry = 1",
                        self.name,
                        active,
                    )
                if row is None or row.lease_epoch != epoch:
                    raise LeaseLostError(f"projection {self.name}: lease epoch moved on")
                if building is None and row.building_generation is not None:
                    gen = row.building_generation
                    bapplier = Applier(self.projection, p.decoder, max_attempts=p.max_attempts)
                    # where the rebuild starts is read under the lease (fenced), never from
                    # a read-only session that might lag (a replica)
                    async with self._holding(epoch) as s:
                        bcp = await schema.get_checkpoint(s, self.name, gen)
                        await bapplier.load_blocked(s, gen)
                        self.parked[gen] = await schema.max_parked(s, self.name, gen)
                    building = (gen, bapplier)
                if retries:
                    async with self._holding(epoch) as s:
                        await applier.retry_requested(s, active, p.store)
                    p.signal.notify()
            progressed = False
            events = await p.store.read_after(self.checkpoint, self.batch_size)
            if events:
                done = await self.commit(epoch, active, applier, events)
                self.checkpoint = done
                self.publish(active)
                progressed = True
            if building is not None:
                gen, bapplier = building
                bevents = [
                    e
                    for e in await p.store.read_after(bcp, self.batch_size)
                    if e.position <= self.checkpoint
                ]
                if bevents:
                    bcp = await self.commit(epoch, gen, bapplier, bevents)
                else:
                    async with self._holding(epoch) as s:
                        await schema.set_checkpoint(s, self.name, gen, self.checkpoint)
                        await schema.switch_over(s, self.projection, active, gen)
                    log.info("projection %s: switched to generation %d", self.name, gen)
                    active, applier, building = gen, bapplier, None
                    self.publish(active)
                progressed = True
            if progressed:
                backoff = None
                self.failures = 0
                # SQLite calls and reads that need not suspend never hand the loop back:
                # yield once per batch so the application keeps running during a catch-up
                await asyncio.sleep(0)
                continue
            if time.monotonic() - self.beaten >= p.lease_ttl / 3:
                async with self._holding(epoch):
                    pass
                self.publish(active)
            self.failures = 0  # caught up
            # after a wake-up that found nothing readable (on PostgreSQL, a commit can stay
            # above the readable horizon while an older transaction is open; nobody signals
            # when that one ends) poll with a short, growing backoff instead of a full wait
            limit = min(p.poll_interval, p.lease_ttl / 3)
            woke = await p._wait_for_events(self.checkpoint, backoff or limit)
            if woke:
                backoff = 0.001 if backoff is None else min(backoff * 2, limit)
            elif backoff is None or backoff >= limit:
                backoff = None
                next_check = 0.0
            else:
                backoff = min(backoff * 2, limit)

    def publish(self, generation: int) -> None:
        """Tell this process's waiters what is committed: the checkpoint, and (for a
        :class:`ConsistencyGate` that then needs no round trip) how far it is surely ours:
        half a lease past the last beat."""
        p = self.p
        p.signal.applied(
            self.name,
            Applied(
                generation,
                self.checkpoint,
                self.parked.get(generation, 0),
                self.beaten + p.lease_ttl / 2,
            ),
        )
        p.signal.notify()

    def _look(self) -> AbstractAsyncContextManager[Any]:
        """A session for the leader's reads of its own bookkeeping: read-only, so that it
        takes no write lock (on SQLite a write transaction is the file's one write lock,
        which every other writer queues behind) — except on a read database that routes
        read-only sessions to other servers (a replica router, whose replicas may lag):
        there a transaction on the primary, which locks nothing by itself."""
        db = self.p.read_db
        return db.transaction() if db.routes_tokens else db.read_only()

    async def _fence(self, s: Any, epoch: int) -> None:
        # every transaction of the holder locks the lease row; it also beats (writes a new
        # version of the row) only every lease_ttl / 8, not once per batch
        now = time.monotonic()
        beat = now - self.beaten >= self.p.lease_ttl / 8
        if not await schema.fence(s, self.name, epoch, hold=self.p.lease_ttl, beat=beat):
            raise LeaseLostError(f"projection {self.name}: lease epoch {epoch} was fenced off")
        if beat:
            self.beaten = now

    async def commit(
        self, epoch: int, generation: int, applier: Applier, events: Sequence[StoredEvent]
    ) -> int:
        """Apply ``events`` (or, when that overruns the lease, a first part of them, halving
        the batch size for the batches that follow); return the position now applied."""
        while True:
            try:
                try:
                    await self._commit(epoch, generation, applier, events)
                finally:  # parked or not, committed or not: an upper bound for the gate
                    if applier.last_parked > self.parked.get(generation, 0):
                        self.parked[generation] = applier.last_parked
            except _Overran:
                # rolled back: reload what the database holds (the parked streams too)
                async with self.p.read_db.read_only() as s:
                    await applier.load_blocked(s, generation)
                    done = await schema.get_checkpoint(s, self.name, generation)
                rest = [e for e in events if e.position > done]
                if not rest:
                    return done
                if len(rest) == 1:
                    raise  # one event's handler alone outlasts the lease: it hangs
                self.batch_size = max(1, len(rest) // 2)
                log.warning(
                    "projection %s: a batch of %d events overran lease_ttl; batches of %d now",
                    self.name,
                    len(rest),
                    self.batch_size,
                )
                events = rest[: self.batch_size]
                continue
            return events[-1].position

    async def _commit(
        self, epoch: int, generation: int, applier: Applier, events: Sequence[StoredEvent]
    ) -> None:
        last = events[-1].position
        point = {
            "projection": self.name,
            "generation": generation,
            "epoch": epoch,
            "first": events[0].position,
            "last": last,
        }
        await _failpoints.reached("projector.before_commit", **point)
        try:
            async with self._holding(epoch) as s:
                await applier.apply_fast(s, generation, events)
                await _failpoints.reached("projector.applied", **point)
                await schema.set_checkpoint(s, self.name, generation, last)
                await _failpoints.reached("projector.checkpointed", **point)
            await _failpoints.reached("projector.committed", **point)
            return
        except (LeaseLostError, _Overran):
            raise
        except Exception as exc:  # noqa: BLE001 - handled by the careful path below
            log.info("projection %s: batch failed (%s); applying event by event", self.name, exc)
        async with self._holding(epoch) as s:
            # the fast attempt may have committed although it raised (the connection was
            # lost during its COMMIT): apply only what the checkpoint does not cover yet
            done = await schema.get_checkpoint(s, self.name, generation)
            events = [e for e in events if e.position > done]
            await applier.load_blocked(s, generation)
            parked = await applier.apply_careful(s, generation, events)
            await schema.set_checkpoint(s, self.name, generation, last)
        if parked:
            log.warning("projection %s: parked %d event(s)", self.name, parked)

    async def release(self) -> None:
        epoch = self.epoch
        if epoch is None:
            return
        try:
            async with self.p.read_db.transaction(lock_timeout=self.p.lease_ttl / 4) as s:
                await schema.release_lease(s, self.name, epoch)
        except Exception:
            log.exception("projection %s: could not release the lease", self.name)


class Projector:
    """Runs projections asynchronously from an event store into a read database.

    Use as an async context manager (started and stopped with the application) or
    ``await projector.run()`` until :meth:`stop`.

    Args:
        store: the event log to read.
        read_db: where the read models, checkpoints, leases and dead letters live.
        projections: the projections to run (one worker each).
        decoder: stored event -> event (a callable or a serializer's ``decode_stored``).
        batch_size: events per read-database transaction.
        lease_ttl: seconds (monotonic) without a heartbeat before a standby takes over; a
            lease holder's transaction is rolled back after 3/4 of it (size batches so
            that one finishes well within it).
        max_attempts: attempts per failing event before it is parked.
        state_interval: seconds between checks for rebuild and retry requests.
        poll_interval: the longest idle wait between reads when no wake-up comes (the
            safety net under the store's hints; also capped at ``lease_ttl / 3``).
        owner: this projector's lease owner id, stored in the lease row and shown by
            ``cqrskit projections status`` (default ``"<hostname>:<pid>:<8 hex digits>"``,
            e.g. ``"web-1:4242:9f1c2a7b"``: unique per projector object, so two projectors
            in one process never share a lease).
        stop_timeout: seconds :meth:`stop` waits for the batches in flight to commit
            before abandoning them (their transactions roll back; the events are applied
            again by the next lease holder); the leases are released either way
            (default 10).
    """

    def __init__(
        self,
        store: EventStore,
        read_db: ReadDatabase,
        projections: Sequence[Projection],
        decoder: Any,
        *,
        batch_size: int = 500,
        lease_ttl: float = 5.0,
        max_attempts: int = 3,
        state_interval: float = 0.5,
        poll_interval: float = 1.0,
        owner: str | None = None,
        stop_timeout: float = 10.0,
    ) -> None:
        self.store = store
        self.read_db = read_db
        self.decoder = decoder
        self.batch_size = batch_size
        self.lease_ttl = lease_ttl
        self.max_attempts = max_attempts
        self.state_interval = state_interval
        self.poll_interval = poll_interval
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stop_timeout = check_stop_timeout(stop_timeout)
        self.signal = Signal()
        self._workers = [_Worker(self, p) for p in projections]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def leading(self, name: str) -> bool:
        """Whether this projector currently holds the lease of projection ``name``.

        ``False`` while it stands by for another owner's lease, before :meth:`start` and
        after :meth:`stop`; a projection this projector does not run is never led.
        """
        return any(w.name == name and w.epoch is not None for w in self._workers)

    def checkpoint(self, name: str) -> int:
        """The last position this projector committed for ``name`` (0 if not leading)."""
        return next((w.checkpoint for w in self._workers if w.name == name), 0)

    async def start(self) -> None:
        """Set the projections up (tables, views, bookkeeping), then start one worker each."""
        self._stop.clear()
        # looked at read-only first: while another projector's batch holds the database's
        # write lock (SQLite), a standby starting up must not queue behind it for nothing
        if await self._needs_setup():
            async with self.read_db.transaction() as s:
                for w in self._workers:
                    await schema.ensure_projection(s, w.projection, "async")
        self._tasks = [
            asyncio.create_task(w.run(), name=f"projector:{w.name}") for w in self._workers
        ]

    async def _needs_setup(self) -> bool:
        try:
            async with self.read_db.read_only() as s:
                if not await schema.installed(s):
                    return True
                for w in self._workers:
                    row = await schema.load(s, w.name)
                    if row is None or row.mode != "async":
                        return True
        except Exception as exc:  # noqa: BLE001 - e.g. the tables do not exist yet
            log.debug("projections not set up yet (%s)", exc)
            return True
        return False

    async def stop(self, timeout: float | None = None) -> None:
        """Finish the batches in flight, release the leases and stop.

        A batch still running after ``timeout`` seconds (default :attr:`stop_timeout`) is
        abandoned: its task is cancelled, its transaction rolls back, and the lease is
        released all the same, so a standby takes over at once instead of after
        ``lease_ttl``.
        """
        self._stop.set()
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        held = {w.name: w.epoch for w in self._workers if w.epoch is not None}
        limit = self.stop_timeout if timeout is None else check_stop_timeout(timeout, "timeout")
        _, pending = await asyncio.wait(tasks, timeout=limit)
        if not pending:
            await asyncio.gather(*tasks, return_exceptions=True)
            return
        log.warning(
            "projector %s: %d worker(s) still busy after %.1f s; abandoning their batch",
            self.owner,
            len(pending),
            limit,
        )
        # cancelled again if its unwinding hangs too (a rollback on a silent server), then
        # left behind: the release below fences whatever it would commit later
        await cancel_and_wait(tasks)
        await self._release_abandoned(held)

    async def _release_abandoned(self, held: dict[str, int]) -> None:
        # a cancelled worker did not reach its own release; the epoch guard makes this a
        # no-op for a lease that was released or taken over meanwhile
        for name, epoch in held.items():
            try:
                async with self.read_db.transaction() as s:
                    await schema.release_lease(s, name, epoch)
            except Exception:
                log.exception("projection %s: could not release the lease", name)

    async def run(self) -> None:
        """Start, then run until :meth:`stop` is called (e.g. from a signal handler)."""
        await self.start()
        await self._stop.wait()
        await self.stop()

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (safe to call from a signal handler)."""
        self._stop.set()

    async def __aenter__(self) -> Projector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    async def _wait_for_events(self, position: int, timeout: float) -> bool:
        waiter = asyncio.ensure_future(self.store.wait_for(position, timeout))
        stopper = asyncio.ensure_future(self._stop.wait())
        done, pending = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return waiter in done and not waiter.cancelled() and bool(waiter.result())
