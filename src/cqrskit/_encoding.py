"""How the write side turns an event into a log row's type name, schema version and JSON.

The default needs no registration (type name = class name); pass
``encoder=JsonSerializer(event_types).encode`` from :mod:`cqrskit.serialization` for stable
registered names, schema versions and limits.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from keyword import iskeyword
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


def _field_names(cls: type) -> tuple[str, ...] | None:
    """The fields a dataclass or msgspec Struct encodes, or None for other classes."""
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls))
    fields = getattr(cls, "__struct_fields__", None)
    if fields is not None and not hasattr(cls, "model_dump"):
        return tuple(fields)
    return None


def _fields(event: Event) -> Any:
    dump = getattr(event, "model_dump", None)
    if dump is not None:
        return dump(mode="json")
    names = _field_names(type(event))
    if names is not None:
        return {name: getattr(event, name) for name in names}
    return dict(vars(event))


_new_tuple = tuple.__new__
_PLANS: dict[type, Callable[[Any], EncodedEvent]] = {}
_SCALARS: dict[str, Any] = {
    "_str": str,
    "_int": int,
    "_float": float,
    "_esc": json.encoder.encode_basestring,  # what _c_encode calls for a str
    "_int_text": int.__repr__,  # ... for an int
    "_float_text": float.__repr__,  # ... for a finite float
}


def _scalar_text(i: int, payload: str) -> list[str]:
    """Source lines setting ``t<i>`` to the JSON text of field value ``v<i>`` when it is
    an exact str, int, finite float, bool or None — what the C encoder writes for it —
    and otherwise encoding the ``payload`` dict (source text) with the C encoder."""
    return [
        f"    c = v{i}.__class__",
        f"    if c is _str: t{i} = _esc(v{i})",
        f"    elif c is _int: t{i} = _int_text(v{i})",
        f"    elif v{i} is None: t{i} = 'null'",
        f"    elif v{i} is True: t{i} = 'true'",
        f"    elif v{i} is False: t{i} = 'false'",
        f"    elif c is _float and v{i} - v{i} == 0.0: t{i} = _float_text(v{i})",
        f"    else: return _new(_cls, (_name, _version, _encode({payload})))",
    ]


def _plan_for(cls: type) -> Callable[[Any], EncodedEvent]:
    """Compile, once per class, a function that encodes one of its events: the type name
    and schema version are constants and, for a dataclass or msgspec Struct, the payload
    dict is one literal of attribute reads (no getattr loop, no AttributeError per miss).

    Fast path — every field value an exact str, int, float, bool or None (checked per
    event): the JSON text is put together from the values' own texts, made by the same
    functions the C encoder calls, around field names encoded once. Building the dict
    and running the C encoder over it cost ~2x more. Any other value takes the encoder.
    """
    name = getattr(cls, "__event_type__", cls.__name__)
    version = getattr(cls, "__schema_version__", 1)
    names = _field_names(cls)
    env: dict[str, Any] = {
        "_new": _new_tuple,
        "_cls": EncodedEvent,
        "_encode": _encode,
        "_fields": _fields,
        "_name": name,
        "_version": version,
        **_SCALARS,
    }
    if names is not None and all(n.isidentifier() and not iskeyword(n) for n in names):
        lines = ["def plan(e):"]
        lines += [f"    v{i} = e.{n}" for i, n in enumerate(names)]
        payload = "{" + ", ".join(f"{n!r}: v{i}" for i, n in enumerate(names)) + "}"
        parts: list[str] = []
        for i, n in enumerate(names):
            lines += _scalar_text(i, payload)
            env[f"_k{i}"] = ("{" if i == 0 else ",") + _encode(n) + ":"
            parts += [f"{{_k{i}}}", f"{{t{i}}}"]
        text = "f'" + "".join(parts) + "{_end}'" if names else "'{}'"
        env["_end"] = "}"
        lines.append(f"    return _new(_cls, (_name, _version, {text}))")
        source = "\n".join(lines) + "\n"
    else:
        source = "def plan(e):\n    return _new(_cls, (_name, _version, _encode(_fields(e))))\n"
    exec(source, env)  # field names are checked identifiers, not keywords
    plan: Callable[[Any], EncodedEvent] = env["plan"]
    _PLANS[cls] = plan
    return plan


def encode_event(event: Event) -> EncodedEvent:
    """Encode ``event`` (dataclass, pydantic model or msgspec Struct) as JSON.

    The type name is the class's ``__event_type__`` if set, else its ``__name__``; the schema
    version is ``__schema_version__`` if set, else 1.

    Raises:
        SerializationError: the payload is not JSON-serializable.
    """
    cls = type(event)
    try:
        return (_PLANS.get(cls) or _plan_for(cls))(event)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SerializationError(
            f"cannot encode event {cls.__name__} as JSON: {exc}.", message_type=cls
        ) from exc
