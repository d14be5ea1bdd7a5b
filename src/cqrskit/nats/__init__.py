"""NATS JetStream for cqrskit (extra ``cqrskit[nats]``, on ``nats-py``).

:class:`NatsTransport` publishes the relay's envelopes to a JetStream stream: one subject
per partition, the message id as ``Nats-Msg-Id`` (broker-side dedup), pipelined with a
bounded window of outstanding acknowledgements.
"""

from cqrskit.nats.transport import NatsTransport

__all__ = ["NatsTransport"]
