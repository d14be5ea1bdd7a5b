"""The registry of event classes by stable name, with versions and upcasters."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from cqrskit.errors import ConfigurationError, SerializationError, describe
from cqrskit.messages import Event
from cqrskit.serialization._plan import (
    _Dec,
    _Enc,
    _is_msgspec,
    _is_pydantic,
    _Planner,
    _shorten,
)

E = TypeVar("E", bound=Event)
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns the JSON object of schema version ``n`` into the JSON object of version ``n + 1``."""

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}")


@dataclass(frozen=True, slots=True)
class _Entry:
    cls: type[Event]
    name: str
    version: int
    encode: _Enc
    decode: _Dec


class EventTypes:
    """Registry of event classes by stable name, with schema versions and upcasters.

    The stable name is what the event log stores in its ``type`` column; the Python class
    can be renamed or moved freely as long as it keeps its registered name. Register at
    startup (registration is not synchronized with concurrent decoding)::

        event_types = EventTypes()

        @event_types.register("account.opened", version=2)
        @dataclass(frozen=True, slots=True)
        class AccountOpened(Event):
            account_id: str
            owner: str
    """

    def __init__(self) -> None:
        self._by_name: dict[str, _Entry] = {}
        self._by_class: dict[type, _Entry] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._planner = _Planner()

    @overload
    def register(
        self,
        cls: type[E],
        /,
        name: str | None = None,
        *,
        version: int = 1,
        ignore_unknown_fields: bool = False,
    ) -> type[E]: ...

    @overload
    def register(
        self,
        name: str | None = None,
        /,
        *,
        version: int = 1,
        ignore_unknown_fields: bool = False,
    ) -> Callable[[type[E]], type[E]]: ...

    def register(
        self,
        cls_or_name: Any = None,
        /,
        name: str | None = None,
        *,
        version: int = 1,
        ignore_unknown_fields: bool = False,
    ) -> Any:
        """Register an event class under a stable ``name`` at schema ``version``.

        Call it directly (``register(AccountOpened, "account.opened")``) or as a decorator
        (``@register("account.opened", version=2)`` or bare ``@register``). Without a name the
        class's ``module.qualname`` is used — deterministic, but it changes when the class is
        renamed or moved, which makes stored events unreadable: set the name explicitly.

        ``ignore_unknown_fields=True`` makes decoding drop payload fields the class does not
        declare (the default rejects them, naming the fields).

        Raises:
            ConfigurationError: the class is not an ``Event`` dataclass, pydantic model or
                msgspec Struct, a field type is unsupported, the name is malformed or taken,
                the class is already registered, or the version is below 1.
        """
        if isinstance(cls_or_name, type):
            return self._register(cls_or_name, name, version, ignore_unknown_fields)
        if cls_or_name is not None and name is not None:
            raise ConfigurationError("register() got the name twice.")
        chosen = cls_or_name if cls_or_name is not None else name

        def decorator(cls: type[E]) -> type[E]:
            return self._register(cls, chosen, version, ignore_unknown_fields)

        return decorator

    def _register(
        self, cls: type[E], name: str | None, version: int, ignore_unknown: bool
    ) -> type[E]:
        if not (isinstance(cls, type) and issubclass(cls, Event)):
            raise ConfigurationError(
                f"{describe(cls)} is not an event class.",
                hint="subclass cqrskit.Event (with a dataclass, pydantic model or msgspec Struct)",
            )
        if not (dataclasses.is_dataclass(cls) or _is_pydantic(cls) or _is_msgspec(cls)):
            raise ConfigurationError(
                f"{describe(cls)} is not a dataclass, pydantic model or msgspec Struct.",
                message_type=cls,
                hint="decorate it with @dataclass(frozen=True, slots=True)",
            )
        if name is None:
            name = f"{cls.__module__}.{cls.__qualname__}"
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigurationError(
                f"event type name {name!r} of {describe(cls)} is not valid.",
                message_type=cls,
                hint="use 1-200 characters from letters, digits and _ . : - (e.g. "
                "'account.opened'); pass it explicitly",
            )
        if type(version) is not int or version < 1:
            raise ConfigurationError(
                f"schema version {version!r} of {describe(cls)} must be an int >= 1.",
                message_type=cls,
            )
        taken = self._by_name.get(name)
        if taken is not None:
            raise ConfigurationError(
                f"event type name {name!r} is already registered for {describe(taken.cls)}; "
                f"cannot register {describe(cls)} under it.",
                message_type=cls,
                hint="every event class needs its own stable name",
            )
        existing = self._by_class.get(cls)
        if existing is not None:
            raise ConfigurationError(
                f"{describe(cls)} is already registered as {existing.name!r}; a class has one "
                "stable name.",
                message_type=cls,
            )
        encode, decode = self._planner.plan(cls, ignore_unknown, describe(cls))
        entry = _Entry(cls, name, version, encode, decode)
        self._by_name[name] = entry
        self._by_class[cls] = entry
        return cls

    def register_upcaster(self, name: str, from_version: int, fn: Upcaster) -> None:
        """Register ``fn`` to turn the JSON object of ``name`` at ``from_version`` into
        the object at ``from_version + 1``.

        Upcasters run in a chain at decode time, ``n -> n+1 -> ... -> current``, on the
        decoded JSON dict (before it becomes an object). ``fn`` may mutate and return its
        argument. Upcasters may be registered before or after the class.

        Raises:
            ConfigurationError: ``from_version`` is below 1 or already has an upcaster.
        """
        if type(from_version) is not int or from_version < 1:
            raise ConfigurationError(
                f"upcaster for {name!r}: from_version must be an int >= 1, got {from_version!r}."
            )
        if (name, from_version) in self._upcasters:
            raise ConfigurationError(
                f"an upcaster for {name!r} from version {from_version} is already registered."
            )
        self._upcasters[(name, from_version)] = fn

    def upcaster(self, name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator form of :meth:`register_upcaster`."""

        def decorator(fn: Upcaster) -> Upcaster:
            self.register_upcaster(name, from_version, fn)
            return fn

        return decorator

    def type_for(self, name: str) -> type[Event]:
        """The class registered under ``name``.

        Raises:
            SerializationError: nothing is registered under that name (nothing is imported).
        """
        return self._entry_by_name(name).cls

    def name_for(self, cls: type[Event]) -> str:
        """The stable name ``cls`` is registered under.

        Raises:
            SerializationError: the class is not registered (subclasses are not looked up).
        """
        return self._entry_by_class(cls).name

    def version_for(self, name: str) -> int:
        """The current schema version of the type registered under ``name``."""
        return self._entry_by_name(name).version

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._by_name)

    def check(self) -> None:
        """Check that every registered type can upcast from each of its older versions.

        Call it at startup when all old versions must stay readable.

        Raises:
            ConfigurationError: listing each type and the missing ``n -> n+1`` steps.
        """
        gaps = []
        for name, entry in sorted(self._by_name.items()):
            missing = [v for v in range(1, entry.version) if (name, v) not in self._upcasters]
            if missing:
                steps = ", ".join(f"{v}->{v + 1}" for v in missing)
                gaps.append(f"{name!r} (v{entry.version}) lacks upcasters {steps}")
        if gaps:
            raise ConfigurationError(
                "missing upcasters: " + "; ".join(gaps) + ".",
                hint="register_upcaster(name, from_version, fn) for each missing step",
            )

    def _entry_by_name(self, name: str) -> _Entry:
        entry = self._by_name.get(name) if type(name) is str else None
        if entry is None:
            raise SerializationError(
                f"unknown event type {_shorten(name)}: no class is registered under this name.",
                hint="register the class with EventTypes.register(cls, name); names are never "
                "imported",
            )
        return entry

    def _entry_by_class(self, cls: type) -> _Entry:
        entry = self._by_class.get(cls)
        if entry is None:
            raise SerializationError(
                f"event class {describe(cls)} is not registered for serialization.",
                message_type=cls,
                hint="register it with EventTypes.register(cls, 'stable.name')",
            )
        return entry

    def _upcast(self, entry: _Entry, from_version: int, obj: dict[str, Any]) -> dict[str, Any]:
        for v in range(from_version, entry.version):
            fn = self._upcasters.get((entry.name, v))
            if fn is None:
                raise SerializationError(
                    f"cannot decode event {entry.name!r} at schema version {from_version}: "
                    f"no upcaster from version {v} to {v + 1} (current is {entry.version}).",
                    message_type=entry.cls,
                    hint=f"register_upcaster({entry.name!r}, {v}, fn)",
                )
            try:
                obj = fn(obj)
            except Exception as exc:  # user code; surfaces as a data error
                raise SerializationError(
                    f"upcaster of {entry.name!r} from version {v} to {v + 1} failed: "
                    f"{type(exc).__name__}: {exc}",
                    message_type=entry.cls,
                ) from exc
            if type(obj) is not dict:
                raise SerializationError(
                    f"upcaster of {entry.name!r} from version {v} to {v + 1} returned "
                    f"{type(obj).__name__}, not a dict.",
                    message_type=entry.cls,
                )
        return obj
