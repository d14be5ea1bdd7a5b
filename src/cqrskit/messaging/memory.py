"""An in-memory transport with a broker's semantics, for tests, demos and the docs.

It stores each message in wire form (headers + body) per destination, acknowledges
in order, refuses what a broker would refuse (too large, unknown destination) and can
deduplicate by message id within a window as NATS JetStream does. Switches simulate
faults: :attr:`InMemoryTransport.available` (broker down) and
:meth:`InMemoryTransport.lose_acks` (stored, but the acknowledgement is lost).

:meth:`InMemoryTransport.source` is the consuming side (a :class:`~cqrskit.messaging.Source`):
per consumer group and destination it remembers what was acknowledged; a subscription
resumes after a given cursor (the message's index) or after the group's acknowledged prefix.
:meth:`InMemoryTransport.inject` stores raw bytes as a broker would accept them from anyone.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Collection, Sequence

from cqrskit.errors import BrokerUnavailableError
from cqrskit.messaging.envelope import DEFAULT_MAX_BYTES, Envelope
from cqrskit.messaging.partitioning import check_token
from cqrskit.messaging.source import Delivery, Source, Subscription
from cqrskit.messaging.transport import Transport

__all__ = ["InMemorySource", "InMemoryTransport"]


class InMemoryTransport(Transport):
    """Stores published envelopes in lists, one per destination.

    Args:
        prefix: destination names are ``<prefix>.<partition>``.
        dedup_window: seconds a message id is remembered (a republished id within it is
            acknowledged and dropped, like JetStream's ``Nats-Msg-Id``); ``None`` keeps
            every copy, like Redis Streams.
        max_bytes: larger payloads are refused.
        destinations: the partitions that exist (``None``: all); publishing to another one
            is refused, like a missing stream or an unbound routing key.
    """

    name = "memory"
    max_bytes: int

    def __init__(
        self,
        *,
        prefix: str = "cqrskit.events",
        dedup_window: float | None = 120.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        destinations: Collection[int] | None = None,
    ) -> None:
        self.prefix = check_token(prefix, "destination prefix")
        self.dedup_window = dedup_window
        self.broker_dedup = dedup_window is not None
        self.max_bytes = max_bytes
        self.destinations = None if destinations is None else set(destinations)
        self.available = True
        self.published = 0
        self._stored: dict[str, list[tuple[dict[str, str], bytes]]] = {}
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lose = 0
        self._gate: asyncio.Event | None = None
        self._arrived: asyncio.Event | None = None
        #: (group, destination) -> how many messages the group acknowledged (a prefix)
        self.acked: dict[tuple[str, str], int] = {}
        self._acked_ids: dict[tuple[str, str], set[int]] = {}

    def destination(self, partition: int) -> str:
        """See :meth:`Transport.destination`."""
        return f"{self.prefix}.{partition}"

    def refusal(self, envelope: Envelope) -> str | None:
        """See :meth:`Transport.refusal`: a payload over ``max_bytes``."""
        if len(envelope.payload) > self.max_bytes:
            return f"message of {len(envelope.payload)} bytes exceeds {self.max_bytes}"
        return None

    def lose_acks(self, calls: int = 1) -> None:
        """Let the next ``calls`` publish calls store their messages, then raise
        :class:`~cqrskit.errors.BrokerUnavailableError` as if the acks were lost."""
        self._lose = calls

    def hold_acks(self) -> asyncio.Event:
        """Hold acknowledgements until the returned event is set (messages are stored)."""
        self._gate = asyncio.Event()
        return self._gate

    async def publish(self, messages: Sequence[Envelope]) -> list[str | None]:
        """See :meth:`Transport.publish`."""
        return await (await self.send(messages))

    async def send(self, messages: Sequence[Envelope]) -> asyncio.Future[list[str | None]]:
        """See :meth:`Transport.send`: stores at once, acknowledges on a later loop pass."""
        if not self.available:
            raise BrokerUnavailableError("in-memory broker is marked unavailable.")
        results: list[str | None] = []
        now = time.monotonic()
        seen = self._seen
        if self.dedup_window is not None:
            while seen and next(iter(seen.values())) < now - self.dedup_window:
                seen.popitem(last=False)
        for env in messages:
            reason = self.refusal(env)
            if reason is not None:
                results.append(reason)
                continue
            if self.destinations is not None and env.partition not in self.destinations:
                results.append(f"no such destination {self.destination(env.partition)!r}")
                continue
            results.append(None)
            if self.dedup_window is not None:
                if env.message_id in seen:
                    continue
                seen[env.message_id] = now
            dest = self.destination(env.partition)
            self._stored.setdefault(dest, []).append((env.headers(), env.payload))
            self.published += 1
        self._wake()
        gate, self._gate = self._gate, None
        lose = self._lose > 0
        self._lose -= lose
        return asyncio.ensure_future(self._ack(results, gate, lose))

    @staticmethod
    async def _ack(
        results: list[str | None], gate: asyncio.Event | None, lose: bool
    ) -> list[str | None]:
        if gate is not None:
            await gate.wait()
        if lose:
            raise BrokerUnavailableError("in-memory broker: acknowledgements lost.")
        await asyncio.sleep(0)
        return results

    def messages(self, partition: int) -> list[Envelope]:
        """What the broker holds for ``partition``, in order, decoded from wire form."""
        dest = self.destination(partition)
        return [Envelope.from_wire(h, b) for h, b in self._stored.get(dest, [])]

    def wire(self, partition: int) -> list[tuple[dict[str, str], bytes]]:
        """The raw (headers, body) pairs held for ``partition`` (e.g. to tamper in tests)."""
        return list(self._stored.get(self.destination(partition), []))

    def inject(self, partition: int, headers: dict[str, str], body: bytes) -> None:
        """Store raw ``headers`` and ``body`` on ``partition``'s destination as they are (a
        forged, corrupted or foreign message — or a duplicate)."""
        self._stored.setdefault(self.destination(partition), []).append((dict(headers), body))
        self._wake()

    def _wake(self) -> None:
        arrived, self._arrived = self._arrived, None
        if arrived is not None:
            arrived.set()

    async def _arrival(self, timeout: float) -> None:
        if self._arrived is None:
            self._arrived = asyncio.Event()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            pass

    def source(self) -> InMemorySource:
        """The consuming side of this in-memory broker."""
        return InMemorySource(self)


class _MemorySubscription(Subscription):
    def __init__(self, broker: InMemoryTransport, group: str, dest: str, start: int) -> None:
        self.broker = broker
        self.key = (group, dest)
        self.dest = dest
        self.next = start
        self.closed = False

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        broker = self.broker
        if self.closed or not broker.available:
            raise BrokerUnavailableError("in-memory broker is marked unavailable.")
        held = broker._stored.get(self.dest, [])
        if self.next >= len(held) and timeout > 0:
            await broker._arrival(timeout)
            held = broker._stored.get(self.dest, [])
        out = [
            Delivery(h, b, str(i), i)
            for i, (h, b) in enumerate(held[self.next : self.next + max_messages], self.next)
        ]
        self.next += len(out)
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not self.broker.available:
            raise BrokerUnavailableError("in-memory broker is marked unavailable.")
        acked = self.broker.acked
        done = self.broker._acked_ids.setdefault(self.key, set())
        done.update(int(d.handle) for d in deliveries)
        top = acked.get(self.key, 0)
        while top in done:
            done.discard(top)
            top += 1
        acked[self.key] = top

    async def close(self) -> None:
        self.closed = True


class InMemorySource(Source):
    """The consuming side of an :class:`InMemoryTransport` (see the module docs)."""

    name = "memory"

    def __init__(self, broker: InMemoryTransport) -> None:
        self.broker = broker

    def destination(self, partition: int) -> str:
        """See :meth:`Source.destination`."""
        return self.broker.destination(partition)

    async def subscribe(self, group: str, partition: int, cursor: str) -> Subscription:
        """See :meth:`Source.subscribe`: resumes after ``cursor`` (an index) if given, else
        after the group's acknowledged prefix."""
        if not self.broker.available:
            raise BrokerUnavailableError("in-memory broker is marked unavailable.")
        dest = self.destination(partition)
        start = int(cursor) + 1 if cursor else self.broker.acked.get((group, dest), 0)
        return _MemorySubscription(self.broker, group, dest, start)

    async def backlog(self, group: str, partition: int) -> int | None:
        """See :meth:`Source.backlog`."""
        dest = self.destination(partition)
        return len(self.broker._stored.get(dest, [])) - self.broker.acked.get((group, dest), 0)
