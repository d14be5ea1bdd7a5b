"""Partitions: which of N broker destinations carries a stream's events, and which names
are safe as broker subject / key tokens.

``partition_of(stream, n)`` is CRC-32 (IEEE, as ``zlib.crc32``) of the stream id's UTF-8
bytes modulo ``n``: stable across processes, machines and languages, so every event of a
stream goes to one partition and keeps its order there while consumers scale out by
partition. Changing ``n`` moves streams between partitions; see docs/messaging.md.
``partition_of``, ``check_partitions`` and ``MAX_PARTITIONS`` are defined in the
side-neutral ``cqrskit._partitioning`` (partitioned projectors use them too) and are
public here.
"""

from __future__ import annotations

import re

from cqrskit._partitioning import MAX_PARTITIONS, check_partitions, partition_of
from cqrskit.errors import ConfigurationError

__all__ = ["MAX_PARTITIONS", "check_partitions", "check_token", "partition_of"]

# a NATS subject token / AMQP routing-key part / Redis key part without wildcards,
# separators, whitespace or control characters
# (fullmatch: a pattern ending in ``$`` would also accept a trailing newline)
_TOKEN = re.compile(r"[A-Za-z0-9_\-]+")


def check_token(value: str, what: str) -> str:
    """Return ``value`` if it is safe as one broker subject / key token.

    Each dot-separated part must be letters, digits, ``_`` or ``-``: no ``.`` inside a
    part, no ``*``, ``>``, ``#``, whitespace, CR/LF or other control characters.

    Raises:
        ConfigurationError: it is not.
    """
    parts = value.split(".") if isinstance(value, str) else [""]
    if not all(_TOKEN.fullmatch(p) for p in parts):
        raise ConfigurationError(
            f"invalid {what} {value!r}: each dot-separated part must be letters, digits, "
            "'_' or '-'.",
            hint="wildcards (*, >, #), whitespace and control characters are never allowed "
            "in a broker name.",
        )
    return value
