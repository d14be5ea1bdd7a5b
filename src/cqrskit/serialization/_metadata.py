"""Encoding and decoding of the event metadata dict, with the same limits."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from cqrskit.errors import SerializationError
from cqrskit.messages import Metadata
from cqrskit.serialization._codec import Limits, _TextCodec
from cqrskit.serialization._plan import _Invalid, _json_kind

_METADATA_IDS = ("message_id", "correlation_id", "causation_id")
_DEFAULT_METADATA_CODEC = _TextCodec(Limits(max_bytes=64_000, max_depth=8, max_string_length=8_000))


def _check_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(meta)
    for key in _METADATA_IDS:
        value = out.get(key)
        if value is not None and type(value) is not str:
            raise _Invalid(f"metadata {key!r} must be a string or null")
    stamp = out.get("timestamp")
    if stamp is not None:
        if type(stamp) is not str:
            raise _Invalid("metadata 'timestamp' must be an ISO 8601 string")
        try:
            datetime.fromisoformat(stamp)
        except ValueError:
            raise _Invalid("metadata 'timestamp' is not an ISO 8601 datetime") from None
    return out


def encode_metadata(metadata: Metadata | Mapping[str, Any], *, limits: Limits | None = None) -> str:
    """Encode event metadata (ids, ISO timestamp, any extra JSON values) as JSON text.

    A :class:`~cqrskit.messages.Metadata` is turned into its ``as_dict()``; a mapping is
    checked: ``message_id``/``correlation_id``/``causation_id`` are strings or null and
    ``timestamp`` an ISO string. The metadata limits default to 64 kB, depth 8, 8000-char
    strings.

    Raises:
        SerializationError: a value has the wrong type or breaks a limit.
    """
    codec = _DEFAULT_METADATA_CODEC if limits is None else _TextCodec(limits)
    source = metadata.as_dict() if isinstance(metadata, Metadata) else metadata
    try:
        return codec.dump_checked(_check_metadata(source))
    except _Invalid as exc:
        raise SerializationError(f"cannot encode event metadata: {exc.message}.") from None


def decode_metadata(data: str | bytes, *, limits: Limits | None = None) -> dict[str, Any]:
    """Decode metadata written by :func:`encode_metadata`, with the same checks and limits.

    Raises:
        SerializationError: invalid JSON, not an object, a limit broken or a bad value.
    """
    codec = _DEFAULT_METADATA_CODEC if limits is None else _TextCodec(limits)
    try:
        tree = codec.loads(data)
        if type(tree) is not dict:
            raise _Invalid(f"metadata must be a JSON object, got {_json_kind(tree)}")
        return _check_metadata(tree)
    except _Invalid as exc:
        raise SerializationError(f"cannot decode event metadata: {exc.message}.") from None


def metadata_from_dict(data: Mapping[str, Any]) -> Metadata:
    """Rebuild a :class:`~cqrskit.messages.Metadata` from a decoded metadata dict.

    Raises:
        SerializationError: an id is not a string or the timestamp is not ISO 8601.
    """
    try:
        checked = _check_metadata(data)
    except _Invalid as exc:
        raise SerializationError(f"invalid event metadata: {exc.message}.") from None
    stamp = checked.get("timestamp")
    return Metadata(
        message_id=checked.get("message_id"),
        correlation_id=checked.get("correlation_id"),
        causation_id=checked.get("causation_id"),
        timestamp=datetime.fromisoformat(stamp) if stamp is not None else None,
    )
