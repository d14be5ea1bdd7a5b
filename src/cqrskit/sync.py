"""The synchronous mediator, for Flask, Django and scripts: the twin of
:class:`cqrskit.mediator.Mediator` with the same verbs, all blocking.

Handlers and behaviors are plain ``def`` functions (or classes with a plain ``handle``);
``behavior(message, next)`` calls ``next(message)`` without ``await``. Scoped dependencies
come from plain or generator factories and are closed when each dispatch ends. Anything
asynchronous in a registry, a behavior or a factory is refused when the mediator is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, TypeVar

from cqrskit._plan import (
    Binding,
    Planner,
    behaviors_for,
    check_event,
    check_expected,
    check_result,
    generate_dispatch,
    route,
)
from cqrskit.dependencies import Resolver, Scope
from cqrskit.errors import DependencyError, PublishError, RegistrationError, describe
from cqrskit.mediator import Receipt, _direct, _OuterScope, _receipt_var, _scope_var
from cqrskit.messages import Command, Event, Metadata, Query
from cqrskit.pipeline._core import ScopedBehavior
from cqrskit.registry import HandlerSpec, Registry

__all__ = ["SyncMediator"]

R = TypeVar("R")
T = TypeVar("T")

SyncPlan = Callable[[Any], Any]
ScopedCall = Callable[[Any, Scope], Any]


class SyncMediator:
    """Dispatches messages to plain ``def`` handlers through plain ``def`` behaviors.

    Args:
        registry: the handlers; every one must be synchronous.
        behaviors: outermost first; ``def behavior(message, next)``, optionally wrapped
            with :func:`~cqrskit.pipeline.applies_to` (or ``for_commands`` ...).
        resolver: a resolver (or several, asked in order) for dependency parameters.

    Raises:
        ConfigurationError: a registration is invalid, or something in it is asynchronous
            (``RegistrationError`` for handlers and behaviors, ``DependencyError`` for
            factories) — raised here, at build time, never during a dispatch.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        behaviors: Sequence[Callable[..., Any] | ScopedBehavior] = (),
        resolver: Resolver | Sequence[Resolver] | None = None,
    ) -> None:
        if resolver is None:
            resolvers: list[Resolver] = []
        elif isinstance(resolver, Sequence):
            resolvers = list(resolver)
        else:
            resolvers = [resolver]
        self._registry = registry
        self._behaviors = tuple(behaviors)
        self._planner = Planner(self, resolvers)
        self._commands: dict[type, SyncPlan] = {}
        self._queries: dict[type, SyncPlan] = {}
        self._events: dict[type, tuple[tuple[object, SyncPlan], ...]] = {}
        self._build()

    # -- build ---------------------------------------------------------------------------

    def _build(self) -> None:
        check_expected(self._registry)
        for spec in self._registry:
            _refuse_async_handler(spec)
        for b in self._behaviors:
            _refuse_async_behavior(b.behavior if isinstance(b, ScopedBehavior) else b)
        compiled: dict[int, tuple[object, SyncPlan]] = {}
        for mtype, spec in self._registry.commands().items():
            check_result(spec)
            self._commands[mtype] = self._compile(spec)
        for mtype, spec in self._registry.queries().items():
            check_result(spec)
            self._queries[mtype] = self._compile(spec)
        for mtype in self._registry.events():
            self._events[mtype] = self._event_plan_for(mtype, compiled)
        # Small registries get send/ask generated for them (see generate_dispatch).
        send = generate_dispatch("send", "command", self._commands, sync=True)
        if send is not None:
            send.__doc__ = SyncMediator.send.__doc__
            self.send = send  # type: ignore[method-assign, assignment]
        ask = generate_dispatch("ask", "query", self._queries, sync=True)
        if ask is not None:
            ask.__doc__ = SyncMediator.ask.__doc__
            self.ask = ask  # type: ignore[method-assign, assignment]

    def _event_plan_for(
        self, event_type: type, compiled: dict[int, tuple[object, SyncPlan]]
    ) -> tuple[tuple[object, SyncPlan], ...]:
        plans: list[tuple[object, SyncPlan]] = []
        for cls in reversed(event_type.__mro__):
            for spec in self._registry.event_handlers(cls):
                entry = compiled.get(id(spec))
                if entry is None:
                    entry = compiled[id(spec)] = (spec.owner, self._compile(spec))
                plans.append(entry)
        return tuple(plans)

    def _compile(self, spec: HandlerSpec) -> SyncPlan:
        planner = self._planner
        binding = planner.bind_handler(spec)
        _refuse_async_providers(binding, spec.owner, spec.message_type, spec.params)
        behaviors: list[Binding] = []
        for behavior in behaviors_for(self._behaviors, spec.message_type):
            bound = planner.bind_behavior(behavior, spec.message_type)
            _refuse_async_providers(bound, behavior, spec.message_type, None)
            behaviors.append(bound)
        if not binding.scoped and not any(b.scoped for b in behaviors):
            plan = _handler_call(spec, binding)
            for b in reversed(behaviors):
                plan = _fold_plain(b, plan)
            return plan
        scoped = _handler_call_scoped(spec, binding)
        for b in reversed(behaviors):
            scoped = _fold_scoped(b, scoped)
        if spec.is_generator:
            return _with_stream_scope(scoped)
        return _with_scope(scoped)

    # -- verbs ---------------------------------------------------------------------------

    def send(self, command: Command[R]) -> R:
        """Dispatch a command to its handler and return the result.

        Raises:
            WrongMessageKindError: ``command`` is not a Command.
            NoHandlerError: no handler is registered for its type.
        """
        try:
            plan = self._commands[command.__class__]
        except KeyError:
            plan = route(command, "command", self._commands, sync=True)
        return plan(command)  # type: ignore[no-any-return]

    def ask(self, query: Query[R]) -> R:
        """Dispatch a query to its handler and return the result.

        Raises:
            WrongMessageKindError: ``query`` is not a Query.
            NoHandlerError: no handler is registered for its type.
        """
        try:
            plan = self._queries[query.__class__]
        except KeyError:
            plan = route(query, "query", self._queries, sync=True)
        return plan(query)  # type: ignore[no-any-return]

    def stream(self, query: Query[Iterator[T]]) -> Iterator[T]:
        """Dispatch a streaming query; iterate over what its (generator) handler yields.

        The query is routed at once (a wrong kind or a missing handler raises here); the
        handler runs as the iterator is consumed, and its scoped dependencies are closed
        when the iterator is exhausted or closed.
        """
        try:
            plan = self._queries[query.__class__]
        except KeyError:
            plan = route(query, "query", self._queries, verb="stream", sync=True)
        return iter(plan(query))

    def publish(self, event: Event) -> None:
        """Deliver an event to every handler of its type (and of its base event types).

        Handlers run one after another; every handler runs even if some fail, and the
        failures are raised together as one :class:`~cqrskit.errors.PublishError`.
        """
        try:
            plans = self._events[event.__class__]
        except KeyError:
            check_event(event)
            plans = self._events[event.__class__] = self._event_plan_for(event.__class__, {})
        failures: list[tuple[object, BaseException]] = []
        for owner, plan in plans:
            try:
                plan(event)
            except Exception as exc:  # noqa: BLE001 - collected and re-raised
                failures.append((owner, exc))
        if failures:
            raise PublishError(event.__class__, failures)

    def send_tracked(self, command: Command[R]) -> Receipt[R]:
        """Like :meth:`send`, but also return the consistency token of what it committed.

        The handler's return type is untouched: the result is ``receipt.result``.
        """
        receipt: Receipt[R] = Receipt()
        token = _receipt_var.set(receipt)
        try:
            receipt.result = self.send(command)
        finally:
            _receipt_var.reset(token)
        return receipt

    def scope(self, *, metadata: Metadata | None = None) -> _OuterScope:
        """An outer scope (e.g. one web request) whose metadata dispatches inside inherit.

        Use ``with mediator.scope(metadata=Metadata(correlation_id=...)):``.
        """
        return _OuterScope(metadata)

    @property
    def registry(self) -> Registry:
        """The registry this mediator was built from."""
        return self._registry


# -- build-time refusals -------------------------------------------------------------------


def _refuse_async_handler(spec: HandlerSpec) -> None:
    if spec.is_async:
        raise RegistrationError(
            f"handler {spec.name} for {describe(spec.message_type)} is asynchronous; "
            "SyncMediator calls handlers without an event loop.",
            message_type=spec.message_type,
            handler=spec.owner,
            hint=(
                "write it as a plain 'def' (a plain generator for streaming queries), or "
                "dispatch through cqrskit.Mediator instead."
            ),
        )


def _refuse_async_behavior(behavior: Callable[..., Any]) -> None:
    call = behavior if inspect.isfunction(behavior) or inspect.ismethod(behavior) else None
    if call is None:
        call = getattr(type(behavior), "__call__", None)  # noqa: B004 - the class's method
    if (
        inspect.iscoroutinefunction(call)
        or inspect.isasyncgenfunction(call)
        or getattr(call, "__cqrskit_async__", False)  # returns an awaitable (built-ins)
    ):
        raise RegistrationError(
            f"behavior {describe(behavior)} is asynchronous; SyncMediator needs plain "
            "'def behavior(message, next)'.",
            handler=behavior,
            hint="write it as a plain 'def' that returns next(message), or use cqrskit.Mediator.",
        )


def _refuse_async_providers(
    binding: Binding,
    owner: object,
    message_type: type,
    params: tuple[tuple[str, Any], ...] | None,
) -> None:
    types = dict(params or ())
    for name, provider in zip(binding.names, binding.providers, strict=True):
        if provider.is_async:
            raise _async_dependency(owner, message_type, name, types.get(name))
    if binding.instance is not None and binding.instance.is_async:
        raise _async_dependency(owner, message_type, "__init__", owner)


def _async_dependency(owner: object, message_type: type, name: str, tp: Any) -> DependencyError:
    what = f" ({describe(tp)})" if tp is not None else ""
    return DependencyError(
        f"{describe(owner)} for {describe(message_type)} needs parameter {name!r}{what}, "
        "which is made by an async factory (or one that depends on an async factory); "
        "SyncMediator cannot await it.",
        dependency=tp,
        message_type=message_type,
        handler=owner,
        hint="provide it with a plain or generator 'def' factory, or use cqrskit.Mediator.",
    )


# -- compiling ---------------------------------------------------------------------------


def _handler_call(spec: HandlerSpec, binding: Binding) -> SyncPlan:
    """The unscoped call: the handler itself, with singletons bound, when possible."""
    func: Callable[..., Any] = spec.func
    if binding.instance is not None:
        func = partial(func, binding.instance.value)
    kwargs = binding.singleton_kwargs()
    if kwargs:
        func = partial(func, **kwargs)
    return func


def _handler_call_scoped(spec: HandlerSpec, binding: Binding) -> ScopedCall:
    func = spec.func
    items = tuple(zip(binding.names, binding.providers, strict=True))
    inst = binding.instance

    def call(message: Any, scope: Scope) -> Any:
        kwargs = {
            name: (p.value if p.lifetime == "singleton" else p.get(scope))  # type: ignore[misc]
            for name, p in items
        }
        if inst is None:
            return func(message, **kwargs)
        obj = inst.value if inst.lifetime == "singleton" else inst.get(scope)  # type: ignore[misc]
        return func(obj, message, **kwargs)

    return call


def _fold_plain(b: Binding, inner: SyncPlan) -> SyncPlan:
    behavior = _direct(b.func)
    if b.providers:
        behavior = partial(behavior, **b.singleton_kwargs())

    def step(message: Any) -> Any:
        return behavior(message, inner)

    return step


def _fold_scoped(b: Binding, inner: ScopedCall) -> ScopedCall:
    behavior = _direct(b.func)
    items = tuple(zip(b.names, b.providers, strict=True))

    def step(message: Any, scope: Scope) -> Any:
        kwargs = {
            name: (p.value if p.lifetime == "singleton" else p.get(scope))  # type: ignore[misc]
            for name, p in items
        }
        return behavior(message, partial(_call_inner, inner, scope), **kwargs)

    return step


def _call_inner(inner: ScopedCall, scope: Scope, message: Any) -> Any:
    return inner(message, scope)


def _with_scope(chain: ScopedCall) -> SyncPlan:
    get_current = _scope_var.get
    set_current = _scope_var.set
    reset_current = _scope_var.reset

    def plan(message: Any) -> Any:
        scope = Scope(get_current())
        token = set_current(scope)
        try:
            result = chain(message, scope)
        except BaseException as exc:
            try:
                scope.close_sync(exc)
            finally:
                reset_current(token)
            raise
        try:
            scope.close_sync(None)
        finally:
            reset_current(token)
        return result

    return plan


def _with_stream_scope(chain: ScopedCall) -> SyncPlan:
    # the scope stays open while the handler yields, and closes with the iterator
    get_current = _scope_var.get
    set_current = _scope_var.set
    reset_current = _scope_var.reset

    def plan(message: Any) -> Any:
        scope = Scope(get_current())
        token = set_current(scope)
        try:
            items = chain(message, scope)
        except BaseException as exc:
            try:
                scope.close_sync(exc)
            finally:
                reset_current(token)
            raise
        reset_current(token)
        return _closing_stream(items, scope)

    return plan


def _closing_stream(items: Any, scope: Scope) -> Iterator[Any]:
    try:
        yield from items
    except BaseException as exc:  # GeneratorExit too: closing early is thrown in, as in Python
        scope.close_sync(exc)
        raise
    scope.close_sync(None)
