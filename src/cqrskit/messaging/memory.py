"""An in-memory transport with a broker's semantics, for tests, demos and the docs.

It stores each message in wire form (headers + body) per destination, acknowledges
in order, refuses what a broker would refuse (too large, unknown destination) and can
deduplicate by message id within a window as NATS JetStream does. Switches simulate
faults: :attr:`InMemoryTransport.available` (broker down) and
:meth:`InMemoryTransport.lose_acks` (stored, but the acknowledgement is lost).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Collection, Sequence

from cqrskit.errors import BrokerUnavailableError
from cqrskit.messaging.envelope import DEFAULT_MAX_BYTES, Envelope
from cqrskit.messaging.partitioning import check_token
from cqrskit.messaging.transport import Transport

__all__ = ["InMemoryTransport"]


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
