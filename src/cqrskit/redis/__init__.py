"""Redis Streams for cqrskit (extra ``cqrskit[redis]``, on ``redis`` asyncio).

:class:`RedisTransport` appends the relay's envelopes to one stream key per partition with
pipelined ``XADD``. Redis has no producer dedup: a republished tail is stored again, with
the same message id and partition sequence, and consumers drop it by sequence.
"""

from cqrskit.redis.transport import RedisTransport

__all__ = ["RedisTransport"]
