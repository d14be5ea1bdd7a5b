"""Redis Streams for cqrskit (extra ``cqrskit[redis]``, on ``redis`` asyncio).

:class:`RedisTransport` appends the relay's envelopes to one stream key per partition with
pipelined ``XADD``. Redis has no producer dedup: a republished tail is stored again, with
the same message id and partition sequence, and consumers drop it by sequence.
:class:`RedisSource` reads the streams with consumer groups, taking over a dead consumer's
pending entries with ``XAUTOCLAIM``.
"""

from cqrskit.redis.consumer import RedisSource
from cqrskit.redis.transport import RedisTransport

__all__ = ["RedisSource", "RedisTransport"]
