"""Per-type encode/decode functions, built once from type hints."""

from __future__ import annotations

import base64
import dataclasses
import enum
import keyword
import math
import sys
import types
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from cqrskit._redact import key_label, scrub_msgspec, unknown_fields
from cqrskit.errors import ConfigurationError, describe


class _Invalid(Exception):
    """A value does not match its declared type; ``path`` is filled in while unwinding."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []


_Enc = Callable[[Any], Any]
_Dec = Callable[[Any], Any]


def _json_kind(value: object) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    kind = kinds.get(type(value))
    if kind is not None:
        return kind
    return "number" if isinstance(value, int | float) else type(value).__name__


def _shorten(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


_key_label = key_label
"""A dict key as shown in an error path: shortened, never a whole attacker's string."""


def _module_class(module: str, name: str) -> type | None:
    # Only classes from libraries the application already imported can appear in its
    # annotations, so this never imports anything.
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def _is_pydantic(tp: type) -> bool:
    base = _module_class("pydantic", "BaseModel")
    return base is not None and issubclass(tp, base)


def _is_msgspec(tp: type) -> bool:
    base = _module_class("msgspec", "Struct")
    return base is not None and issubclass(tp, base)


class _Planner:
    """Builds encode/decode functions from type hints; caches one plan per type."""

    def __init__(self) -> None:
        self._plans: dict[tuple[object, bool], tuple[_Enc, _Dec]] = {}

    def plan(self, tp: Any, ignore_unknown: bool, where: str) -> tuple[_Enc, _Dec]:
        key = (tp, ignore_unknown)
        try:
            cached = self._plans.get(key)
        except TypeError:  # unhashable annotation metadata: plan it without caching
            return self._value_plan(tp, ignore_unknown, where)
        if cached is not None:
            return cached
        if isinstance(tp, type) and (
            dataclasses.is_dataclass(tp) or _is_pydantic(tp) or _is_msgspec(tp)
        ):
            # Classes may refer to themselves: register trampolines before planning fields.
            # If planning fails, plans made meanwhile may hold the dead trampoline: roll back.
            snapshot = dict(self._plans)
            slot: list[tuple[_Enc, _Dec]] = []
            self._plans[key] = (lambda v: slot[0][0](v), lambda v: slot[0][1](v))
            try:
                built = self._class_plan(tp, ignore_unknown)
            except BaseException:
                self._plans = snapshot
                raise
            slot.append(built)
            self._plans[key] = built
            return built
        built = self._value_plan(tp, ignore_unknown, where)
        self._plans[key] = built
        return built

    def _class_plan(self, cls: type, ignore_unknown: bool) -> tuple[_Enc, _Dec]:
        if _is_pydantic(cls):
            return _pydantic_plan(cls, ignore_unknown)
        if _is_msgspec(cls):
            return _msgspec_plan(cls, ignore_unknown)
        return self._dataclass_plan(cls, ignore_unknown)

    def _dataclass_plan(self, cls: type, ignore_unknown: bool) -> tuple[_Enc, _Dec]:
        try:
            hints = typing.get_type_hints(cls)
        except (NameError, TypeError, AttributeError) as exc:
            raise ConfigurationError(
                f"cannot read the field annotations of {describe(cls)}: {exc}.",
                message_type=cls,
                hint="define nested types at module level, before the class that uses them",
            ) from exc
        fields: list[tuple[str, _Enc, _Dec, bool]] = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue  # derived in __post_init__; not part of the payload
            enc, dec = self.plan(hints[f.name], ignore_unknown, f"{describe(cls)}.{f.name}")
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            fields.append((f.name, enc, dec, required))
        names = frozenset(name for name, _, _, _ in fields)
        enc_fields = [(name, enc) for name, enc, _, _ in fields]
        dec_fields = [(name, dec, required) for name, _, dec, required in fields]

        def encode(value: Any) -> Any:
            if type(value) is not cls:
                raise _Invalid(f"expected {describe(cls)}, got {type(value).__name__}")
            out = {}
            for name, enc in enc_fields:
                try:
                    out[name] = enc(getattr(value, name))
                except _Invalid as exc:
                    exc.path.append(name)
                    raise
            return out

        def decode(obj: Any) -> Any:
            if type(obj) is not dict:
                raise _Invalid(f"expected an object, got {_json_kind(obj)}")
            kwargs = {}
            for name, dec, required in dec_fields:
                if name in obj:
                    try:
                        kwargs[name] = dec(obj[name])
                    except _Invalid as exc:
                        exc.path.append(name)
                        raise
                elif required:
                    err = _Invalid("required field is missing")
                    err.path.append(name)
                    raise err
            if not ignore_unknown and len(kwargs) != len(obj):
                extra = sorted(k for k in obj if k not in names)
                if extra:
                    raise _Invalid(unknown_fields(extra))
            return _construct(cls, kwargs)

        if not all(name.isidentifier() and not keyword.iskeyword(name) for name in names):
            return encode, decode
        return _compile_fast_paths(cls, fields, ignore_unknown, encode, decode)

    def _value_plan(self, tp: Any, ignore_unknown: bool, where: str) -> tuple[_Enc, _Dec]:
        if tp is Any or tp is object:
            return _identity, _identity
        supertype = getattr(tp, "__supertype__", None)  # typing.NewType
        if supertype is not None:
            return self.plan(supertype, ignore_unknown, where)
        alias_value = getattr(tp, "__value__", None)  # `type X = ...` aliases (3.12+)
        if alias_value is not None and not isinstance(tp, type):
            return self.plan(alias_value, ignore_unknown, where)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            return self.plan(args[0], ignore_unknown, where)
        if origin is Literal:
            return _literal_plan(args, where)
        if origin is typing.Union or origin is types.UnionType:
            return self._union_plan(args, ignore_unknown, where)
        if origin in (list, Sequence):
            item = args[0] if args else Any
            return _list_plan(self.plan(item, ignore_unknown, where), list)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return _list_plan(self.plan(args[0], ignore_unknown, where), tuple)
            if args == ((),):
                args = ()
            return _fixed_tuple_plan([self.plan(a, ignore_unknown, where) for a in args])
        if origin in (dict, Mapping):
            if args and args[0] is not str:
                raise _unsupported(tp, where, "dict keys must be str")
            return _dict_plan(self.plan(args[1] if args else Any, ignore_unknown, where))
        if tp in (list, tuple):
            return _list_plan((_identity, _identity), tp)
        if tp is dict:
            return _dict_plan((_identity, _identity))
        if tp is type(None) or tp is None:
            return _none_plan()
        if isinstance(tp, type):
            simple = _SIMPLE_PLANS.get(tp)
            if simple is not None:
                return simple
            if issubclass(tp, enum.Enum):
                return _enum_plan(tp, where)
        raise _unsupported(tp, where)

    def _union_plan(self, args: tuple[Any, ...], ignore: bool, where: str) -> tuple[_Enc, _Dec]:
        members = [a for a in args if a is not type(None)]
        nullable = len(members) != len(args)
        if len(members) == 1:
            inner_enc, inner_dec = self.plan(members[0], ignore, where)
        elif all(m in (str, int, float, bool) for m in members):
            inner_enc, inner_dec = _primitive_union_plan(frozenset(members))
        else:
            raise _unsupported(
                " | ".join(getattr(a, "__name__", repr(a)) for a in args),
                where,
                "a union may combine only None and str/int/float/bool; "
                "use one field per alternative or a pydantic discriminated union",
            )
        if not nullable:
            return inner_enc, inner_dec

        def encode(value: Any) -> Any:
            return None if value is None else inner_enc(value)

        def decode(value: Any) -> Any:
            return None if value is None else inner_dec(value)

        return encode, decode


_INLINE_CHECKS: dict[object, str] = {}  # filled below, once the primitive plans exist


def _compile_fast_paths(
    cls: type,
    fields: list[tuple[str, _Enc, _Dec, bool]],
    ignore_unknown: bool,
    slow_encode: _Enc,
    slow_decode: _Dec,
) -> tuple[_Enc, _Dec]:
    """Generate straight-line encode/decode functions for one dataclass.

    The loops in the slow functions cost about half the time of a whole encode or decode;
    generated code does the same work without them (as ``dataclasses`` itself does). Any
    failure on the fast path re-runs the slow function, which raises the precise error with
    the field path; so the fast path only has to be right for valid input.
    """
    namespace: dict[str, Any] = {
        "_cls": cls,
        "_Invalid": _Invalid,
        "_slow_encode": slow_encode,
        "_slow_decode": slow_decode,
    }
    enc_items = []
    dec_items = []
    for i, (name, enc, dec, _) in enumerate(fields):
        namespace[f"_e{i}"] = enc
        namespace[f"_d{i}"] = dec
        key = repr(name)
        checked = _INLINE_CHECKS.get(enc)
        if enc is _identity:
            enc_items.append(f"{key}: value.{name}")
        elif checked is not None:
            enc_items.append(f"{key}: (_v if type(_v := value.{name}) is {checked} else _e{i}(_v))")
        else:
            enc_items.append(f"{key}: _e{i}(value.{name})")
        checked = _INLINE_CHECKS.get(dec)
        if dec is _identity:
            dec_items.append(f"{name}=obj[{key}]")
        elif checked is not None:
            dec_items.append(f"{name}=(_v if type(_v := obj[{key}]) is {checked} else _d{i}(_v))")
        else:
            dec_items.append(f"{name}=_d{i}(obj[{key}])")
    shape = (
        "type(obj) is dict"
        if ignore_unknown
        else f"type(obj) is dict and len(obj) == {len(fields)}"
    )
    source = f"""
def encode(value):
    if type(value) is _cls:
        try:
            return {{{", ".join(enc_items)}}}
        except _Invalid:
            pass
    return _slow_encode(value)

def decode(obj):
    if {shape}:
        try:
            return _cls({", ".join(dec_items)})
        except Exception:
            pass
    return _slow_decode(obj)
"""
    exec(compile(source, f"<cqrskit serialization plan for {describe(cls)}>", "exec"), namespace)
    return namespace["encode"], namespace["decode"]


def _unsupported(tp: object, where: str, why: str | None = None) -> ConfigurationError:
    return ConfigurationError(
        f"{where}: type {tp!r} cannot be serialized" + (f" ({why})." if why else "."),
        hint="use str, int, float, bool, None, datetime, date, time, UUID, Decimal, bytes, an "
        "Enum, Literal, list/tuple, dict[str, ...], a dataclass, a pydantic model or a msgspec "
        "Struct",
    )


def _construct(cls: type, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except Exception as exc:  # user __post_init__ may raise anything
        raise _Invalid(f"{describe(cls)} rejected the data: {type(exc).__name__}: {exc}") from exc


def _identity(value: Any) -> Any:
    return value


def _none_plan() -> tuple[_Enc, _Dec]:
    def check(value: Any) -> Any:
        if value is not None:
            raise _Invalid(f"expected null, got {_json_kind(value)}")
        return None

    return check, check


def _enc_str(value: Any) -> Any:
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    raise _Invalid(f"expected str, got {type(value).__name__}")


def _dec_str(value: Any) -> Any:
    if type(value) is not str:
        raise _Invalid(f"expected a string, got {_json_kind(value)}")
    return value


def _enc_int(value: Any) -> Any:
    if type(value) is int:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    raise _Invalid(f"expected int, got {type(value).__name__}")


def _dec_int(value: Any) -> Any:
    if type(value) is not int:
        raise _Invalid(f"expected an integer, got {_json_kind(value)}")
    return value


def _enc_float(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
        if math.isfinite(result):
            return result
        raise _Invalid(f"{result!r} is not allowed; JSON has no NaN or Infinity")
    raise _Invalid(f"expected float, got {type(value).__name__}")


def _dec_float(value: Any) -> Any:
    kind = type(value)
    if kind is float:
        return value
    if kind is int:
        return float(value)
    raise _Invalid(f"expected a number, got {_json_kind(value)}")


def _enc_bool(value: Any) -> Any:
    if type(value) is not bool:
        raise _Invalid(f"expected bool, got {type(value).__name__}")
    return value


def _dec_bool(value: Any) -> Any:
    if type(value) is not bool:
        raise _Invalid(f"expected a boolean, got {_json_kind(value)}")
    return value


def _iso_plan(kind: type[date] | type[time]) -> tuple[_Enc, _Dec]:
    name = kind.__name__

    def encode(value: Any) -> Any:
        # datetime is a date subclass: a date field must not silently carry a time.
        if type(value) is not kind and not (isinstance(value, kind) and kind is not date):
            raise _Invalid(f"expected {name}, got {type(value).__name__}")
        return value.isoformat()

    def decode(value: Any) -> Any:
        if type(value) is not str:
            raise _Invalid(f"expected an ISO {name} string, got {_json_kind(value)}")
        try:
            return kind.fromisoformat(value)
        except ValueError:
            raise _Invalid(f"not an ISO 8601 {name}") from None

    return encode, decode


def _enc_uuid(value: Any) -> Any:
    if not isinstance(value, uuid.UUID):
        raise _Invalid(f"expected UUID, got {type(value).__name__}")
    return str(value)


def _dec_uuid(value: Any) -> Any:
    if type(value) is not str:
        raise _Invalid(f"expected a UUID string, got {_json_kind(value)}")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise _Invalid("not a UUID") from None


def _enc_decimal(value: Any) -> Any:
    if not isinstance(value, Decimal):
        raise _Invalid(f"expected Decimal, got {type(value).__name__}")
    if not value.is_finite():
        raise _Invalid(f"Decimal {value} is not allowed; only finite decimals are")
    return str(value)


def _dec_decimal(value: Any) -> Any:
    # A string keeps every digit; an integer is exact too. Floats are refused: they have
    # already lost digits by the time they reach us.
    if type(value) is int:
        return Decimal(value)
    if type(value) is not str:
        raise _Invalid(f"expected a decimal string, got {_json_kind(value)}")
    try:
        result = Decimal(value)
    except InvalidOperation:
        raise _Invalid("not a decimal number") from None
    if not result.is_finite():
        raise _Invalid("only finite decimals are allowed")
    return result


def _enc_bytes(value: Any) -> Any:
    if not isinstance(value, bytes):
        raise _Invalid(f"expected bytes, got {type(value).__name__}")
    return base64.b64encode(value).decode("ascii")


def _dec_bytes(value: Any) -> Any:
    if type(value) is not str:
        raise _Invalid(f"expected a base64 string, got {_json_kind(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise _Invalid("not valid base64") from None


_SIMPLE_PLANS: dict[type, tuple[_Enc, _Dec]] = {
    str: (_enc_str, _dec_str),
    int: (_enc_int, _dec_int),
    float: (_enc_float, _dec_float),
    bool: (_enc_bool, _dec_bool),
    datetime: _iso_plan(datetime),
    date: _iso_plan(date),
    time: _iso_plan(time),
    uuid.UUID: (_enc_uuid, _dec_uuid),
    Decimal: (_enc_decimal, _dec_decimal),
    bytes: (_enc_bytes, _dec_bytes),
}


_INLINE_CHECKS.update(
    {
        _enc_str: "str",
        _dec_str: "str",
        _enc_int: "int",
        _dec_int: "int",
        _enc_bool: "bool",
        _dec_bool: "bool",
    }
)


def _enum_plan(cls: type[enum.Enum], where: str) -> tuple[_Enc, _Dec]:
    for member in cls:
        if type(member.value) not in (str, int):
            raise _unsupported(cls, where, f"member {member.name} has a non-str/int value")

    def encode(value: Any) -> Any:
        if not isinstance(value, cls):
            raise _Invalid(f"expected {cls.__name__}, got {type(value).__name__}")
        return value.value

    def decode(value: Any) -> Any:
        if type(value) not in (str, int):
            raise _Invalid(f"expected a {cls.__name__} value, got {_json_kind(value)}")
        try:
            return cls(value)
        except ValueError:
            raise _Invalid(f"{value!r} is not a {cls.__name__} value") from None

    return encode, decode


def _literal_plan(values: tuple[Any, ...], where: str) -> tuple[_Enc, _Dec]:
    for v in values:
        if type(v) not in (str, int, bool, type(None)):
            raise _unsupported(Literal[values], where, "Literal values must be str/int/bool/None")
    # (type, value) pairs keep True distinct from 1.
    allowed = frozenset((type(v), v) for v in values)
    shown = ", ".join(map(repr, values))

    def check(value: Any) -> Any:
        try:
            ok = (type(value), value) in allowed
        except TypeError:  # unhashable
            ok = False
        if not ok:
            raise _Invalid(f"expected one of {shown}")
        return value

    return check, check


def _primitive_union_plan(members: frozenset[type]) -> tuple[_Enc, _Dec]:
    names = " | ".join(sorted(m.__name__ for m in members))

    def encode(value: Any) -> Any:
        kind = type(value)
        if kind in members:
            return value if kind is not float else _enc_float(value)
        if kind is int and float in members:
            return float(value)
        raise _Invalid(f"expected {names}, got {kind.__name__}")

    def decode(value: Any) -> Any:
        kind = type(value)
        if kind in members:
            return value
        if kind is int and float in members:
            return float(value)
        raise _Invalid(f"expected {names}, got {_json_kind(value)}")

    return encode, decode


def _locate(fn: Callable[[Any], Any], values: Any) -> _Invalid:
    """Re-run ``fn`` item by item to find which one failed (only on the error path)."""
    for i, v in enumerate(values):
        try:
            fn(v)
        except _Invalid as exc:
            exc.path.append(f"[{i}]")
            return exc
    return _Invalid("an item failed to convert")


def _list_plan(item: tuple[_Enc, _Dec], container: type) -> tuple[_Enc, _Dec]:
    item_enc, item_dec = item
    is_tuple = container is tuple
    passthrough = item_dec is _identity

    def encode(value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise _Invalid(f"expected {container.__name__}, got {type(value).__name__}")
        try:
            return [item_enc(v) for v in value]
        except _Invalid:
            raise _locate(item_enc, value) from None

    def decode(value: Any) -> Any:
        if type(value) is not list:
            raise _Invalid(f"expected an array, got {_json_kind(value)}")
        if passthrough:
            return tuple(value) if is_tuple else value
        try:
            out = [item_dec(v) for v in value]
        except _Invalid:
            raise _locate(item_dec, value) from None
        return tuple(out) if is_tuple else out

    return encode, decode


def _fixed_tuple_plan(items: list[tuple[_Enc, _Dec]]) -> tuple[_Enc, _Dec]:
    size = len(items)

    def encode(value: Any) -> Any:
        if not isinstance(value, tuple | list) or len(value) != size:
            raise _Invalid(f"expected a tuple of {size} items")
        out = []
        for i, ((enc, _), v) in enumerate(zip(items, value, strict=True)):
            try:
                out.append(enc(v))
            except _Invalid as exc:
                exc.path.append(f"[{i}]")
                raise
        return out

    def decode(value: Any) -> Any:
        if type(value) is not list or len(value) != size:
            raise _Invalid(f"expected an array of {size} items, got {_json_kind(value)}")
        out = []
        for i, ((_, dec), v) in enumerate(zip(items, value, strict=True)):
            try:
                out.append(dec(v))
            except _Invalid as exc:
                exc.path.append(f"[{i}]")
                raise
        return tuple(out)

    return encode, decode


def _dict_plan(item: tuple[_Enc, _Dec]) -> tuple[_Enc, _Dec]:
    item_enc, item_dec = item

    def encode(value: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _Invalid(f"expected a mapping, got {type(value).__name__}")
        out = {}
        # Sorted so that equal dicts give equal text whatever their insertion order.
        for k in sorted(value, key=lambda k: (type(k) is not str, str(k))):
            if type(k) is not str:
                raise _Invalid(f"dict keys must be str, got {type(k).__name__}")
            try:
                out[k] = item_enc(value[k])
            except _Invalid as exc:
                exc.path.append(_key_label(k))
                raise
        return out

    def decode(value: Any) -> Any:
        if type(value) is not dict:
            raise _Invalid(f"expected an object, got {_json_kind(value)}")
        out = {}
        for k, v in value.items():
            try:
                out[k] = item_dec(v)
            except _Invalid as exc:
                exc.path.append(_key_label(k))
                raise
        return out

    return encode, decode


def _pydantic_plan(cls: type, ignore_unknown: bool) -> tuple[_Enc, _Dec]:
    model: Any = cls
    explicit_extra = "extra" in model.model_config
    known = set(model.model_fields)
    known.update(f.alias for f in model.model_fields.values() if f.alias)
    check_unknown = not ignore_unknown and not explicit_extra

    def encode(value: Any) -> Any:
        if type(value) is not cls:
            raise _Invalid(f"expected {describe(cls)}, got {type(value).__name__}")
        dumped: Any = value.model_dump(mode="json")  # type: ignore[attr-defined]
        return dumped

    def decode(obj: Any) -> Any:
        if type(obj) is not dict:
            raise _Invalid(f"expected an object, got {_json_kind(obj)}")
        if check_unknown:
            extra = sorted(k for k in obj if k not in known)
            if extra:
                raise _Invalid(unknown_fields(extra))
        try:
            return model.model_validate(obj)
        except ValueError as exc:
            errors = getattr(exc, "errors", None)
            if errors is None:
                raise _Invalid(f"{describe(cls)} rejected the data: {exc}") from exc
            # Without the input values: payloads may hold secrets.
            listed = "; ".join(
                f"{'.'.join(map(key_label, e['loc'])) or '<root>'}: {e['msg']}"
                for e in errors(include_input=False, include_url=False)
            )
            raise _Invalid(f"{describe(cls)} rejected the data: {listed}") from exc

    return encode, decode


def _msgspec_plan(cls: type, ignore_unknown: bool) -> tuple[_Enc, _Dec]:
    import msgspec  # already imported: cls is a msgspec Struct

    known = frozenset(cls.__struct_encode_fields__)  # type: ignore[attr-defined]
    check_unknown = not ignore_unknown

    def encode(value: Any) -> Any:
        if type(value) is not cls:
            raise _Invalid(f"expected {describe(cls)}, got {type(value).__name__}")
        return msgspec.to_builtins(value)

    def decode(obj: Any) -> Any:
        if type(obj) is not dict:
            raise _Invalid(f"expected an object, got {_json_kind(obj)}")
        if check_unknown:
            extra = sorted(k for k in obj if k not in known)
            if extra:
                raise _Invalid(unknown_fields(extra))
        try:
            return msgspec.convert(obj, cls)
        except msgspec.ValidationError as exc:
            reason, where = scrub_msgspec(str(exc))  # never the rejected value itself
            at = f" - at `${where}`" if where else ""
            raise _Invalid(f"{describe(cls)} rejected the data: {reason}{at}") from exc

    return encode, decode
