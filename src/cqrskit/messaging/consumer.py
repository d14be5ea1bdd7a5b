"""The broker consumer: projections and event handlers fed by a broker, effectively once.

A :class:`Consumer` runs the same :class:`~cqrskit.projections.Projection` objects as the
log :class:`~cqrskit.projections.Projector` (and the same event handlers, see
:class:`~cqrskit.messaging.EventHandlers`), fed by a :class:`~cqrskit.messaging.Source`
instead of the event log. Per target it shares the N partitions with the other worker
processes through leases in the read database (:mod:`cqrskit.projections.partitions`) and
runs one loop per partition it holds:

1. fetch a batch from the partition's subscription;
2. classify it (:mod:`cqrskit.messaging.intake`): rejected, duplicate, gap, parked,
   applied;
3. in **one read-database transaction**: apply the events, park the bad ones, and store the
   partition's checkpoint (sequence, position, broker cursor) with a statement that matches
   the lease epoch (fencing);
4. only then acknowledge the processed prefix to the broker.

A crash anywhere repeats at most the unacknowledged tail, which the checkpoint drops by
sequence: effectively once. A gap (a sequence number missing) stops the partition there;
it re-reads from the broker with a growing pause and reports the gap — in
``partition_status``, in the log, and in :attr:`Consumer.gaps` — until the message comes.
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

from cqrskit._stopping import cancel_and_wait, check_stop_timeout, finish_or_abandon
from cqrskit.errors import BrokerUnavailableError, ConfigurationError
from cqrskit.messaging import intake
from cqrskit.messaging.envelope import DEFAULT_MAX_BYTES, Envelope
from cqrskit.messaging.handlers import EventHandlers, HandlerTarget
from cqrskit.messaging.partitioning import check_partitions
from cqrskit.messaging.signing import HmacSigner
from cqrskit.messaging.source import Delivery, Source, Subscription
from cqrskit.messaging.targets import Checkpoint, Lane, ProjectionTarget, Target
from cqrskit.projections.api import Projection
from cqrskit.projections.db import ReadDatabase, Session
from cqrskit.projections.partitions import (
    GenerationMovedError,
    PartitionLeases,
    PartitionLostError,
    PartitionState,
)
from cqrskit.projections.signal import Signal

__all__ = ["Consumer"]

log = logging.getLogger("cqrskit.messaging")


class _Reread(Exception):
    """Close the subscription and subscribe again (after a gap)."""


class Consumer:
    """Consumes a broker into read models and event handlers, partitioned across processes.

    Use as an async context manager, or ``await consumer.run()`` until
    :meth:`request_stop`.

    Args:
        source: the broker's consuming side (e.g. ``NatsSource(...)``).
        read_db: where read models, checkpoints, leases, dead letters and the inbox live.
        targets: :class:`~cqrskit.projections.Projection` objects and
            :class:`~cqrskit.messaging.EventHandlers`; each is its own consumer group.
        decoder: stored event -> event (a serializer, as for the projector).
        partitions: N, as the relay's.
        verifier: an :class:`~cqrskit.messaging.HmacSigner` holding the relay's keys:
            unsigned or altered messages are rejected (parked).
        batch_size: messages per fetch and per read-database transaction.
        max_bytes: larger payloads are parked.
        lease_ttl: seconds without a heartbeat before another worker takes a partition.
        poll_interval: the longest wait of one fetch (also capped at ``lease_ttl / 4``).
        max_attempts: attempts of a failing event before it is parked.
        max_backoff: the longest pause between re-reads after a gap or a broker failure.
        max_partitions: hold at most this many partitions per target.
        owner: this worker's lease owner id (default: host, pid and a random suffix).
        stop_timeout: seconds :meth:`stop` waits for the batches in flight to commit and
            be acknowledged before abandoning them (cancelled: their transactions roll
            back, nothing of theirs is acknowledged, so the next holder of the partition
            gets those messages again from its checkpoint); the partitions are released
            either way, so another worker takes them at once instead of after
            ``lease_ttl`` (default 10; a finite number >= 0).

    Raises:
        ConfigurationError: no target, two targets with one name, ``batch_size`` < 1,
            ``stop_timeout`` negative or not finite.
    """

    def __init__(
        self,
        source: Source,
        read_db: ReadDatabase,
        targets: Sequence[Projection | EventHandlers],
        decoder: Any,
        *,
        partitions: int,
        verifier: HmacSigner | None = None,
        batch_size: int = 500,
        max_bytes: int = DEFAULT_MAX_BYTES,
        lease_ttl: float = 5.0,
        poll_interval: float = 1.0,
        max_attempts: int = 3,
        max_backoff: float = 2.0,
        max_partitions: int | None = None,
        owner: str | None = None,
        stop_timeout: float = 10.0,
    ) -> None:
        if not targets:
            raise ConfigurationError("Consumer needs at least one projection or EventHandlers.")
        if batch_size < 1:
            raise ConfigurationError("batch_size must be at least 1.")
        self.stop_timeout = check_stop_timeout(stop_timeout)
        self.source = source
        self.read_db = read_db
        self.decoder = decoder
        self.partitions = check_partitions(partitions)
        self.verifier = verifier
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        self.lease_ttl = lease_ttl
        self.poll_interval = min(poll_interval, lease_ttl / 4)
        self.max_attempts = max_attempts
        self.max_backoff = max_backoff
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.signal = Signal()
        #: counters over the process's life: applied, duplicates, parked, rejected, gaps ...
        self.counts: dict[str, int] = {}
        self.known = intake.type_check(decoder)
        #: why the consumer stopped by itself (a number of partitions it cannot work with)
        self.error: ConfigurationError | None = None
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"Consumer: two targets share a name in {names}.")
        self._groups = [_Group(self, self._target(t), max_partitions) for t in targets]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def _target(self, t: Projection | EventHandlers) -> Target:
        if isinstance(t, Projection):
            return ProjectionTarget(t, self.decoder, self.max_attempts, self.max_bytes)
        return HandlerTarget(t, self.decoder, self.max_attempts, self.max_bytes)

    @property
    def gaps(self) -> int:
        """Gaps seen so far (each missing sequence counted once)."""
        return self.counts.get("gaps", 0)

    def owned(self, name: str) -> dict[int, int]:
        """Partitions (-> lease epoch) this worker holds for target ``name``."""
        return next((dict(g.leases.owned) for g in self._groups if g.name == name), {})

    def count(self, what: str, n: int = 1) -> None:
        """Add ``n`` to counter ``what``."""
        self.counts[what] = self.counts.get(what, 0) + n

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Set the targets up (tables, bookkeeping), then start claiming partitions."""
        self._stop.clear()
        self.error = None
        for g in self._groups:
            await g.setup()
        self._tasks = [
            asyncio.create_task(g.run(), name=f"consumer:{g.name}") for g in self._groups
        ]

    async def stop(self, timeout: float | None = None) -> None:
        """Finish the batches in flight, release the partitions and stop (the source stays
        open: close it yourself).

        A partition loop still busy after ``timeout`` seconds (default :attr:`stop_timeout`)
        — a handler, a database call or a subscription's close that does not return — is
        abandoned: cancelled, its transaction rolls back and nothing of its batch is
        acknowledged (the partition's checkpoint did not move: the next holder applies those
        messages), and the partitions are released all the same, so another worker takes
        them at once instead of after ``lease_ttl``. It returns within about ``timeout``
        plus a second and the releases: a loop whose unwinding hangs as well (a rollback, a
        subscription's close) is cancelled again, then left behind (fenced).

        Raises:
            ConfigurationError: ``timeout`` is negative or not finite.
        """
        limit = self.stop_timeout if timeout is None else check_stop_timeout(timeout, "timeout")
        self._stop.set()
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        await finish_or_abandon(
            tasks, [g.abandon for g in self._groups], limit, log, f"consumer {self.owner}"
        )

    async def run(self) -> None:
        """Start, then run until :meth:`request_stop`.

        Raises:
            ConfigurationError: a rebuild switched a projection to a number of partitions
                other than this consumer's (it stops; :attr:`error` holds it).
        """
        await self.start()
        await self._stop.wait()
        await self.stop()
        if self.error is not None:
            raise self.error

    def fail(self, error: ConfigurationError) -> None:
        """Stop every target because of ``error`` (kept in :attr:`error`)."""
        if self.error is None:
            self.error = error
        log.error("consumer %s stops: %s", self.owner, error)
        self._stop.set()

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (safe from a signal handler)."""
        self._stop.set()

    async def __aenter__(self) -> Consumer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass


class _Group:
    """One target's partitions in this worker: the lease tick and the partition loops."""

    def __init__(self, consumer: Consumer, target: Target, max_partitions: int | None) -> None:
        self.c = consumer
        self.target = target
        self.name = target.name
        self.leases = PartitionLeases(
            consumer.read_db,
            target.identity,
            consumer.partitions,
            consumer.owner,
            consumer.lease_ttl,
            mode="consumer",
            max_partitions=max_partitions,
        )
        self.workers: dict[int, _Partition] = {}
        #: every partition loop still running (those retiring too)
        self.loops: set[asyncio.Task[None]] = set()
        self.warned: int | None = None
        #: partitions whose loop is stopping (then, if released, whose lease is given up)
        self.leaving: dict[int, asyncio.Task[None]] = {}
        self.lock = asyncio.Lock()  # a release never runs during a tick

    async def setup(self) -> None:
        async with self.c.read_db.transaction() as s:
            await self.target.install(s)
        await self.leases.setup()
        self._warn_pending()

    def _warn_pending(self) -> None:
        pending = self.leases.pending
        if pending is None or pending == self.warned:
            return
        self.warned = pending
        log.warning(
            "consumer %s: generation %d is being rebuilt; broker consumers do not build it "
            "(a broker does not keep the whole log): PartitionedProjector workers do "
            "(cqrskit projections run --partitions N ...). These consumers keep serving "
            "generation %d and continue on the new one after the switch.",
            self.name,
            pending,
            self.leases.generation,
        )

    async def _set_up_again(self) -> None:
        """The generation moved on (a rebuild switched over): stop the partition loops
        (their commits are fenced already) and set up on the new active generation."""
        for p in list(self.workers):
            self._retire(p, cancel=False, release=False)
        await asyncio.gather(*self.leaving.values(), return_exceptions=True)
        self.leases = PartitionLeases(
            self.c.read_db,
            self.target.identity,
            self.c.partitions,
            self.c.owner,
            self.c.lease_ttl,
            mode="consumer",
            max_partitions=self.leases.max_partitions,
        )
        await self.setup()
        log.info("consumer %s: now on generation %d", self.name, self.leases.generation)

    async def run(self) -> None:
        c = self.c
        failures = 0
        while not c._stop.is_set():
            try:
                async with self.lock:
                    tick = await self.leases.tick()
                failures = 0
            except GenerationMovedError as exc:
                log.info("consumer %s: %s; setting up again", self.name, exc)
                try:
                    await self._set_up_again()
                except ConfigurationError as error:
                    c.fail(error)
                    break
                except Exception:
                    log.exception("consumer %s: could not set up again", self.name)
                    await c._pause(c.lease_ttl / 4)
                continue
            except Exception:
                failures += 1
                log.exception("consumer %s: lease tick failed", self.name)
                await c._pause(min(c.lease_ttl / 4, 0.05 * 2**failures))
                continue
            # a loop may take a while to stop (its batch commits, its subscription closes):
            # it stops beside this loop, which keeps beating the other partitions meanwhile
            for p in tick.lost:
                self._retire(p, cancel=True, release=False)
            for p in tick.release:
                if p not in self.leaving:
                    self._retire(p, cancel=False, release=True)
            for p, epoch in tick.gained.items():
                self.workers[p] = w = _Partition(self, p, epoch)
                w.task = asyncio.create_task(w.run(), name=f"consumer:{self.name}:{p}")
                self.loops.add(w.task)
                w.task.add_done_callback(self.loops.discard)
            for p, w in list(self.workers.items()):
                if w.task is not None and w.task.done():
                    del self.workers[p]  # ended on a lost lease
            if tick.gained or tick.lost or tick.release:
                c.signal.notify()
            self._warn_pending()
            await self.retry_flags()
            await c._pause(c.lease_ttl / 4)
        for p in list(self.workers):  # all at once: a graceful stop lasts the slowest one
            self._retire(p, cancel=False, release=False)
        await asyncio.gather(*self.leaving.values(), return_exceptions=True)
        await self.leases.release_all()

    async def abandon(self) -> None:
        """After a stop's timeout cancelled :meth:`run`: cancel the partition loops and
        their hand-overs still running (their transactions roll back, nothing more is
        acknowledged), then release every partition still held (the epoch guard makes
        the release of a partition lost meanwhile a no-op)."""
        tasks = [*self.loops, *self.leaving.values()]
        await cancel_and_wait(tasks)
        self.workers.clear()
        await self.leases.release_all()

    def _retire(self, p: int, *, cancel: bool, release: bool) -> None:
        """Stop partition ``p``'s loop in the background (cancelled at once when the
        partition was lost), then release its lease if ``release``."""
        w = self.workers.pop(p, None)
        task = asyncio.create_task(
            self._leave(p, w, cancel, release), name=f"consumer:{self.name}:{p}:leave"
        )
        self.leaving[p] = task
        task.add_done_callback(lambda t: self.leaving.pop(p) if self.leaving.get(p) is t else None)

    async def _leave(self, p: int, w: _Partition | None, cancel: bool, release: bool) -> None:
        try:
            if w is not None and w.task is not None:
                w.stopping.set()
                if cancel:
                    w.task.cancel()
                await asyncio.gather(w.task, return_exceptions=True)
            if release:
                async with self.lock:
                    await self.leases.release([p])
        except Exception:
            log.exception("consumer %s: partition %d: could not hand it over", self.name, p)

    async def retry_flags(self) -> None:
        if not self.workers:
            return
        try:
            async with self.c.read_db.read_only() as s:
                rows = await s.fetchall(
                    "SELECT DISTINCT m.partition FROM cqrskit_dead_letters d "
                    "JOIN cqrskit_parked_messages m ON m.projection = d.projection "
                    "AND m.generation = d.generation AND m.position = d.position "
                    "WHERE d.projection = ? AND d.generation = ? AND d.retry = 1",
                    self.name,
                    self.leases.generation,
                )
        except Exception:
            log.exception("consumer %s: could not look for retry requests", self.name)
            return
        for (p,) in rows:
            w = self.workers.get(int(p))
            if w is not None:
                w.retry_due = True


class _Partition:
    """The loop of one partition held by this worker."""

    def __init__(self, group: _Group, partition: int, epoch: int) -> None:
        self.g = group
        self.c = group.c
        self.p = partition
        self.epoch = epoch
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.retry_due = False
        self.gap: tuple[int, float] | None = None
        self.gap_logged = 0.0
        self.fetch_size = group.c.batch_size
        #: the pause before the next subscribe: grows while re-reads and failures repeat,
        #: back to none once a fetch goes through without a gap
        self.backoff = 0.0

    def running(self) -> bool:
        return (
            not self.stopping.is_set()
            and not self.c._stop.is_set()
            and self.g.leases.owned.get(self.p) == self.epoch
        )

    def alive(self) -> None:
        self.g.leases.progress[self.p] = time.monotonic()

    async def run(self) -> None:
        c, name = self.c, self.g.name
        self.backoff = 0.0
        down = False
        while self.running():
            sub: Subscription | None = None
            try:
                state = await self.load()
                sub = await c.source.subscribe(name, self.p, state.cursor)
                if down:
                    log.info("consumer %s: partition %d: broker available again", name, self.p)
                    down = False
                await self.consume(sub, state)
                self.backoff = 0.0
            except _Reread:
                # look further ahead next time: the missing number may sit behind more
                self.fetch_size = min(max(c.batch_size, c.source.max_unacked), self.fetch_size * 2)
                self.backoff = min(c.max_backoff, max(0.02, self.backoff * 2))
            except PartitionLostError:
                log.warning("consumer %s: partition %d was taken over", name, self.p)
                self.g.leases.owned.pop(self.p, None)
                return
            except BrokerUnavailableError as exc:
                if not down:
                    log.warning(
                        "consumer %s: partition %d: broker unavailable (%s)", name, self.p, exc
                    )
                    c.count("outages")
                    down = True
                self.backoff = min(c.max_backoff, max(0.05, self.backoff * 2))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("consumer %s: partition %d failed; restarting", name, self.p)
                self.backoff = min(c.max_backoff, max(0.05, self.backoff * 2))
            finally:
                if sub is not None:
                    try:
                        await sub.close()
                    except Exception:
                        log.debug("consumer %s: closing a subscription failed", name, exc_info=True)
            self.alive()
            if self.backoff and self.running():
                await self.rest(self.backoff)

    async def rest(self, seconds: float) -> None:
        """Pause before subscribing again (cut short when the worker is asked to stop)."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def load(self) -> PartitionState:
        async with self.c.read_db.transaction(hold=self.c.lease_ttl) as s:
            state = await self.g.leases.load(s, self.p)
            await self.g.target.load(s, self.g.leases.generation)
        return state

    async def consume(self, sub: Subscription, state: PartitionState) -> None:
        c = self.c
        lane = self.lane()
        while self.running():
            self.alive()
            if self.retry_due:
                self.retry_due = False
                state = await self.g.target.retry(c.read_db, lane, state)
            deliveries = await self.fetch(sub)
            self.alive()
            if not deliveries:
                self.backoff = 0.0  # the broker answers and nothing is missing
                continue
            batch = lane.plan(deliveries, state)
            gap = self.note_gap(batch.gap)
            changed = batch.items or batch.state != state or gap != self.gap
            self.gap = gap
            if changed:
                await self.commit(sub, batch, lane)
            state = batch.state
            for k, v in batch.counts.items():
                c.count(k, v)
            if batch.done:
                await sub.ack(batch.done)
            c.signal.notify()
            if batch.gap is not None:
                raise _Reread
            self.fetch_size = c.batch_size
            self.backoff = 0.0

    async def fetch(self, sub: Subscription) -> list[Delivery]:
        """One fetch, given up at once when the worker is asked to stop (what it may have
        received is not acknowledged: it comes again)."""
        fetch = asyncio.ensure_future(sub.fetch(self.fetch_size, self.c.poll_interval))
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not fetch.done():
                fetch.cancel()
            await asyncio.gather(stop, fetch, return_exceptions=True)
        if fetch.cancelled() or (self.stopping.is_set() and not fetch.done()):
            return []
        return fetch.result()

    def note_gap(self, missing: int | None) -> tuple[int, float] | None:
        """Report a gap: a log line when it starts (and every 30 s), a count, a status."""
        name = self.g.name
        if missing is None:
            if self.gap is not None:
                log.info(
                    "consumer %s: partition %d: sequence %d arrived; the gap is closed",
                    name,
                    self.p,
                    self.gap[0],
                )
            return None
        if self.gap is not None and self.gap[0] == missing:
            if time.monotonic() - self.gap_logged > 30:
                self.gap_logged = time.monotonic()
                log.warning(
                    "consumer %s: partition %d still waits for sequence %d (since %.0f s)",
                    name,
                    self.p,
                    missing,
                    time.time() - self.gap[1],
                )
            return self.gap
        self.c.count("gaps")
        self.gap_logged = time.monotonic()
        log.warning(
            "consumer %s: partition %d: sequence %d is missing (a later one arrived); "
            "holding the partition and re-reading",
            name,
            self.p,
            missing,
        )
        return (missing, time.time())

    def lane(self) -> Lane:
        """This partition's context for the target."""
        c, p = self.c, self.p
        destination = c.source.destination(p)

        def read(d: Delivery) -> Envelope | str:
            return intake.read_envelope(d, destination, c.verifier, p, c.partitions)

        def plan(ds: Sequence[Delivery], st: PartitionState) -> intake.Batch:
            return intake.plan_batch(
                ds,
                st,
                destination=destination,
                partition=p,
                partitions=c.partitions,
                verifier=c.verifier,
                max_bytes=c.max_bytes,
                known=c.known,
            )

        return Lane(p, self.g.leases.generation, read, plan, self.checkpoint, c.lease_ttl)

    def checkpoint(self, state: PartitionState) -> Checkpoint:
        """The fenced statement storing ``state`` (and the current gap) for this partition."""
        leases, p, epoch, gap = self.g.leases, self.p, self.epoch, self.gap

        async def store(session: Session) -> None:
            await leases.commit_consumer(session, p, epoch, state, gap)

        return store

    async def commit(self, sub: Subscription, batch: intake.Batch, lane: Lane) -> None:
        c = self.c
        keeper: asyncio.Task[None] | None = None
        if c.source.extend_interval is not None and batch.done:
            keeper = asyncio.create_task(self._keep_alive(sub, batch.done))
        try:
            await self.g.target.write(c.read_db, batch, lane, self.checkpoint(batch.state))
        finally:
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)

    async def _keep_alive(self, sub: Subscription, done: Sequence[Delivery]) -> None:
        interval = self.c.source.extend_interval
        assert interval is not None
        while True:
            await asyncio.sleep(interval)
            await sub.extend(done)
