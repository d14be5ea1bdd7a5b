"""Messaging mode: the outbox relay and the broker-neutral pieces every transport shares.

* :class:`Relay` tails the event log like a projector (gap-free reads, lease + fencing,
  checkpoint, status) and publishes each event to a broker, committing its checkpoint only
  after the broker acknowledged.
* :class:`Transport` is the broker port (one ``publish`` of a batch); the brokers'
  implementations live in ``cqrskit.nats``, ``cqrskit.rabbitmq`` and ``cqrskit.redis``;
  :class:`InMemoryTransport` has the same semantics in memory.
* :class:`Envelope` is what every broker carries the same way; :class:`HmacSigner`
  signs and verifies it; :func:`partition_of` picks a stream's partition.
* :class:`Consumer` is the consuming side: the same projections (and, with
  :class:`EventHandlers`, the same event handlers) fed by a broker through a
  :class:`Source`, effectively once, partitioned across worker processes.

See ``docs/messaging.md``.
"""

from cqrskit.messaging.consumer import Consumer
from cqrskit.messaging.envelope import Envelope, traceparent_for
from cqrskit.messaging.handlers import EventHandlers
from cqrskit.messaging.memory import InMemorySource, InMemoryTransport
from cqrskit.messaging.partitioning import check_partitions, check_token, partition_of
from cqrskit.messaging.relay import Relay, relay_status
from cqrskit.messaging.signing import HmacSigner
from cqrskit.messaging.source import Delivery, Source, Subscription
from cqrskit.messaging.transport import Transport

__all__ = [
    "Consumer",
    "Delivery",
    "Envelope",
    "EventHandlers",
    "HmacSigner",
    "InMemorySource",
    "InMemoryTransport",
    "Relay",
    "Source",
    "Subscription",
    "Transport",
    "check_partitions",
    "check_token",
    "partition_of",
    "relay_status",
    "traceparent_for",
]
