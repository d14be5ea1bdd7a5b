"""How the write side turns an event into a log row's type name, schema version and JSON.

A stand-in kept behind one function until ``cqrskit.serialization`` lands; the stores take
any ``encoder`` with the same signature.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

from cqrskit.errors import SerializationError
from cqrskit.messages import Event

__all__ = ["EncodedEvent", "encode_event"]


class EncodedEvent(NamedTuple):
    """An event's stable type name, schema version and JSON payload."""

    type: str
    schema_version: int
    data: str


def _fields(event: Event) -> Any:
    if dataclasses.is_dataclass(event):
        return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    dump = getattr(event, "model_dump", None)
    if dump is not None:
        return dump(mode="json")
    fields = getattr(type(event), "__struct_fields__", None)
    if fields is not None:
        return {name: getattr(event, name) for name in fields}
    return dict(vars(event))


def encode_event(event: Event) -> EncodedEvent:
    """Encode ``event`` (dataclass, pydantic model or msgspec Struct) as JSON.

    The type name is the class's ``__event_type__`` if set, else its ``__name__``; the schema
    version is ``__schema_version__`` if set, else 1.

    Raises:
        SerializationError: the payload is not JSON-serializable.
    """
    cls = type(event)
    try:
        data = json.dumps(
            _fields(event), separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str
        )
    except (TypeError, ValueError) as exc:
        raise SerializationError(
            f"cannot encode event {cls.__name__} as JSON: {exc}.", message_type=cls
        ) from exc
    return EncodedEvent(
        getattr(cls, "__event_type__", cls.__name__),
        getattr(cls, "__schema_version__", 1),
        data,
    )
