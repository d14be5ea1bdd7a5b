"""Partitions: which of N broker destinations carries a stream's events.

``partition_of(stream, n)`` is CRC-32 (IEEE, as ``zlib.crc32``) of the stream id's UTF-8
bytes modulo ``n``: stable across processes, machines and languages, so every event of a
stream goes to one partition and keeps its order there while consumers scale out by
partition. Changing ``n`` moves streams between partitions; see docs/messaging.md.
"""

from __future__ import annotations

import re
import zlib

from cqrskit.errors import ConfigurationError

__all__ = ["MAX_PARTITIONS", "check_partitions", "check_token", "partition_of"]

MAX_PARTITIONS = 4096

# a NATS subject token / AMQP routing-key part / Redis key part without wildcards,
# separators, whitespace or control characters
# (fullmatch: a pattern ending in ``$`` would also accept a trailing newline)
_TOKEN = re.compile(r"[A-Za-z0-9_\-]+")


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
