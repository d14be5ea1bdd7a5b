"""How the write side turns an event into a log row's type name, schema version and JSON.

The default needs no registration (type name = class name); pass
``encoder=JsonSerializer(event_types).encode`` from :mod:`cqrskit.serialization` for stable
registered names, schema versions and limits.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from cqrskit.errors import SerializationError
from cqrskit.messages import Event

__all__ = ["Encoded", "EncodedEvent", "Encoder", "encode_event"]


class Encoded(Protocol):
    """What an encoder returns: the log row's type name, schema version and JSON text
    (``cqrskit.serialization.EncodedEvent`` and :class:`EncodedEvent` both fit)."""

    @property
    def type(self) -> str:
        """The event's stable type name."""
        ...

    @property
    def schema_version(self) -> int:
        """The schema version of the payload."""
        ...

    @property
    def data(self) -> str:
        """The JSON payload."""
        ...


Encoder = Callable[[Event], Encoded]
"""An event encoder, e.g. ``JsonSerializer(event_types).encode``."""


class EncodedEvent(NamedTuple):
    """An event's stable type name, schema version and JSON payload."""

    type: str
    schema_version: int
    data: str


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)
# The C encoder behind _ENCODER, built once: JSONEncoder.encode builds it anew on every call,
# which costs more than encoding a small event. Without a markers dict (a shared one would
# be unsafe across threads) a container holding itself ends in RecursionError, not a loop.
_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_encode: Callable[[Any], str]
if _c_encoder is not None:
    _c_encode = _c_encoder(
        None, str, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )

    def _encode(obj: Any) -> str:
        return "".join(_c_encode(obj, 0))

else:  # pragma: no cover - CPython always has the C accelerator
    _encode = _ENCODER.encode
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _fields(event: Event) -> Any:
    names = _FIELD_NAMES.get(type(event))
    if names is not None:
        return {name: getattr(event, name) for name in names}
    if dataclasses.is_dataclass(event):
        names = _FIELD_NAMES[type(event)] = tuple(f.name for f in dataclasses.fields(event))
        return {name: getattr(event, name) for name in names}
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
        data = _encode(_fields(event))
    except (TypeError, ValueError, RecursionError) as exc:
        raise SerializationError(
            f"cannot encode event {cls.__name__} as JSON: {exc}.", message_type=cls
        ) from exc
    return EncodedEvent(
        getattr(cls, "__event_type__", cls.__name__),
        getattr(cls, "__schema_version__", 1),
        data,
    )
