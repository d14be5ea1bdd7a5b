"""The envelope: what every transport carries for one event, the same way on every broker.

On the wire an envelope is a flat map of text headers plus the event's JSON payload as the
body. NATS and RabbitMQ carry the headers as message headers, Redis Streams as entry
fields. The headers are:

==========================  ==============================================================
``cqrskit-id``              the event's message id (stable: the broker's dedup id)
``cqrskit-type``            the event type's registered name; ``cqrskit-schema`` its version
``cqrskit-stream``          stream id; ``cqrskit-version`` the event's version in it
``cqrskit-position``        the event's global position in the log
``cqrskit-partition``       ``p/N``: partition ``p`` of ``N``
``cqrskit-sequence``        1, 2, 3 ... per partition, no holes: a consumer seeing a lower
                            or equal number has a duplicate, a higher jump has a gap
``cqrskit-correlation``     correlation id; ``cqrskit-causation`` causation id
``cqrskit-timestamp``       when the command ran (ISO 8601, UTC)
``traceparent``             W3C trace context (trace id from the correlation id)
``cqrskit-kind``            ``event``, or ``parked``: a placeholder keeping the sequence
                            whole for an event the broker refused (its stream is parked)
``cqrskit-key``             HMAC key id; ``cqrskit-signature`` the hex HMAC (optional)
==========================  ==============================================================

Text that is not plain printable ASCII (or holds ``%``) is percent-encoded. Decoding
(:meth:`Envelope.from_wire`) checks the size first, then parses the headers (each bounded
in length; the signed bytes are rebuilt from them), then verifies the signature (when a
verifier is given); the payload is left as bytes for the application's serializer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import quote, unquote

from cqrskit.errors import EnvelopeError
from cqrskit.eventlog import StoredEvent
from cqrskit.messaging.partitioning import MAX_PARTITIONS
from cqrskit.messaging.signing import HmacSigner

__all__ = ["DEFAULT_MAX_BYTES", "HEADER_PREFIX", "Envelope", "traceparent_for"]

HEADER_PREFIX = "cqrskit-"
DEFAULT_MAX_BYTES = 1 << 20
_MAX_HEADER = 4096
_HEX = frozenset("0123456789abcdef")
_MAX_INT = (1 << 63) - 1  # positions, versions and sequences are signed 64-bit in SQL

_ID = "cqrskit-id"
_TYPE = "cqrskit-type"
_SCHEMA = "cqrskit-schema"
_STREAM = "cqrskit-stream"
_VERSION = "cqrskit-version"
_POSITION = "cqrskit-position"
_PARTITION = "cqrskit-partition"
_SEQUENCE = "cqrskit-sequence"
_CORRELATION = "cqrskit-correlation"
_CAUSATION = "cqrskit-causation"
_TIMESTAMP = "cqrskit-timestamp"
_TRACEPARENT = "traceparent"
_KIND = "cqrskit-kind"
_KEY = "cqrskit-key"
_SIGNATURE = "cqrskit-signature"

KINDS = ("event", "parked")


def _text(value: str) -> str:
    """Header-safe text: plain printable ASCII as is, anything else percent-encoded."""
    if value.isascii() and value.isprintable() and "%" not in value and value == value.strip():
        return value
    return quote(value, safe="", errors="surrogatepass")


def _untext(value: str) -> str:
    return unquote(value, errors="surrogatepass") if "%" in value else value


def _uint(text: str) -> int | None:
    """``text`` as an integer from 0 to 2**63 - 1 if it is ASCII digits only, else ``None``
    (``str.isdigit`` alone also accepts digits ``int`` refuses, or reads other scripts)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 19):
        return None
    value = int(text)
    return value if value <= _MAX_INT else None


def _need(h: dict[str, str], name: str) -> str:
    value = h.get(name)
    if value is None:
        raise EnvelopeError(
            f"not a cqrskit envelope: header {name!r} is missing.",
            hint="only the cqrskit relay's messages can be consumed as events.",
        )
    return value


def _number(h: dict[str, str], name: str) -> int:
    """A header holding an integer from 1 to 2**63 - 1 (module-level, not a closure per
    message: this is every consumer's hot path)."""
    text = _need(h, name)
    value = _uint(text)
    if value is None or value < 1:
        raise EnvelopeError(f"header {name!r} is not an integer >= 1: {text!r}.")
    return value


def traceparent_for(correlation_id: str | None, message_id: str) -> str:
    """A W3C ``traceparent``: the trace id is the correlation id's 32 hex digits (when it
    is a uuid; else a hash of it), the span id is derived from the message id."""
    source = correlation_id or message_id
    trace = source.replace("-", "").lower()
    if len(trace) != 32 or not _HEX.issuperset(trace) or trace == "0" * 32:
        trace = hashlib.blake2b(source.encode(), digest_size=16).hexdigest()
    span = hashlib.blake2b(message_id.encode(), digest_size=8).hexdigest()
    return f"00-{trace}-{span}-01"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event as carried by a broker (see the module docstring for the wire form).

    Attributes:
        message_id: the event's stable id (the broker's dedup id).
        type, schema_version: the event's registered type name and schema version.
        stream, version: the stream id and the event's version in it.
        position: the event's global position in the log.
        partition, partitions: the partition carrying the stream, out of how many.
        sequence: this message's number in its partition (1, 2, 3 ... without holes).
        correlation_id, causation_id, timestamp, traceparent: lineage and trace context.
        payload: the event's JSON payload (bytes; empty for a ``parked`` placeholder).
        kind: ``"event"`` or ``"parked"``.
        key_id, signature: the HMAC key id and signature, when signed.
    """

    message_id: str
    type: str
    schema_version: int
    stream: str
    version: int
    position: int
    partition: int
    partitions: int
    sequence: int
    correlation_id: str | None
    causation_id: str | None
    timestamp: str
    traceparent: str | None
    payload: bytes
    kind: str = "event"
    key_id: str | None = None
    signature: str | None = None

    @classmethod
    def from_stored(
        cls, stored: StoredEvent, partition: int, partitions: int, sequence: int
    ) -> Envelope:
        """The envelope of a stored event, numbered ``sequence`` in ``partition``."""
        md = stored.metadata
        message_id = str(md.get("message_id") or f"position-{stored.position}")
        correlation = md.get("correlation_id")
        causation = md.get("causation_id")
        trace = md.get("traceparent")
        values = (
            message_id,
            stored.type,
            stored.schema_version,
            stored.stream,
            stored.version,
            stored.position,
            partition,
            partitions,
            sequence,
            None if correlation is None else str(correlation),
            None if causation is None else str(causation),
            str(md.get("timestamp") or ""),
            str(trace) if trace else traceparent_for(correlation, message_id),
            stored.data.encode("utf-8", "surrogatepass"),
            "event",
            None,
            None,
        )
        if cls is not Envelope:
            return cls(*values)
        # the relay builds one envelope per event: the frozen dataclass __init__ assigns
        # each of the 17 fields through object.__setattr__ (~4 µs here); setting the slots
        # through their descriptors gives the same object for about half of that
        env = _new(Envelope)
        for setter, value in zip(_SETTERS, values):  # noqa: B905 - same length by design
            setter(env, value)
        return env

    def parked(self) -> Envelope:
        """The placeholder sent in this envelope's place when the broker refuses it: same
        sequence, stream and version, no payload, its own dedup id."""
        return replace(self, message_id=f"{self.message_id}.parked", payload=b"", kind="parked")

    def headers(self) -> dict[str, str]:
        """The wire headers (signature included when signed)."""
        h = {
            _ID: _text(self.message_id),
            _TYPE: _text(self.type),
            _SCHEMA: str(self.schema_version),
            _STREAM: _text(self.stream),
            _VERSION: str(self.version),
            _POSITION: str(self.position),
            _PARTITION: f"{self.partition}/{self.partitions}",
            _SEQUENCE: str(self.sequence),
            _TIMESTAMP: _text(self.timestamp),
        }
        if self.correlation_id is not None:
            h[_CORRELATION] = _text(self.correlation_id)
        if self.causation_id is not None:
            h[_CAUSATION] = _text(self.causation_id)
        if self.traceparent is not None:
            h[_TRACEPARENT] = _text(self.traceparent)
        if self.kind != "event":
            h[_KIND] = self.kind
        if self.signature is not None and self.key_id is not None:
            h[_KEY] = self.key_id
            h[_SIGNATURE] = self.signature
        return h

    def signing_input(self, destination: str) -> bytes:
        """The bytes an HMAC covers: the destination, every header but the signature
        (sorted) and the payload."""
        h = self.headers()
        h.pop(_SIGNATURE, None)
        if self.key_id is not None:
            h[_KEY] = self.key_id
        lines = [destination, *(f"{k}={h[k]}" for k in sorted(h)), ""]
        return "\n".join(lines).encode() + b"\n" + self.payload

    def signed(self, signer: HmacSigner, destination: str) -> Envelope:
        """This envelope signed by ``signer`` for ``destination`` (a transport's name for
        the partition, e.g. its subject)."""
        unsigned = replace(self, key_id=signer.active, signature=None)
        key_id, signature = signer.sign(unsigned.signing_input(destination))
        return replace(unsigned, key_id=key_id, signature=signature)

    def to_stored(self) -> StoredEvent:
        """The event as a :class:`~cqrskit.eventlog.StoredEvent`, for the application's
        decoder (e.g. ``serializer.decode_stored``) and projection code."""
        try:
            data = self.payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EnvelopeError(f"message {self.message_id!r}: payload is not UTF-8.") from exc
        return StoredEvent(
            self.position,
            self.stream,
            self.version,
            self.type,
            self.schema_version,
            data,
            {
                "message_id": self.message_id,
                "correlation_id": self.correlation_id,
                "causation_id": self.causation_id,
                "timestamp": self.timestamp,
            },
        )

    @classmethod
    def from_wire(
        cls,
        headers: Mapping[str, Any],
        body: bytes,
        *,
        destination: str | None = None,
        verifier: HmacSigner | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Envelope:
        """Decode (and, with ``verifier``, authenticate) one message read from a broker.

        Order of checks: size, then the header fields, then the signature (over
        ``destination``, which must be the name the message was read from); the payload is
        not decoded here.

        Raises:
            EnvelopeError: too large, a header missing or malformed.
            SignatureError: ``verifier`` is given and the signature is missing or wrong.
        """
        if len(body) > max_bytes:
            raise EnvelopeError(f"message of {len(body)} bytes exceeds max_bytes={max_bytes}.")
        h: dict[str, str] = {}
        for k, v in headers.items():
            # the hot path of every consumer: str keys and values, already lower case
            key = k if type(k) is str else k.decode() if isinstance(k, bytes) else str(k)
            if not key.islower():
                key = key.lower()
            if not key.startswith(HEADER_PREFIX) and key != _TRACEPARENT:
                continue
            if type(v) is str:
                value = v
            else:
                value = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            if len(value) > _MAX_HEADER:
                raise EnvelopeError(f"header {key!r} is longer than {_MAX_HEADER} characters.")
            h[key] = value
        env = cls._parse(h, bytes(body))
        if verifier is not None:
            if destination is None:
                raise EnvelopeError("verifying a signature needs the message's destination.")
            verifier.verify(env.key_id, env.signature, env.signing_input(destination))
        return env

    @classmethod
    def _parse(cls, h: dict[str, str], body: bytes) -> Envelope:
        need, number = _need, _number
        text, _, count_text = need(h, _PARTITION).partition("/")
        part, count = _uint(text), _uint(count_text)
        if part is None or count is None or not part < count <= MAX_PARTITIONS:
            raise EnvelopeError(f"header 'cqrskit-partition' is malformed: {h[_PARTITION]!r}.")
        kind = h.get(_KIND, "event")
        if kind not in KINDS:
            raise EnvelopeError(f"unknown envelope kind {kind!r}.")
        try:
            correlation = h.get(_CORRELATION)
            causation = h.get(_CAUSATION)
            trace = h.get(_TRACEPARENT)
            return cls(
                _untext(need(h, _ID)),
                _untext(need(h, _TYPE)),
                number(h, _SCHEMA),
                _untext(need(h, _STREAM)),
                number(h, _VERSION),
                number(h, _POSITION),
                part,
                count,
                number(h, _SEQUENCE),
                None if correlation is None else _untext(correlation),
                None if causation is None else _untext(causation),
                _untext(need(h, _TIMESTAMP)),
                None if trace is None else _untext(trace),
                body,
                kind,
                h.get(_KEY),
                h.get(_SIGNATURE),
            )
        except UnicodeDecodeError as exc:
            raise EnvelopeError("a header holds invalid percent-encoded text.") from exc


_new = object.__new__
_SETTERS = tuple(Envelope.__dict__[f.name].__set__ for f in fields(Envelope))
