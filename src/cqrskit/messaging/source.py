"""The consumer port: how a :class:`~cqrskit.messaging.Consumer` reads envelopes from a broker.

A :class:`Source` is the consuming half of a broker adapter (a :class:`Transport` is the
publishing half). It hands out one :class:`Subscription` per (group, partition): the feed of
one partition's destination for one consumer group (a projection, or a set of event
handlers). The consumer holds a subscription only while it holds that partition's lease in
the read database, so a subscription has a single reader.

The contract:

* :meth:`Subscription.fetch` returns the partition's messages in the broker's order, at
  most ``max_messages``, waiting at most ``timeout`` seconds for the first one; messages
  left unacknowledged by an earlier holder (a crashed consumer) come again, before newer
  ones. Returning nothing is normal (nothing new).
* :meth:`Subscription.ack` tells the broker the messages are done (they are never asked
  for again by this group); the consumer acks only after its read-database transaction
  committed, and acks a prefix of what it fetched, in order.
* :meth:`Source.subscribe` positions the new subscription right after ``cursor`` — the
  broker position of the last message the read database recorded as processed — when the
  broker can (NATS, the in-memory broker), else at the group's own unacknowledged state
  (Redis pending entries, RabbitMQ requeued messages). Re-subscribing is how a consumer
  re-reads after a gap or an error; every message it sees twice is dropped by sequence.
* Any broker failure raises :class:`~cqrskit.errors.BrokerUnavailableError`; the consumer
  backs off and subscribes again. Nothing is buffered beyond one fetch (plus the broker
  client's bounded prefetch).

A Kafka or SQS adapter is one class of each. See ``docs/messaging.md``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Delivery", "Source", "Subscription"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as read from a broker, not yet trusted.

    Attributes:
        headers: the message's headers (or Redis entry fields), undecoded.
        body: the message body.
        cursor: the broker's position of this message (a JetStream stream sequence, a
            Redis entry id, an index ...); stored with the consumer's checkpoint so a new
            holder of the partition can resume right after it. ``""`` when the broker has
            none (RabbitMQ).
        handle: what the broker adapter needs to acknowledge it (opaque to the consumer).
        redelivered: whether the broker says it delivered this message before.
    """

    headers: Mapping[str, Any]
    body: bytes
    cursor: str = ""
    handle: Any = None
    redelivered: bool = False


class Subscription(ABC):
    """One (group, partition) feed, held by the partition's lease holder (see module)."""

    @abstractmethod
    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to ``max_messages`` messages in broker order; waits at most ``timeout`` for
        the first one and returns ``[]`` if none came.

        Raises:
            BrokerUnavailableError: the broker is down or the subscription is gone.
        """

    @abstractmethod
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge ``deliveries`` (a prefix of what was fetched, in order).

        Raises:
            BrokerUnavailableError: the broker is down (the messages come again later and
                are dropped by sequence).
        """

    async def extend(self, deliveries: Sequence[Delivery]) -> None:  # noqa: B027 - optional
        """Tell the broker the consumer is still working on ``deliveries`` (NATS: "in
        progress"), so it does not redeliver them during a long batch. A no-op by default."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Give the subscription up; what was fetched and not acknowledged comes again
        (to the next holder) — immediately where the broker allows."""


class Source(ABC):
    """A broker's consuming side (see the module docs).

    Attributes:
        name: short name of the broker, for logs and status.
        extend_interval: seconds between :meth:`Subscription.extend` calls while a batch
            is being applied (``None``: the broker needs none).
        max_unacked: the most messages one subscription may have fetched and not yet
            acknowledged (NATS ``max_ack_pending``, RabbitMQ prefetch): the consumer's
            look-ahead past a gap is bounded by it.
    """

    name: str = "source"
    extend_interval: float | None = None
    max_unacked: int = 10_000

    @abstractmethod
    def destination(self, partition: int) -> str:
        """The broker's name for ``partition`` — the same as the relay transport's (signed
        envelopes cover it)."""

    @abstractmethod
    async def subscribe(self, group: str, partition: int, cursor: str) -> Subscription:
        """Open ``group``'s feed of ``partition``, resuming after ``cursor`` when the broker
        can (``""``: from the group's own state, or the beginning).

        Raises:
            BrokerUnavailableError: the broker is down, or the partition's destination does
                not exist yet (the relay creates it on first publish).
        """

    async def backlog(self, group: str, partition: int) -> int | None:
        """Messages of ``partition`` the broker still holds for ``group`` (for status), or
        ``None`` when the broker cannot say cheaply."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Close the broker connection(s)."""

    async def __aenter__(self) -> Source:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
