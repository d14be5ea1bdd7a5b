"""The relay: publishes the event log to a broker, at least once, in order per partition.

A :class:`Relay` tails the event log exactly as a projector does — the same gap-free
``read_after`` by position, the same lease with epoch fencing (one active relay per name;
a standby takes over within ``lease_ttl``), the same checkpoint, status, lag and dead
letters (it is recorded as a projection in mode ``relay``). For each batch it numbers the
events per partition, hands the envelopes to the :class:`~cqrskit.messaging.Transport`,
and only after the broker acknowledged all of them commits, in one transaction that checks
the lease epoch, the checkpoint, the sequence counters and any refusals. Up to
``pipeline`` batches are on their way at once (read and sent while earlier ones are being
acknowledged and checkpointed); checkpoints still commit in order, each after its own
batch's acknowledgements.

Sequence numbers are a function of the committed state and the log alone, so a relay that
restarts (or a standby taking over) republishes an unacknowledged tail with the same ids
and the same numbers: the broker's dedup or the consumer's sequence check drops it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from cqrskit._stopping import cancel_and_wait, check_stop_timeout
from cqrskit.errors import BrokerUnavailableError, ConfigurationError
from cqrskit.eventlog import EventStore, StoredEvent
from cqrskit.messaging import state
from cqrskit.messaging.envelope import Envelope
from cqrskit.messaging.partitioning import check_partitions, partition_of
from cqrskit.messaging.signing import HmacSigner
from cqrskit.messaging.transport import Transport
from cqrskit.projections import schema
from cqrskit.projections.api import Projection
from cqrskit.projections.db import ReadDatabase, Session
from cqrskit.projections.runner import LeaseLostError
from cqrskit.projections.signal import Signal
from cqrskit.projections.status import ProjectionStatus, projection_status

__all__ = ["Relay", "relay_status"]

log = logging.getLogger("cqrskit.messaging")


class _Stopped(Exception):
    pass


@dataclass(slots=True)
class _Batch:
    """A batch on its way: the events read, the envelopes sent (placeholders for events
    parked before sending), those parked, the counters after it, and the acks' future.
    Once acknowledged it keeps only what its checkpoint commit needs."""

    events: Sequence[StoredEvent]
    sent: list[Envelope]
    refused: dict[int, tuple[StoredEvent, str]]
    seqs: dict[int, int]
    last: int  # position of the batch's last event
    results: asyncio.Future[list[str | None]] | None = None
    acked: int = 0  # events the broker acknowledged
    size: int = 0  # events read into it (kept once acknowledged: it bounds the backlog)


async def relay_status(
    state_db: ReadDatabase, store: EventStore, name: str = "relay"
) -> ProjectionStatus:
    """Where relay ``name`` stands: checkpoint (everything up to it is acknowledged by the
    broker), lag in events and seconds, parked events and the lease."""
    rows = await projection_status(state_db, store, [name])
    if not rows:
        raise ConfigurationError(f"no relay named {name!r} was ever started on this database.")
    return rows[0]


class Relay:
    """Publishes the event log to a broker through a transport.

    Use as an async context manager, or ``await relay.run()`` until :meth:`request_stop`.

    Args:
        store: the event log (the outbox).
        state_db: where the relay's lease, checkpoint, sequence counters and dead letters
            live — usually the write database itself (e.g. ``SqliteReadDatabase`` on the
            same file, ``PostgresReadDatabase`` on the same DSN).
        transport: the broker adapter.
        name: the relay's name (a SQL identifier); one active relay per name.
        partitions: N; a stream's partition is ``partition_of(stream, N)``.
        owned: the partitions this relay publishes (default: all). Relays splitting the
            partitions between them need distinct names.
        signer: sign every envelope with this :class:`HmacSigner` (optional).
        batch_size: events per read, publish call and checkpoint commit.
        pipeline: batches on their way at once: the next batch is read and sent while
            the broker acknowledges the previous one and its checkpoint commits (with a
            transport that overlaps sends, see :meth:`Transport.send`). The relay holds
            at most ``pipeline * batch_size`` events, and publishes at most as many
            acknowledged events ahead of its committed checkpoint (a slow checkpoint
            commit does not stop the small batches of a steady trickle).
        max_bytes: payloads larger than this are parked without being sent.
        lease_ttl: seconds without a heartbeat before a standby takes over.
        poll_interval: the longest idle wait when no wake-up hint comes.
        state_interval: seconds between lease checks and looks for retry requests.
        max_backoff: the longest pause between attempts while the broker is unavailable.
        owner: this relay's lease owner id (default: host, pid and a random suffix).
        stop_timeout: seconds :meth:`stop` waits for the batches in flight to be
            acknowledged and checkpointed before abandoning them (nothing of theirs is
            marked published: the next lease holder publishes them again with the same
            ids and sequence numbers); the lease is released either way (default 10).
    """

    def __init__(
        self,
        store: EventStore,
        state_db: ReadDatabase,
        transport: Transport,
        *,
        name: str = "relay",
        partitions: int = 1,
        owned: Collection[int] | None = None,
        signer: HmacSigner | None = None,
        batch_size: int = 500,
        pipeline: int = 2,
        max_bytes: int = 1 << 20,
        lease_ttl: float = 5.0,
        poll_interval: float = 1.0,
        state_interval: float = 0.5,
        max_backoff: float = 5.0,
        owner: str | None = None,
        stop_timeout: float = 10.0,
    ) -> None:
        self.identity = Projection(name, tables={})
        self.name = name
        self.store = store
        self.state_db = state_db
        self.transport = transport
        self.partitions = check_partitions(partitions)
        self.owned = None if owned is None else frozenset(owned)
        if self.owned is not None and not self.owned <= set(range(partitions)):
            raise ConfigurationError(
                f"relay {name!r}: owned partitions {sorted(self.owned)} are not all in "
                f"0..{partitions - 1}."
            )
        self.signer = signer
        if batch_size < 1:
            raise ConfigurationError("batch_size must be at least 1.")
        self.batch_size = batch_size
        if pipeline < 1:
            raise ConfigurationError("pipeline must be at least 1.")
        self.pipeline = pipeline
        self.max_bytes = max_bytes
        self.lease_ttl = lease_ttl
        self.poll_interval = poll_interval
        self.state_interval = state_interval
        self.max_backoff = max_backoff
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stop_timeout = check_stop_timeout(stop_timeout)
        self.signal = Signal()
        #: last position up to which the broker acknowledged everything (committed)
        self.checkpoint = 0
        #: lease epoch while leading, else ``None``
        self.epoch: int | None = None
        #: counters: messages acknowledged, events parked, sequence holes left, broker outages
        self.published = 0
        self.parked = 0
        self.gaps = 0
        self.outages = 0
        self._generation = 1
        self._failures = 0  # restarts since the relay last completed a round
        self._sequences: dict[int, int] = {}  # committed with the checkpoint
        self._blocked: set[str] = set()
        # where the batches sent leave off: read position, counters, parked streams
        self._read_to = 0
        self._ahead: dict[int, int] = {}
        self._ahead_blocked: set[str] = set()
        # the same after the last acknowledged batch (its checkpoint may not be committed)
        self._acked_to = 0
        self._acked_seqs: dict[int, int] = {}
        self._acked_blocked: set[str] = set()
        self._acked: list[_Batch] = []  # acknowledged, checkpoint not committed yet
        self._uncommitted = 0  # events acknowledged whose checkpoint is not committed yet
        self._committing: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """Whether this relay holds the lease now."""
        return self.epoch is not None

    async def start(self) -> None:
        """Set up the bookkeeping, then start publishing in a background task."""
        self._stop.clear()
        async with self.state_db.transaction() as s:
            await state.install(s, self.identity)
        self._task = asyncio.create_task(self._run(), name=f"relay:{self.name}")

    async def stop(self, timeout: float | None = None) -> None:
        """Finish the batches in flight (or give them up if the broker is down), release
        the lease and stop. The transport stays open (close it yourself).

        Still busy after ``timeout`` seconds (default :attr:`stop_timeout`) — a publish
        or a database call that does not return — the relay is cancelled: the batches in
        flight are abandoned unacknowledged (their checkpoint never committed, so they
        are published again by the next holder, same ids and numbers) and the lease is
        released all the same, so a standby takes over at once.
        """
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        limit = self.stop_timeout if timeout is None else check_stop_timeout(timeout, "timeout")
        _, pending = await asyncio.wait([task], timeout=limit)
        if not pending:
            await asyncio.gather(task, return_exceptions=True)
            return
        epoch = self.epoch
        log.warning("relay %s: still busy after %.1f s; abandoning its batches", self.name, limit)
        # cancelled again if its unwinding hangs too, then left behind: the release below
        # fences whatever it would commit later
        await cancel_and_wait([task])
        if epoch is not None:
            # the epoch guard makes this a no-op for a lease released or taken over since
            await self._release(epoch)

    async def run(self) -> None:
        """Start, then run until :meth:`request_stop`."""
        await self.start()
        await self._stop.wait()
        await self.stop()

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (safe from a signal handler)."""
        self._stop.set()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_published(self, position: int, timeout: float) -> bool:
        """Wait until this relay's checkpoint reaches ``position``; ``False`` on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.checkpoint < position:
            left = deadline - loop.time()
            if left <= 0:
                return False
            await self.signal.wait(left)
        return True

    # -- lease ---------------------------------------------------------------------------

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    async def _acquire(self) -> int:
        """Take the lease: at once when free, else once its heartbeat stood still for
        ``lease_ttl`` (on this process's monotonic clock). A standby looks at the lease
        row every ``lease_ttl / 4`` without the write lock (on SQLite a write transaction
        is the file's one write lock, which every writer — the application's commands,
        the holder's checkpoints — would queue behind); it writes only to take the lease,
        the take itself checking that the row is still as seen."""
        seen: tuple[int, int] | None = None
        since = time.monotonic()
        while not self._stop.is_set():
            async with self._look() as s:
                row = await schema.load(s, self.name)
            if row is None:  # not set up (start() does it; a tool may have dropped it)
                async with self.state_db.transaction() as s:
                    row = await state.install(s, self.identity)
            mark = (row.lease_epoch, row.lease_beat)
            if mark != seen:
                seen, since = mark, time.monotonic()
            free = row.lease_owner is None or row.lease_owner == self.owner
            if free or time.monotonic() - since >= self.lease_ttl:
                async with self.state_db.transaction() as s:
                    epoch = await schema.take_lease(s, self.name, self.owner, row)
                if epoch is not None:
                    log.info("relay %s: lease taken (epoch %d)", self.name, epoch)
                    return epoch
            await self._pause(self.lease_ttl / 4)
        raise _Stopped

    def _look(self) -> AbstractAsyncContextManager[Session]:
        """A read-only session for the looks at the lease, except on a state database that
        routes read-only sessions to other servers (a replica router, whose replicas may
        lag): there a transaction on the primary, which locks nothing by itself."""
        db = self.state_db
        return db.transaction() if db.routes_tokens else db.read_only()

    async def _fence(self, s: Session, epoch: int) -> None:
        if not await schema.fence(s, self.name, epoch):
            raise LeaseLostError(f"relay {self.name}: lease epoch {epoch} was fenced off")

    async def _release(self, epoch: int) -> None:
        try:
            async with self.state_db.transaction() as s:
                await schema.release_lease(s, self.name, epoch)
        except Exception:
            log.exception("relay %s: could not release the lease", self.name)

    async def _run(self) -> None:
        self._failures = 0
        while not self._stop.is_set():
            try:
                self.epoch = await self._acquire()
                await self._lead(self.epoch)
                await self._release(self.epoch)
            except _Stopped:
                break
            except LeaseLostError:
                log.warning("relay %s: lease lost; standing by", self.name)
            except Exception:
                # grows while failures repeat; back to the shortest once a round succeeds
                self._failures += 1
                log.exception("relay %s: failed; restarting", self.name)
                await self._pause(min(5.0, 0.05 * 2 ** min(self._failures, 7)))
            finally:
                self.epoch = None

    # -- publishing ----------------------------------------------------------------------

    async def _lead(self, epoch: int) -> None:
        async with self.state_db.transaction() as s:
            row = await schema.load(s, self.name)
            assert row is not None
            self._generation = row.active_generation
            self.checkpoint = await schema.get_checkpoint(s, self.name, self._generation)
            self._sequences = await state.load_sequences(s, self.name, self.partitions)
            self._blocked = await state.load_blocked(s, self.name, self._generation)
        self.signal.notify()
        inflight: deque[_Batch] = deque()  # sent; acknowledgements outstanding
        self._acked.clear()
        self._uncommitted = 0
        self._settle()
        next_check = last_beat = time.monotonic()
        backoff: float | None = None
        outage: float | None = None
        limit = min(self.poll_interval, self.lease_ttl / 3)
        try:
            while not self._stop.is_set():
                try:
                    self._committing = self._reap(epoch)
                    if time.monotonic() >= next_check:
                        next_check = time.monotonic() + self.state_interval
                        # a look without the write lock, unless a heartbeat is due: an
                        # idle leader looks every state_interval
                        beat = time.monotonic() - last_beat >= self.lease_ttl / 3
                        retries = await self._retry_requests(epoch, beat=beat)
                        if beat:
                            last_beat = time.monotonic()
                        if retries:  # retries number on from the committed counters
                            await self._drain(epoch, inflight)
                            await self._retry(epoch, retries)
                            self._settle()
                    # acknowledged batches wait for their checkpoint in a background
                    # commit; bounded in events, not batches, so that a slow commit does not
                    # stall publishing the small batches of a steady trickle (a relay
                    # killed now republishes at most pipeline * batch_size events, as when
                    # every batch is full)
                    room = (
                        len(inflight) < self.pipeline
                        and self._uncommitted < self.pipeline * self.batch_size
                    )
                    if room:
                        events = await self.store.read_after(self._read_to, self.batch_size)
                        if events:
                            batch = self._prepare(events)
                            inflight.append(batch)
                            if batch.sent:
                                batch.results = await self.transport.send(batch.sent)
                            continue
                    if inflight:
                        acks = inflight[0].results
                        if room and acks is not None and not acks.done():
                            # send what commits meanwhile rather than wait for these acks
                            await self._acks_or_events(acks, limit)
                            continue
                        await self._take_acks(inflight.popleft())
                        self._committing = self._reap(epoch)
                        if outage is not None:
                            log.info("relay %s: broker available again", self.name)
                            outage = None
                        last_beat = time.monotonic()
                        backoff = None
                        await asyncio.sleep(0)
                        continue
                    if self._committing is not None and not room:
                        # at the bound of acknowledged events awaiting their checkpoint:
                        # only the commit makes room (new events could not be read yet)
                        await asyncio.wait([self._committing], timeout=limit)
                        continue
                    if self._acked and self._committing is not None:
                        # nothing to read or send: wait for the checkpoint to catch up, or
                        # for new events, which go out without waiting for it
                        await self._acks_or_events(self._committing, limit)
                        continue
                except BrokerUnavailableError as exc:
                    await self._abandon(inflight)
                    if outage is None:
                        self.outages += 1
                        log.warning(
                            "relay %s: broker unavailable (%s); backing off", self.name, exc
                        )
                    outage = min(self.max_backoff, (outage or 0.05) * 2)
                    if time.monotonic() - last_beat >= self.lease_ttl / 3:
                        async with self.state_db.transaction() as s:
                            await self._fence(s, epoch)
                        last_beat = time.monotonic()
                    await self._pause(outage)
                    continue
                if time.monotonic() - last_beat >= self.lease_ttl / 3:
                    async with self.state_db.transaction() as s:
                        await self._fence(s, epoch)
                    last_beat = time.monotonic()
                if self._committing is None:  # caught up: read, sent, acked, committed
                    self._failures = 0
                woke = await self._wait_for_events(backoff or limit)
                if woke:
                    backoff = 0.001 if backoff is None else min(backoff * 2, limit)
                elif backoff is None or backoff >= limit:
                    backoff = None
                else:
                    backoff = min(backoff * 2, limit)
            try:  # stopping: finish what is in flight, unless the broker is down
                await self._drain(epoch, inflight)
            except BrokerUnavailableError:
                await self._drain(epoch, deque())  # commit what was acknowledged
        finally:
            await self._abandon(inflight)
            committing, self._committing = self._committing, None
            if committing is not None and not committing.done():
                committing.cancel()
            if committing is not None:
                await asyncio.gather(committing, return_exceptions=True)

    def _settle(self) -> None:
        """Everything acknowledged is committed: number on from the committed state."""
        self._acked_to = self.checkpoint
        self._acked_seqs = dict(self._sequences)
        self._acked_blocked = set(self._blocked)
        self._rewind()

    def _rewind(self) -> None:
        """Read and number on from the last acknowledged batch (after an outage)."""
        self._read_to = self._acked_to
        self._ahead = dict(self._acked_seqs)
        self._ahead_blocked = set(self._acked_blocked)

    async def _abandon(self, inflight: deque[_Batch]) -> None:
        """Give up the batches in flight: their outcome no longer matters, because the
        relay publishes again after the last acknowledged batch with the same ids and
        numbers."""
        pending = [b.results for b in inflight if b.results is not None]
        inflight.clear()
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._rewind()

    def _reap(self, epoch: int) -> asyncio.Task[None] | None:
        """The checkpoint commit task: raise its error if it failed; start the next one
        when acknowledged batches wait and none is running."""
        task = self._committing
        if task is not None and task.done():
            task.result()  # raises LeaseLostError, a database error ...
            task = None
        if task is None and self._acked:
            task = asyncio.create_task(self._commit(epoch), name=f"relay:{self.name}:commit")
        return task

    async def _drain(self, epoch: int, inflight: deque[_Batch]) -> None:
        """Take the acknowledgements of every batch in flight, then commit them all."""
        while inflight:
            await self._take_acks(inflight.popleft())
        while True:
            self._committing = self._reap(epoch)
            if self._committing is None:
                return
            await asyncio.wait([self._committing])

    def _prepare(self, events: Sequence[StoredEvent]) -> _Batch:
        """Number the batch on from the batches already in flight. The envelopes to send
        hold a ``parked`` placeholder, in place, for each event parked before sending."""
        seqs = dict(self._ahead)
        owned, n, blocked = self.owned, self.partitions, self._ahead_blocked
        send: list[Envelope] = []
        refused: dict[int, tuple[StoredEvent, str]] = {}
        max_bytes = self.max_bytes
        refusal = self.transport.refusal
        limit = self.transport.max_bytes
        if limit is not None and limit < max_bytes:
            max_bytes = limit
        for e in events:
            p = partition_of(e.stream, n)
            if owned is not None and p not in owned:
                continue
            seq = seqs[p] = seqs.get(p, 0) + 1
            env = Envelope.from_stored(e, p, n, seq)
            if blocked and e.stream in blocked:
                reason = f"not published: an earlier event of stream {e.stream!r} is parked"
            elif len(env.payload) > max_bytes:
                reason = f"payload of {len(env.payload)} bytes exceeds max_bytes={max_bytes}"
                blocked.add(e.stream)
            else:
                signed = self._sign(env)
                why = refusal(signed)
                if why is None:
                    send.append(signed)
                    continue
                # the transport would refuse it unsent: park it here, in its place, so
                # the stream's later events in this batch wait behind it
                reason = why
                blocked.add(e.stream)
            refused[e.position] = (e, reason)
            send.append(self._sign(env.parked()))
        self._read_to = events[-1].position
        self._ahead = seqs
        return _Batch(events, send, refused, seqs, events[-1].position, size=len(events))

    def _sign(self, env: Envelope) -> Envelope:
        signer = self.signer
        if signer is None:
            return env
        return env.signed(signer, self.transport.destination(env.partition))

    async def _take_acks(self, batch: _Batch) -> None:
        """Wait for the batch's acknowledgements; hand it to the checkpoint commit."""
        if batch.results is not None:
            results = await batch.results
            late: list[Envelope] = []
            for env, reason in zip(batch.sent, results, strict=True):
                if reason is None:
                    batch.acked += env.kind == "event"
                elif env.kind == "parked":
                    self._hole(env, reason)
                else:
                    # refused by the broker itself: park it; its placeholder goes after the
                    # batches in flight (a consumer sees that sequence number late, never
                    # missing)
                    batch.refused[env.position] = (
                        next(e for e in batch.events if e.position == env.position),
                        reason,
                    )
                    self._ahead_blocked.add(env.stream)
                    late.append(self._sign(env.parked()))
            if late:
                for env, reason in zip(late, await self.transport.publish(late), strict=True):
                    if reason is not None:
                        self._hole(env, reason)
        self._acked_to = batch.last
        self._acked_seqs = batch.seqs
        self._acked_blocked.update(stored.stream for stored, _ in batch.refused.values())
        batch.events, batch.sent, batch.results = (), [], None  # only the bookkeeping stays
        self._acked.append(batch)
        self._uncommitted += batch.size

    async def _commit(self, epoch: int) -> None:
        """Commit the checkpoint of every acknowledged batch, oldest first, in one
        transaction per round (the lease epoch checked in it)."""
        while self._acked:
            batches, self._acked = self._acked, []
            parked = [b.refused[k] for b in batches for k in sorted(b.refused)]
            seqs, last = batches[-1].seqs, batches[-1].last
            async with self.state_db.transaction() as s:
                await self._fence(s, epoch)
                for stored, reason in parked:
                    await state.park(s, self.name, self._generation, stored, reason)
                touched = [(p, q) for p, q in seqs.items() if self._sequences.get(p) != q]
                await state.save_sequences(s, self.name, self.partitions, touched)
                await schema.set_checkpoint(s, self.name, self._generation, last)
            self._sequences = seqs
            for stored, reason in parked:
                if stored.stream not in self._blocked:
                    log.warning(
                        "relay %s: parked stream %r at version %d: %s",
                        self.name,
                        stored.stream,
                        stored.version,
                        reason,
                    )
                self._blocked.add(stored.stream)
            self.parked += len(parked)
            self.published += sum(b.acked for b in batches)
            self._uncommitted -= sum(b.size for b in batches)
            self.checkpoint = last
            self._failures = 0  # a round got all the way to its checkpoint
            self.signal.notify()

    def _hole(self, env: Envelope, reason: str) -> None:
        """A placeholder was refused too: the partition's sequence has a hole (loud)."""
        self.gaps += 1
        log.error(
            "relay %s: partition %d has a hole at sequence %d (stream %r version %d was "
            "refused, and its placeholder too: %s)",
            self.name,
            env.partition,
            env.sequence,
            env.stream,
            env.version,
            reason,
        )

    # -- state checks and retries --------------------------------------------------------

    async def _retry_requests(self, epoch: int, *, beat: bool) -> list[tuple[int, str, int]]:
        """Check the lease (and with ``beat`` beat it, in a write transaction; else in a
        read-only look, which takes no write lock); return the parked events flagged for
        a retry."""
        session = self.state_db.transaction() if beat else self._look()
        async with session as s:
            if beat:
                await self._fence(s, epoch)
            else:
                row = await schema.load(s, self.name)
                if row is None or row.lease_epoch != epoch:
                    raise LeaseLostError(f"relay {self.name}: lease epoch {epoch} moved on")
            rows = await s.fetchall(
                "SELECT position, stream, version FROM cqrskit_dead_letters "
                "WHERE projection = ? AND generation = ? AND retry = 1 ORDER BY position",
                self.name,
                self._generation,
            )
        return [(int(p), str(s), int(v)) for p, s, v in rows]

    async def _retry(self, epoch: int, rows: list[tuple[int, str, int]]) -> None:
        """Publish flagged parked events again (new sequence numbers, in order per stream);
        a stream stops at its first event refused again."""
        seqs = dict(self._sequences)
        ok: list[int] = []
        failed: dict[int, str] = {}
        stopped: set[str] = set()
        for position, stream, version in rows:
            if stream in stopped:
                continue
            found = [
                e
                for e in await self.store.read_stream(stream, version - 1)
                if e.position == position
            ]
            if not found:
                failed[position] = "event not in the log"
                stopped.add(stream)
                continue
            p = partition_of(stream, self.partitions)
            seq = seqs[p] = seqs.get(p, 0) + 1
            env = self._sign(Envelope.from_stored(found[0], p, self.partitions, seq))
            [reason] = await self.transport.publish([env])
            if reason is None:
                ok.append(position)
            else:
                failed[position] = reason
                stopped.add(stream)
                seqs[p] = seq - 1  # nothing took this number
        async with self.state_db.transaction() as s:
            await self._fence(s, epoch)
            key = (self.name, self._generation)
            for position in ok:
                await s.execute(
                    "DELETE FROM cqrskit_dead_letters WHERE projection = ? AND generation = ? "
                    "AND position = ?",
                    *key,
                    position,
                )
            for position, reason in failed.items():
                await s.execute(
                    "UPDATE cqrskit_dead_letters SET error = ?, attempts = attempts + 1, "
                    "parked_at = ?, retry = 0 WHERE projection = ? AND generation = ? "
                    "AND position = ?",
                    reason[:2000],
                    time.time(),
                    *key,
                    position,
                )
            # only the requests read above: one made since (another stream's) stays set
            done = set(ok).union(failed)
            for position in [p for p, _, _ in rows if p not in done]:  # streams stopped
                await s.execute(
                    "UPDATE cqrskit_dead_letters SET retry = 0 WHERE projection = ? AND "
                    "generation = ? AND position = ?",
                    *key,
                    position,
                )
            await state.save_sequences(s, self.name, self.partitions, seqs.items())
            self._blocked = await state.load_blocked(s, self.name, self._generation)
        self._sequences = seqs
        self.published += len(ok)
        log.info(
            "relay %s: retried %d parked event(s), %d published", self.name, len(rows), len(ok)
        )

    async def _acks_or_events(self, acks: asyncio.Future[Any], timeout: float) -> None:
        """Wait until ``acks`` (the acknowledgements, or a checkpoint commit) is done, new
        events may be readable, or ``timeout`` passed."""
        waiter: asyncio.Future[Any] = asyncio.ensure_future(
            self.store.wait_for(self._read_to, timeout)
        )
        pair: set[asyncio.Future[Any]] = {acks, waiter}
        await asyncio.wait(pair, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)

    async def _wait_for_events(self, timeout: float) -> bool:
        waiter = asyncio.ensure_future(self.store.wait_for(self._read_to, timeout))
        stopper = asyncio.ensure_future(self._stop.wait())
        done, pending = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return waiter in done and not waiter.cancelled() and bool(waiter.result())
