"""The asynchronous mediator: ``send`` commands, ``ask`` and ``stream`` queries, ``publish``
events.

Building a :class:`Mediator` validates every registration and compiles, per message type, a
plan: the handler with its dependencies bound and the applicable behaviors folded around it
(the compiler, shared with :class:`~cqrskit.sync.SyncMediator`, is in
:mod:`cqrskit._dispatch`). A dispatch is then one lookup and a call. A plan creates a
per-dispatch :class:`~cqrskit.dependencies.Scope` only when something in it needs one (a
scoped dependency, :class:`~cqrskit.messages.Metadata`, ...).
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

from cqrskit._dispatch import (
    ASYNC,
    MediatorCore,
    fast_callable,
    publish_concurrently,
    route,
    scope_var,
)
from cqrskit.dependencies import Resolver, Scope
from cqrskit.messages import Command, Event, Metadata, Query
from cqrskit.pipeline._core import ScopedBehavior
from cqrskit.registry import Registry

__all__ = ["Mediator", "Receipt", "current_scope"]

# Short local names: the scope of the running dispatch (cqrskit.dependencies.scope_var) and
# the fast call of a behavior object (cqrskit._dispatch).
_scope_var = scope_var
_direct = fast_callable

R = TypeVar("R")
T = TypeVar("T")

_receipt_var: contextvars.ContextVar[Receipt[Any] | None] = contextvars.ContextVar(
    "cqrskit_receipt", default=None
)


def current_scope() -> Scope | None:
    """The scope of the dispatch running in this context, if it has one."""
    return _scope_var.get()


class Receipt(Generic[R]):
    """What ``Mediator.send_tracked`` returns: the result and the consistency token.

    Attributes:
        result: the handler's result (typed from the command: ``Receipt[str]`` for a
            ``Command[str]``).
        token: the event-log position of the last event committed by the command (and the
            commands it dispatched), or ``None`` when it committed none.
    """

    __slots__ = ("result", "token")

    result: R

    def __init__(self) -> None:
        self.token: int | None = None

    def record(self, position: int) -> None:
        """Raise the token to ``position`` (called by write-side drivers after commit)."""
        if self.token is None or position > self.token:
            self.token = position


def record_token(position: int) -> None:
    """Report a committed event-log position to the caller's receipt, if one is tracking."""
    receipt = _receipt_var.get()
    if receipt is not None:
        receipt.record(position)


class Mediator(MediatorCore):
    """Dispatches messages to their handlers through a pipeline of behaviors.

    Args:
        registry: the handlers.
        behaviors: outermost first; plain behaviors apply to every message, ones wrapped
            with :func:`~cqrskit.pipeline.applies_to` (or ``for_commands`` ...) to some.
        resolver: a resolver (or several, asked in order) for dependency parameters.
        concurrent_publish: run event handlers concurrently by default.

    Raises:
        ConfigurationError: a registration is invalid — raised here, at build time, never
            during a dispatch.
    """

    _flavour = ASYNC

    def __init__(
        self,
        registry: Registry,
        *,
        behaviors: Sequence[Callable[..., Any] | ScopedBehavior] = (),
        resolver: Resolver | Sequence[Resolver] | None = None,
        concurrent_publish: bool = False,
    ) -> None:
        self._concurrent = concurrent_publish
        self._build(registry, behaviors, resolver)

    # -- verbs (generic; small registries get send, ask and publish generated) -------------

    def send(self, command: Command[R]) -> Coroutine[Any, Any, R]:
        """Dispatch a command to its handler; await the result.

        Raises:
            WrongMessageKindError: ``command`` is not a Command.
            NoHandlerError: no handler is registered for its type.
        """
        try:
            plan = self._commands[command.__class__]
        except KeyError:
            plan = route(command, "command", self._commands)
        return plan(command)  # type: ignore[no-any-return]

    def ask(self, query: Query[R]) -> Coroutine[Any, Any, R]:
        """Dispatch a query to its handler; await the result.

        Raises:
            WrongMessageKindError: ``query`` is not a Query.
            NoHandlerError: no handler is registered for its type.
        """
        try:
            plan = self._queries[query.__class__]
        except KeyError:
            plan = route(query, "query", self._queries)
        return plan(query)  # type: ignore[no-any-return]

    async def stream(self, query: Query[AsyncIterator[T]]) -> AsyncIterator[T]:
        """Dispatch a streaming query and iterate over what its handler yields.

        Closing this iterator early (``break`` inside ``async with
        contextlib.aclosing(mediator.stream(q))``) closes the handler's stream and its
        dispatch scope at once.
        """
        result: Any = await self.ask(query)
        try:
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:
                for item in result:
                    yield item
        finally:
            close = getattr(result, "aclose", None)
            if close is not None:
                await close()

    def publish(
        self, event: Event, *, concurrently: bool | None = None
    ) -> Coroutine[Any, Any, None]:
        """Deliver an event to every handler of its type (and of its base event types).

        Handlers run one after another unless ``concurrently`` (or the mediator's
        ``concurrent_publish``) is set. Every handler runs even if some fail; failures are
        raised together as one :class:`~cqrskit.errors.PublishError` naming each handler.
        """
        try:
            entries = self._events[event.__class__]
        except KeyError:
            entries = self._route_event(event)
        if self._concurrent if concurrently is None else concurrently:
            return publish_concurrently(event, entries)
        return ASYNC.publish_in_order(event, entries)  # type: ignore[no-any-return]

    def has_event_handlers(self, event_type: type) -> bool:
        """Whether :meth:`publish` of an ``event_type`` instance would run any handler
        (registered for the type or one of its base event types).

        Lets a caller skip building and awaiting a publish that would do nothing; the answer
        is computed once per type, from the plans ``publish`` uses.
        """
        entries = self._events.get(event_type)
        if entries is None:
            if not (isinstance(event_type, type) and issubclass(event_type, Event)):
                return False
            entries = self._events[event_type] = self._compiler.event_entries(
                self._registry, event_type
            )
        return bool(entries)

    async def send_tracked(self, command: Command[R]) -> Receipt[R]:
        """Like :meth:`send`, but also return the consistency token of what it committed.

        The handler's return type is untouched: the result is ``receipt.result``.
        """
        receipt: Receipt[R] = Receipt()
        token = _receipt_var.set(receipt)
        try:
            receipt.result = await self.send(command)
        finally:
            _receipt_var.reset(token)
        return receipt

    def scope(self, *, metadata: Metadata | None = None) -> _OuterScope:
        """An outer scope (e.g. one web request) whose metadata dispatches inside inherit.

        Use ``async with mediator.scope(metadata=Metadata(correlation_id=...)):``; every
        dispatch inside gets this scope as parent, so correlation ids flow through.
        """
        return _OuterScope(metadata)


class _OuterScope:
    __slots__ = ("_metadata", "_scope", "_token")

    def __init__(self, metadata: Metadata | None) -> None:
        self._metadata = metadata

    async def __aenter__(self) -> Scope:
        return self.__enter__()

    async def __aexit__(self, et: object, exc: BaseException | None, tb: object) -> None:
        try:
            await self._scope.aclose(exc)
        finally:
            _scope_var.reset(self._token)

    def __enter__(self) -> Scope:
        scope = Scope(_scope_var.get())
        if self._metadata is not None:
            scope.metadata = self._metadata
        self._scope = scope
        self._token = _scope_var.set(scope)
        return scope

    def __exit__(self, et: object, exc: BaseException | None, tb: object) -> None:
        try:
            self._scope.close_sync(exc)
        finally:
            _scope_var.reset(self._token)
