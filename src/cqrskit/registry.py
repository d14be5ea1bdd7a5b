"""Handler registration, discovery and validation.

A :class:`Registry` maps each command and query type to exactly one handler and each event
type to any number of handlers. Handlers are ``async def`` or plain ``def`` functions, or
classes with a ``handle`` method; the message type is read from the first parameter's
annotation (or given explicitly), further parameters are dependencies resolved by type when
the mediator is built.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal, TypeVar, overload

from cqrskit.errors import RegistrationError, describe
from cqrskit.messages import Command, Event, Message, Query

__all__ = ["HandlerSpec", "Registry", "handler", "message_kind"]

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__cqrskit_handles__"

Kind = Literal["command", "query", "event"]


def message_kind(message_type: type) -> Kind | None:
    """Return ``"command"``, ``"query"`` or ``"event"`` for a message class, else ``None``."""
    if not isinstance(message_type, type):
        return None
    if issubclass(message_type, Command):
        return "command"
    if issubclass(message_type, Query):
        return "query"
    if issubclass(message_type, Event):
        return "event"
    return None


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A registered handler, introspected once at registration.

    Attributes:
        message_type: the message class it handles.
        owner: what was registered (the function, or the handler class).
        func: the callable to invoke: the function, or the class's ``handle`` function
            (unbound; the instance is its first argument).
        is_async: ``func`` is a coroutine function.
        is_generator: ``func`` is a (sync or async) generator function (streaming queries).
        params: ``(name, type)`` of each dependency parameter after the message.
        init_params: ``(name, type)`` of each ``__init__`` parameter of a handler class.
        return_type: the annotated return type, or ``inspect.Parameter.empty``.
    """

    message_type: type
    owner: Any
    func: Callable[..., Any]
    is_async: bool
    is_generator: bool
    params: tuple[tuple[str, Any], ...]
    init_params: tuple[tuple[str, Any], ...] | None = None
    return_type: Any = inspect.Parameter.empty

    @property
    def name(self) -> str:
        """``module.qualname`` of the registered object."""
        return describe(self.owner)


def _hints(func: Callable[..., Any], owner: object) -> dict[str, Any]:
    try:
        return typing.get_type_hints(func)
    except NameError as exc:
        raise RegistrationError(
            f"handler {describe(owner)} has an annotation that cannot be resolved: {exc}.",
            handler=owner,
            hint=(
                "annotations are resolved from the handler's module globals; with "
                "'from __future__ import annotations' every type named in a handler signature "
                "must be importable at module level (not defined inside a function or only "
                "under 'if TYPE_CHECKING')."
            ),
        ) from exc
    except Exception as exc:  # pragma: no cover - exotic annotation errors
        raise RegistrationError(
            f"handler {describe(owner)} has annotations that cannot be evaluated: {exc!r}.",
            handler=owner,
        ) from exc


def _inspect_callable(
    func: Callable[..., Any], owner: object, explicit: type | None, skip_self: bool
) -> tuple[type, tuple[tuple[str, Any], ...], Any]:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise RegistrationError(
            f"{describe(owner)} is not a function cqrskit can inspect.", handler=owner
        ) from exc
    params = list(sig.parameters.values())
    if skip_self:
        params = params[1:]
    if not params:
        raise RegistrationError(
            f"handler {describe(owner)} takes no parameters.",
            handler=owner,
            hint="the first parameter receives the message: def handle(cmd: MyCommand) -> ...",
        )
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise RegistrationError(
                f"handler {describe(owner)} has *args/**kwargs parameter {p.name!r}.",
                handler=owner,
                hint="declare each dependency as a named, annotated parameter.",
            )
    hints = _hints(func, owner)
    first = params[0]
    annotated = hints.get(first.name, inspect.Parameter.empty)
    if explicit is not None:
        mtype = explicit
        if annotated is not inspect.Parameter.empty and annotated is not Any:
            if isinstance(annotated, type) and not issubclass(mtype, annotated):
                raise RegistrationError(
                    f"handler {describe(owner)} is registered for {describe(mtype)} but its "
                    f"first parameter is annotated {describe(annotated)}.",
                    message_type=mtype,
                    handler=owner,
                    hint="make the annotation match the message type, or drop the explicit type.",
                )
    else:
        if annotated is inspect.Parameter.empty:
            raise RegistrationError(
                f"handler {describe(owner)}: first parameter {first.name!r} has no annotation.",
                handler=owner,
                hint=(
                    f"annotate it with the message class ({first.name}: MyCommand) or "
                    "register with @registry.handler(MyCommand)."
                ),
            )
        mtype = annotated
    if message_kind(mtype) is None:
        raise RegistrationError(
            f"handler {describe(owner)} handles {describe(mtype)}, which is not a Command, "
            "Query or Event subclass.",
            handler=owner,
            hint="subclass cqrskit.Command[Result], cqrskit.Query[Result] or cqrskit.Event.",
        )
    deps: list[tuple[str, Any]] = []
    for p in params[1:]:
        if p.default is not inspect.Parameter.empty:
            continue  # parameters with defaults are left to the default
        if p.name not in hints:
            raise RegistrationError(
                f"handler {describe(owner)} for {describe(mtype)}: dependency parameter "
                f"{p.name!r} has no annotation.",
                message_type=mtype,
                handler=owner,
                hint=f"annotate it with the type to inject ({p.name}: SomeService).",
            )
        deps.append((p.name, hints[p.name]))
    return mtype, tuple(deps), hints.get("return", inspect.Parameter.empty)


def _spec_for(obj: Any, explicit: type | None) -> HandlerSpec:
    if isinstance(obj, type):
        handle = getattr(obj, "handle", None)
        if handle is None or not callable(handle):
            raise RegistrationError(
                f"handler class {describe(obj)} has no 'handle' method.",
                handler=obj,
                hint="define 'async def handle(self, message: MyCommand) -> Result'.",
            )
        func = handle
        mtype, deps, ret = _inspect_callable(func, obj, explicit, skip_self=True)
        init = obj.__dict__.get("__init__") or getattr(obj, "__init__")  # noqa: B009
        init_params: tuple[tuple[str, Any], ...] | None = ()
        if init is not object.__init__:
            init_sig = inspect.signature(init)
            init_hints = _hints(init, obj)
            items: list[tuple[str, Any]] = []
            for p in list(init_sig.parameters.values())[1:]:
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                if p.default is not inspect.Parameter.empty:
                    continue
                if p.name not in init_hints:
                    raise RegistrationError(
                        f"handler class {describe(obj)}: __init__ parameter {p.name!r} has no "
                        "annotation.",
                        message_type=mtype,
                        handler=obj,
                        hint=f"annotate it with the type to inject ({p.name}: SomeService).",
                    )
                items.append((p.name, init_hints[p.name]))
            init_params = tuple(items)
    elif callable(obj):
        func = obj
        mtype, deps, ret = _inspect_callable(func, obj, explicit, skip_self=False)
        init_params = None
    else:
        raise RegistrationError(f"{obj!r} is neither a function nor a class.", handler=obj)
    is_gen = inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func)
    kind = message_kind(mtype)
    if is_gen and kind != "query":
        raise RegistrationError(
            f"handler {describe(obj)} for {kind} {describe(mtype)} is a generator function.",
            message_type=mtype,
            handler=obj,
            hint="only streaming query handlers may yield; return a value instead.",
        )
    if kind == "event" and ret not in (inspect.Parameter.empty, None, type(None)):
        raise RegistrationError(
            f"event handler {describe(obj)} for {describe(mtype)} is annotated to return "
            f"{describe(ret)}.",
            message_type=mtype,
            handler=obj,
            hint="event handlers return None; results of events are ignored.",
        )
    return HandlerSpec(
        message_type=mtype,
        owner=obj,
        func=func,
        is_async=inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func),
        is_generator=is_gen,
        params=deps,
        init_params=init_params,
        return_type=ret,
    )


@overload
def handler(obj: F, /) -> F: ...
@overload
def handler(message_type: type[Message], /) -> Callable[[F], F]: ...
def handler(target: Any, /) -> Any:
    """Mark a function or class as a handler, to be collected later by ``Registry.scan``.

    Use ``@handler`` or ``@handler(MessageType)``; nothing is registered until a registry
    scans the module.
    """
    if isinstance(target, type) and issubclass(target, Message):
        mtype = target

        def mark(obj: F) -> F:
            setattr(obj, _MARK, mtype)
            return obj

        return mark
    setattr(target, _MARK, None)
    return target


@dataclass
class Registry:
    """Maps message types to handlers.

    Example::

        registry = Registry()

        @registry.handler
        async def open_account(cmd: OpenAccount) -> str: ...

    Commands and queries have exactly one handler each (a second registration raises
    :class:`~cqrskit.errors.RegistrationError` at once); events have any number.
    """

    _single: dict[type, HandlerSpec] = field(default_factory=dict, repr=False)
    _events: dict[type, list[HandlerSpec]] = field(default_factory=dict, repr=False)
    _expected: set[type] = field(default_factory=set, repr=False)

    @overload
    def handler(self, obj: F, /) -> F: ...
    @overload
    def handler(self, message_type: type[Message], /) -> Callable[[F], F]: ...
    def handler(self, target: Any, /) -> Any:
        """Register a handler: ``@registry.handler`` or ``@registry.handler(MessageType)``."""
        if isinstance(target, type) and issubclass(target, Message):
            mtype = target

            def register(obj: F) -> F:
                self.add(obj, mtype)
                return obj

            return register
        self.add(target)
        return target

    def add(self, obj: Any, message_type: type | None = None) -> HandlerSpec:
        """Register ``obj`` (function or class) for ``message_type`` (default: annotation)."""
        spec = _spec_for(obj, message_type)
        mtype = spec.message_type
        if message_kind(mtype) == "event":
            handlers = self._events.setdefault(mtype, [])
            if any(h.owner is obj for h in handlers):
                raise RegistrationError(
                    f"{spec.name} is registered twice for event {describe(mtype)}.",
                    message_type=mtype,
                    handler=obj,
                    hint="register each event handler once.",
                )
            handlers.append(spec)
            return spec
        existing = self._single.get(mtype)
        if existing is not None:
            kind = message_kind(mtype)
            raise RegistrationError(
                f"{kind} {describe(mtype)} already has handler {existing.name}; "
                f"cannot also register {spec.name}.",
                message_type=mtype,
                handler=obj,
                hint=f"a {kind} has exactly one handler: remove one, or use an event for fan-out.",
            )
        self._single[mtype] = spec
        return spec

    def expect(self, *message_types: type[Message]) -> None:
        """Declare command/query types that must have a handler when the mediator is built."""
        self._expected.update(message_types)

    def include(self, other: Registry) -> None:
        """Copy every registration of ``other`` into this registry."""
        for spec in other._single.values():
            self.add(spec.owner, spec.message_type)
        for specs in other._events.values():
            for spec in specs:
                self.add(spec.owner, spec.message_type)
        self._expected.update(other._expected)

    def scan(self, *modules: ModuleType | str) -> int:
        """Register every ``@cqrskit.handler``-marked object in modules or packages.

        Packages are walked recursively. Command and query classes defined in the scanned
        modules are also expected to have a handler (checked when the mediator is built).
        Returns the number of handlers registered.
        """
        count = 0
        for mod in modules:
            for module in _walk(mod):
                for value in list(vars(module).values()):
                    if getattr(value, "__module__", None) != module.__name__:
                        continue
                    if isinstance(value, type) and message_kind(value) in ("command", "query"):
                        if not getattr(value, "__abstractmethods__", None):
                            self._expected.add(value)
                    if _MARK in getattr(value, "__dict__", {}):
                        self.add(value, getattr(value, _MARK))
                        count += 1
        return count

    def handler_for(self, message_type: type) -> HandlerSpec | None:
        """The handler of a command or query type, if any."""
        return self._single.get(message_type)

    def event_handlers(self, event_type: type) -> list[HandlerSpec]:
        """The handlers registered for exactly ``event_type``."""
        return list(self._events.get(event_type, ()))

    def commands(self) -> dict[type, HandlerSpec]:
        """Command type → handler."""
        return {t: s for t, s in self._single.items() if issubclass(t, Command)}

    def queries(self) -> dict[type, HandlerSpec]:
        """Query type → handler."""
        return {t: s for t, s in self._single.items() if issubclass(t, Query)}

    def events(self) -> dict[type, list[HandlerSpec]]:
        """Event type → handlers."""
        return {t: list(s) for t, s in self._events.items()}

    def expected(self) -> frozenset[type]:
        """Command/query types that must have a handler."""
        return frozenset(self._expected)

    def __iter__(self) -> Iterator[HandlerSpec]:
        yield from self._single.values()
        for specs in self._events.values():
            yield from specs

    def __len__(self) -> int:
        return len(self._single) + sum(len(v) for v in self._events.values())


def _walk(mod: ModuleType | str) -> Iterator[ModuleType]:
    module = importlib.import_module(mod) if isinstance(mod, str) else mod
    yield module
    path = getattr(module, "__path__", None)
    if path is None:
        return
    for info in pkgutil.walk_packages(path, prefix=module.__name__ + "."):
        yield sys.modules.get(info.name) or importlib.import_module(info.name)
