"""NATS JetStream for cqrskit (extra ``cqrskit[nats]``, on ``nats-py``).

:class:`NatsTransport` publishes the relay's envelopes to a JetStream stream: one subject
per partition, the message id as ``Nats-Msg-Id`` (broker-side dedup), pipelined with a
bounded window of outstanding acknowledgements. :class:`NatsSource` is the consuming side:
one durable pull consumer per (group, partition) with explicit acks.
"""

from cqrskit.nats.consumer import NatsSource
from cqrskit.nats.transport import NatsTransport

__all__ = ["NatsSource", "NatsTransport"]
