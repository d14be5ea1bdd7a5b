"""The ``Serializer`` port and its JSON implementations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cqrskit.errors import MissingExtraError, SerializationError, describe
from cqrskit.eventlog import StoredEvent
from cqrskit.messages import Event
from cqrskit.serialization._codec import Limits, _OrjsonTextCodec, _TextCodec
from cqrskit.serialization._plan import _Invalid, _json_kind, _shorten
from cqrskit.serialization._types import EventTypes


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """An event ready for the event log's ``type``, ``schema_version`` and ``data`` columns.

    Attributes:
        type: the stable registered name.
        schema_version: the class's current schema version.
        data: the JSON text of the payload.
    """

    type: str
    schema_version: int
    data: str


class Serializer(Protocol):
    """The port between event objects and the event log's ``type``/``schema_version``/``data``.

    Implementations look classes up only in their :class:`EventTypes`, never import a name
    found in data, and raise :class:`~cqrskit.errors.SerializationError` (never retried)
    for anything they cannot encode or decode.
    """

    def encode(self, event: Event) -> EncodedEvent:
        """Encode ``event`` under its registered name and current schema version."""
        ...

    def decode(self, type_name: str, schema_version: int, data: str | bytes) -> Event:
        """Decode ``data`` written as ``type_name`` at ``schema_version``, upcasting it."""
        ...

    def decode_stored(self, stored: StoredEvent) -> Event:
        """Decode a row read from the event log."""
        ...


class JsonSerializer:
    """The default :class:`Serializer`: stdlib ``json``, compact, UTF-8, limits enforced.

    Args:
        event_types: the registry of event classes.
        limits: size, depth, string and integer bounds (the defaults suit most events).
    """

    def __init__(self, event_types: EventTypes, *, limits: Limits | None = None) -> None:
        self.event_types = event_types
        self.limits = limits if limits is not None else Limits()
        self._codec = self._make_codec(self.limits)

    def _make_codec(self, limits: Limits) -> _TextCodec:
        return _TextCodec(limits)

    def encode(self, event: Event) -> EncodedEvent:
        """Encode ``event``; the text is checked against the same limits as decoding.

        Raises:
            SerializationError: the class is not registered, a field does not match its
                annotation, or the result breaks a limit (it could never be read back).
        """
        entry = self.event_types._entry_by_class(type(event))
        try:
            data = self._codec.dump_checked(entry.encode(event))
        except _Invalid as exc:
            raise _error("encode", entry.name, entry.version, entry.cls, exc) from exc.__cause__
        return EncodedEvent(entry.name, entry.version, data)

    def decode(self, type_name: str, schema_version: int, data: str | bytes) -> Event:
        """Decode untrusted ``data``; upcast it from ``schema_version`` to the current one.

        Raises:
            SerializationError: unknown type name, a schema version newer than the class or
                without an upcaster chain, a limit broken, invalid JSON, or fields that do
                not match the class (missing, unknown, wrong type).
        """
        entry = self.event_types._entry_by_name(type_name)
        if type(schema_version) is not int or schema_version < 1:
            raise SerializationError(
                f"event {entry.name!r} has invalid schema version {_shorten(schema_version)}.",
                message_type=entry.cls,
            )
        if schema_version > entry.version:
            raise SerializationError(
                f"event {entry.name!r} has schema version {schema_version}, newer than "
                f"{describe(entry.cls)} (version {entry.version}).",
                message_type=entry.cls,
                hint="deploy the code that wrote it before reading it",
            )
        try:
            obj = self._codec.loads(data)
        except _Invalid as exc:
            raise _error("decode", entry.name, schema_version, entry.cls, exc) from None
        if type(obj) is not dict:
            raise SerializationError(
                f"cannot decode event {entry.name!r}: the payload is a JSON {_json_kind(obj)}, "
                "not an object.",
                message_type=entry.cls,
            )
        if schema_version != entry.version:
            obj = self.event_types._upcast(entry, schema_version, obj)
        try:
            event: Event = entry.decode(obj)
        except _Invalid as exc:
            raise _error("decode", entry.name, schema_version, entry.cls, exc) from exc.__cause__
        return event

    def decode_stored(self, stored: StoredEvent) -> Event:
        """Decode ``stored.data`` as ``stored.type`` at ``stored.schema_version``."""
        return self.decode(stored.type, stored.schema_version, stored.data)


class OrjsonSerializer(JsonSerializer):
    """A :class:`Serializer` using orjson; same text and same checks as :class:`JsonSerializer`.

    Integers are limited to 64 bits when encoding (an orjson limit).

    Raises:
        MissingExtraError: orjson is not installed (``pip install 'cqrskit[orjson]'``).
    """

    def _make_codec(self, limits: Limits) -> _TextCodec:
        try:
            import orjson
        except ImportError as exc:
            raise MissingExtraError("orjson", "orjson") from exc
        return _OrjsonTextCodec(limits, orjson)


def _error(verb: str, name: str, version: int, cls: type, exc: _Invalid) -> SerializationError:
    where = ".".join(reversed(exc.path)).replace(".[", "[")
    field = f" field {where!r}:" if where else ""
    return SerializationError(
        f"cannot {verb} event {name!r} (schema version {version}, {describe(cls)}):{field} "
        f"{exc.message}.",
        message_type=cls,
    )
