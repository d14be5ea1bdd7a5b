"""Event serialization: stable type names, schema versions, upcasters and safe JSON codecs.

Three pieces:

- :class:`EventTypes` maps *stable names* (``"account.opened"``) to event classes and
  back, with the current schema version of each and the upcasters that lift old payloads.
  It compiles a per-class encode/decode plan once, at registration.
- :class:`Serializer` is the port the event log uses: ``encode(event) -> EncodedEvent`` and
  ``decode(type, schema_version, data) -> Event`` (plus ``decode_stored``).
  :class:`JsonSerializer` (stdlib ``json``) is the default; :class:`OrjsonSerializer` needs
  the ``orjson`` extra. Both produce the same text for the same event.
- :func:`encode_metadata` / :func:`decode_metadata` for the metadata dict stored next to it.
- :class:`ValueCodecs` for any other typed value (idempotent command results).

Decoding treats the data as untrusted: the class comes only from the registry (a name is
never imported), the size is checked before parsing, and depth, string length, integer
digits, non-finite numbers, duplicate keys, lone surrogates and NUL characters are limited
or rejected. Every failure is a :class:`~cqrskit.errors.SerializationError`.
"""

from cqrskit.serialization._codec import Limits
from cqrskit.serialization._metadata import decode_metadata, encode_metadata, metadata_from_dict
from cqrskit.serialization._serializer import (
    EncodedEvent,
    JsonSerializer,
    OrjsonSerializer,
    Serializer,
)
from cqrskit.serialization._types import EventTypes, Upcaster
from cqrskit.serialization._values import ValueCodec, ValueCodecs

__all__ = [
    "EncodedEvent",
    "EventTypes",
    "JsonSerializer",
    "Limits",
    "OrjsonSerializer",
    "Serializer",
    "Upcaster",
    "ValueCodec",
    "ValueCodecs",
    "decode_metadata",
    "encode_metadata",
    "metadata_from_dict",
]
