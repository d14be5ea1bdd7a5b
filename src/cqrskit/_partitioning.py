"""Partitions: which of N partitions carries a stream's events.

``partition_of(stream, n)`` is CRC-32 (IEEE, as ``zlib.crc32``) of the stream id's UTF-8
bytes modulo ``n``: stable across processes, machines and languages, so every event of a
stream goes to one partition and keeps its order there while workers scale out by
partition. Changing ``n`` moves streams between partitions; see docs/messaging.md.

Both sides use it: partitioned projectors of the event log (``cqrskit.projections``) and
the relay and consumers of messaging mode (``cqrskit.messaging``, which re-exports these
names publicly). It lives below both so that the read side does not import messaging.
"""

from __future__ import annotations

import zlib

from cqrskit.errors import ConfigurationError

__all__ = ["MAX_PARTITIONS", "check_partitions", "partition_of"]

MAX_PARTITIONS = 4096


def partition_of(stream: str, partitions: int) -> int:
    """The partition (``0 .. partitions - 1``) that carries ``stream``."""
    if partitions == 1:
        return 0
    return zlib.crc32(stream.encode("utf-8", "surrogatepass")) % partitions


def check_partitions(partitions: int) -> int:
    """Return ``partitions`` if it is an int in ``1 .. MAX_PARTITIONS``.

    Raises:
        ConfigurationError: it is not.
    """
    if (
        not isinstance(partitions, int)
        or isinstance(partitions, bool)
        or not 1 <= partitions <= MAX_PARTITIONS
    ):
        raise ConfigurationError(
            f"partitions must be an int from 1 to {MAX_PARTITIONS}, got {partitions!r}.",
            hint="pick the number of partitions once (e.g. 8) and keep it; see "
            "docs/messaging.md on changing it.",
        )
    return partitions
