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
from typing import Any, TypeVar

from cqrskit._dispatch import SYNC, MediatorCore, route
from cqrskit._plan import Binding
from cqrskit.dependencies import Resolver
from cqrskit.errors import DependencyError, RegistrationError, describe
from cqrskit.mediator import Receipt, _OuterScope, _receipt_var
from cqrskit.messages import Command, Event, Metadata, Query
from cqrskit.pipeline._core import ScopedBehavior
from cqrskit.registry import HandlerSpec, Registry

__all__ = ["SyncMediator"]

R = TypeVar("R")
T = TypeVar("T")


class SyncMediator(MediatorCore):
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

    _flavour = SYNC

    def __init__(
        self,
        registry: Registry,
        *,
        behaviors: Sequence[Callable[..., Any] | ScopedBehavior] = (),
        resolver: Resolver | Sequence[Resolver] | None = None,
    ) -> None:
        self._build(registry, behaviors, resolver, accept=_refuse_async_providers)

    def _check_registry(self) -> None:
        for spec in self._registry:
            _refuse_async_handler(spec)
        for b in self._behaviors:
            _refuse_async_behavior(b.behavior if isinstance(b, ScopedBehavior) else b)

    # -- verbs (generic; small registries get send, ask and publish generated) -------------

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
            entries = self._events[event.__class__]
        except KeyError:
            entries = self._route_event(event)
        SYNC.publish_in_order(event, entries)

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
