"""Validation behavior: reject an invalid message before its handler runs, listing every
failing field.

Three sources of checks, combined per message type:

* **pydantic models** — re-validated field by field (a model built with ``model_construct``
  or mutated without ``validate_assignment`` is caught);
* **msgspec structs** — msgspec validates only when decoding, so the behavior converts each
  field against its annotation (constraints from ``msgspec.Meta`` included), recursing into
  nested structs and lists so that every failing leaf is reported;
* **plain callables** registered per message type: ``validator(message)`` returns the
  failing fields (an iterable of :class:`~cqrskit.errors.FieldError`, possibly empty, or
  ``None``) or raises :class:`~cqrskit.errors.ValidationError`.

Model checks run first; the callables run only when the model is well-formed (they may rely
on field types). Field paths are stable: ``items[0].qty``. pydantic and msgspec are imported
only when a message type is one of their models, and what to check is decided once per
message type; a type with nothing to check costs one dictionary lookup per dispatch.
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from cqrskit._redact import key_label, scrub_msgspec
from cqrskit.errors import FieldError, ValidationError
from cqrskit.pipeline._core import Next
from cqrskit.pipeline._support import SyncNext, failed, returns_awaitable

__all__ = ["SyncValidationBehavior", "ValidationBehavior", "Validator", "field_path"]

Validator = Callable[[Any], "Iterable[FieldError] | None"]
"""``validator(message)``: the failing fields (or ``None``), or raise ValidationError."""

_Check = Callable[[Any], list[FieldError]]
_MAX_DEPTH = 64  # nesting beyond this is not walked (guards against cyclic containers)


def field_path(loc: Iterable[str | int]) -> str:
    """Render a location as a stable path: ``("items", 0, "qty")`` → ``"items[0].qty"``.

    A name longer than 40 characters (a key sent by a caller) is cut to 40 and ``...``.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out:
            out += f".{key_label(part)}"
        else:
            out = key_label(part)
    return out


# -- pydantic ------------------------------------------------------------------------------


def _input_keys(model: Any) -> dict[str, str]:
    """Field name -> the key the model's validator expects (its alias, if any)."""
    keys: dict[str, str] = {}
    for name, info in model.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else info.alias
        keys[name] = alias or name
    return keys


def _pydantic_check(message_type: type) -> _Check | None:
    pydantic = sys.modules.get("pydantic")
    if pydantic is None or not issubclass(message_type, pydantic.BaseModel):
        return None
    base_model = pydantic.BaseModel
    keys_cache: dict[type, dict[str, str]] = {}

    def as_input(value: Any, depth: int) -> Any:
        # nested model instances pass pydantic unchecked: turn them back into input data
        if depth > _MAX_DEPTH:
            return value
        if isinstance(value, base_model):
            cls = type(value)
            keys = keys_cache.get(cls)
            if keys is None:
                keys = keys_cache[cls] = _input_keys(cls)
            data = {keys.get(k, k): as_input(v, depth + 1) for k, v in value.__dict__.items()}
            extra = getattr(value, "__pydantic_extra__", None)
            if extra:
                data.update(extra)
            return data
        if isinstance(value, list | tuple):
            items = [as_input(v, depth + 1) for v in value]
            return items if isinstance(value, list) else tuple(items)
        if isinstance(value, dict):
            return {k: as_input(v, depth + 1) for k, v in value.items()}
        return value

    model: Any = message_type
    by_alias = {key: name for name, key in _input_keys(model).items()}
    model_validate = model.model_validate
    error_type = pydantic.ValidationError

    def check(message: Any) -> list[FieldError]:
        try:
            model_validate(as_input(message, 0))
        except error_type as exc:
            out: list[FieldError] = []
            for err in exc.errors(include_url=False, include_input=False):
                loc = list(err["loc"])
                if loc and isinstance(loc[0], str):
                    loc[0] = by_alias.get(loc[0], loc[0])
                out.append(FieldError(field_path(loc) or "__root__", err["msg"]))
            return out
        return []

    return check


# -- msgspec -------------------------------------------------------------------------------


def _msgspec_check(message_type: type) -> _Check | None:
    msgspec = sys.modules.get("msgspec")
    if msgspec is None or not issubclass(message_type, msgspec.Struct):
        return None
    struct_type = msgspec.Struct
    to_builtins = msgspec.to_builtins
    convert = msgspec.convert
    error_type = msgspec.ValidationError
    fields_of = msgspec.structs.fields

    def leaf(value: Any, tp: Any, path: str, out: list[FieldError]) -> None:
        try:
            convert(to_builtins(value), tp)
        except error_type as exc:
            text, suffix = scrub_msgspec(str(exc))  # the rejected value is never echoed
            if suffix and not suffix.startswith("["):
                suffix = "." + suffix.lstrip(".")
            out.append(FieldError(path + suffix, text))
        except (TypeError, ValueError):  # to_builtins refuses values it cannot encode
            out.append(FieldError(path, f"unsupported value of type {type(value).__name__}"))
        except RecursionError:  # a container that holds itself
            out.append(FieldError(path, "nested too deeply to validate"))

    def walk(value: Any, tp: Any, path: str, out: list[FieldError], depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            out.append(FieldError(path, "nested too deeply to validate"))
            return
        if isinstance(value, struct_type):
            expected = [t for t in (typing.get_args(tp) or (tp,)) if isinstance(t, type)] or [
                type(value)
            ]
            if any(isinstance(value, t) for t in expected):
                for f in fields_of(type(value)):
                    walk(getattr(value, f.name), f.type, f"{path}.{f.name}", out, depth + 1)
                return
        elif isinstance(value, list | tuple) and typing.get_origin(tp) in (list, Sequence):
            args = typing.get_args(tp)
            if len(args) == 1:
                for i, item in enumerate(value):
                    walk(item, args[0], f"{path}[{i}]", out, depth + 1)
                return
        leaf(value, tp, path, out)

    fields = fields_of(message_type)

    def check(message: Any) -> list[FieldError]:
        out: list[FieldError] = []
        for f in fields:
            walk(getattr(message, f.name), f.type, f.name, out)
        return out

    return check


# -- the behavior --------------------------------------------------------------------------


def _run_validator(validator: Validator, message: Any) -> list[FieldError]:
    try:
        found = validator(message)
    except ValidationError as exc:
        return list(exc.errors)
    return list(found) if found is not None else []


class _ValidationConfig:
    __slots__ = ("_validators", "_models", "_plans")

    def __init__(
        self,
        validators: Mapping[type, Validator | Sequence[Validator]] | None = None,
        *,
        models: bool = True,
    ) -> None:
        self._validators: dict[type, tuple[Validator, ...]] = {}
        for tp, found in (validators or {}).items():
            items = tuple(found) if isinstance(found, Sequence) else (found,)
            for v in items:
                if not callable(v):
                    raise TypeError(f"validator for {tp.__qualname__} is not callable: {v!r}")
            self._validators[tp] = items
        self._models = models
        self._plans: dict[type, Callable[[Any], list[FieldError]] | None] = {}

    def _plan_for(self, message_type: type) -> Callable[[Any], list[FieldError]] | None:
        model: _Check | None = None
        if self._models:
            model = _pydantic_check(message_type) or _msgspec_check(message_type)
        own: list[Validator] = []
        for cls in reversed(message_type.__mro__):
            own.extend(self._validators.get(cls, ()))
        validators = tuple(own)
        plan: Callable[[Any], list[FieldError]] | None
        if model is None and not validators:
            plan = None
        elif not validators:
            plan = model
        else:

            def plan(message: Any) -> list[FieldError]:
                if model is not None:
                    errors = model(message)
                    if errors:
                        return errors
                errors = []
                for v in validators:
                    errors.extend(_run_validator(v, message))
                return errors

        self._plans[message_type] = plan
        return plan

    def _errors(self, message: Any) -> ValidationError | None:
        cls = message.__class__
        try:
            plan = self._plans[cls]
        except KeyError:
            plan = self._plan_for(cls)
        if plan is None:
            return None
        errors = plan(message)
        if not errors:
            return None
        return ValidationError(errors, message_type=cls)

    def check(self, message: Any) -> None:
        """Raise :class:`~cqrskit.errors.ValidationError` listing every failing field of
        ``message``; return ``None`` when it is valid."""
        error = self._errors(message)
        if error is not None:
            raise error


class ValidationBehavior(_ValidationConfig):
    """Validate each message before its handler runs; raise ``ValidationError`` if invalid.

    Args:
        validators: callables per message type (a validator registered for a base class
            also checks its subclasses); each returns the failing fields or raises
            :class:`~cqrskit.errors.ValidationError`.
        models: also validate pydantic models and msgspec structs (default ``True``).

    The error lists every failing field, never echoes field values, and is never retried
    by :class:`~cqrskit.pipeline.RetryBehavior`.
    """

    __slots__ = ()

    @returns_awaitable
    def __call__(self, message: Any, next: Next) -> Awaitable[Any]:
        """Validate ``message``, then continue with ``next(message)``."""
        try:
            plan = self._plans[message.__class__]
        except KeyError:
            plan = self._plan_for(message.__class__)
        if plan is None:
            return next(message)
        errors = plan(message)
        if errors:
            return failed(ValidationError(errors, message_type=message.__class__))
        return next(message)


class SyncValidationBehavior(_ValidationConfig):
    """The sync mediator's twin of :class:`ValidationBehavior` (same arguments)."""

    __slots__ = ()

    def __call__(self, message: Any, next: SyncNext) -> Any:
        """Validate ``message``, then continue with ``next(message)``."""
        try:
            plan = self._plans[message.__class__]
        except KeyError:
            plan = self._plan_for(message.__class__)
        if plan is not None:
            errors = plan(message)
            if errors:
                raise ValidationError(errors, message_type=message.__class__)
        return next(message)
