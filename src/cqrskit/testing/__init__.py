"""Test helpers: call one handler alone with fakes, and record what code dispatches.

* :func:`call_handler` / :func:`call_handler_sync` / :class:`HandlerHarness` resolve a
  handler's parameters (and a handler class's ``__init__`` parameters) from fakes you give
  by parameter name or by type, then call it — no registry, mediator or container needed.
* :class:`RecordingMediator` stands in for a :class:`~cqrskit.mediator.Mediator`: it records
  every command sent, query asked and event published, answers from per-type stubs or
  delegates to a real mediator, and offers assertion helpers.
  :class:`SyncRecordingMediator` is its twin for :class:`~cqrskit.sync.SyncMediator`.

The conformance kits that every event store and broker adapter passes are submodules,
imported on their own: :mod:`cqrskit.testing.eventlog` (``EventStoreConformance``),
:mod:`cqrskit.testing.idempotency` (``IdempotencyConformance``),
:mod:`cqrskit.testing.transport` (``TransportConformance``) and
:mod:`cqrskit.testing.source` (``SourceConformance``). See docs/testing.md.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar, cast

from cqrskit.dependencies import Scope
from cqrskit.errors import DependencyError, NoHandlerError, WrongMessageKindError, describe
from cqrskit.mediator import Mediator, Receipt
from cqrskit.messages import Command, Event, Message, Metadata, Query
from cqrskit.registry import HandlerSpec, Registry
from cqrskit.sync import SyncMediator

__all__ = [
    "HandlerHarness",
    "RecordingMediator",
    "SyncRecordingMediator",
    "call_handler",
    "call_handler_sync",
]

R = TypeVar("R")
M = TypeVar("M", bound=Message)

_UNSET: Any = object()


# -- RecordingMediator ---------------------------------------------------------------------


class _Stub:
    __slots__ = ("result", "handler", "error")

    def __init__(self, result: Any, handler: Callable[[Any], Any] | None, error: Any) -> None:
        self.result = result
        self.handler = handler
        self.error = error

    async def run(self, message: Any) -> Any:
        if self.error is not None:
            raise self.error
        if self.handler is not None:
            out = self.handler(message)
            if inspect.isawaitable(out):
                out = await out
            return out
        return self.result

    def run_sync(self, message: Any) -> Any:
        if self.error is not None:
            raise self.error
        if self.handler is not None:
            out = self.handler(message)
            if inspect.isawaitable(out):
                close = getattr(out, "close", None)
                if close is not None:
                    close()  # never awaited by design: free it quietly
                raise TypeError(
                    f"the stub for {type(message).__name__} is async; a "
                    "SyncRecordingMediator needs a plain function"
                )
            return out
        return self.result


class _Recorder:
    """What both recording mediators share: the recording, the stubs, the assertions."""

    def __init__(self) -> None:
        self._stubs: dict[type, _Stub] = {}
        self.dispatched: list[Message] = []
        self.sent: list[Command[Any]] = []
        self.asked: list[Query[Any]] = []
        self.published: list[Event] = []

    # -- stubbing ------------------------------------------------------------------------

    def stub(
        self,
        message_type: type[Message],
        result: Any = None,
        *,
        handler: Callable[[Any], Any] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Answer messages of ``message_type`` (and its subclasses) without a handler.

        Give ``result`` to return it, ``handler`` to compute the result from the message,
        or ``error`` to raise it. A later stub for a type replaces the earlier one.
        """
        if handler is not None and error is not None:
            raise TypeError("stub() takes a handler or an error, not both")
        self._stubs[message_type] = _Stub(result, handler, error)

    def _stub_for(self, message_type: type) -> _Stub | None:
        for cls in message_type.__mro__:
            stub = self._stubs.get(cls)
            if stub is not None:
                return stub
        return None

    def _record(self, message: Any, kind: type, verb: str, what: str, into: list[Any]) -> None:
        _check_kind(message, kind, verb, what)
        self.dispatched.append(message)
        into.append(message)

    @staticmethod
    def _no_answer(message: Any) -> NoHandlerError:
        name = type(message).__name__
        return NoHandlerError(
            f"the recording mediator has no stub for {describe(type(message))} and no delegate.",
            message_type=type(message),
            hint=(
                f"stub it: recorder.stub({name}, result), or pass a real mediator as its delegate."
            ),
        )

    # -- reading and asserting -----------------------------------------------------------

    def sent_of(self, command_type: type[M]) -> list[M]:
        """Commands sent that are instances of ``command_type``, in order."""
        return [m for m in self.sent if isinstance(m, command_type)]

    def asked_of(self, query_type: type[M]) -> list[M]:
        """Queries asked that are instances of ``query_type``, in order."""
        return [m for m in self.asked if isinstance(m, query_type)]

    def published_of(self, event_type: type[M]) -> list[M]:
        """Events published that are instances of ``event_type``, in order."""
        return [m for m in self.published if isinstance(m, event_type)]

    def assert_sent(self, command_type: type[M], /, **fields: Any) -> M:
        """Assert a command of ``command_type`` with these field values was sent; return
        the first match."""
        return _assert_one(self.sent_of(command_type), command_type, fields, "sent")

    def assert_asked(self, query_type: type[M], /, **fields: Any) -> M:
        """Assert a query of ``query_type`` with these field values was asked."""
        return _assert_one(self.asked_of(query_type), query_type, fields, "asked")

    def assert_published(self, event_type: type[M], /, **fields: Any) -> M:
        """Assert an event of ``event_type`` with these field values was published."""
        return _assert_one(self.published_of(event_type), event_type, fields, "published")

    def assert_not_sent(self, command_type: type[Message] = Command) -> None:
        """Assert no command of ``command_type`` (default: none at all) was sent."""
        found = self.sent_of(command_type)
        if found:
            raise AssertionError(
                f"expected no {command_type.__name__} sent, but {len(found)} were: {found!r}"
            )

    def assert_not_published(self, event_type: type[Message] = Event) -> None:
        """Assert no event of ``event_type`` (default: none at all) was published."""
        found = self.published_of(event_type)
        if found:
            raise AssertionError(
                f"expected no {event_type.__name__} published, but {len(found)} were: {found!r}"
            )

    def reset(self) -> None:
        """Forget what was recorded (stubs stay)."""
        self.dispatched.clear()
        self.sent.clear()
        self.asked.clear()
        self.published.clear()


class RecordingMediator(_Recorder):
    """A mediator double that records dispatches, answering from stubs or a delegate.

    Args:
        delegate: a real :class:`~cqrskit.mediator.Mediator` to forward every dispatch to
            after recording it (stubs take precedence). Without one, an un-stubbed
            ``send``/``ask`` raises :class:`~cqrskit.errors.NoHandlerError` and ``publish``
            only records.

    Attributes:
        dispatched: every message in dispatch order.
        sent: commands given to ``send`` / ``send_tracked``.
        asked: queries given to ``ask`` / ``stream``.
        published: events given to ``publish``.

    Stub handlers may be sync or async.
    """

    def __init__(self, delegate: Mediator | None = None) -> None:
        super().__init__()
        self._delegate = delegate

    async def send(self, command: Command[R]) -> R:
        """Record ``command``; return its stubbed result or the delegate's."""
        self._record(command, Command, "send", "command", self.sent)
        return cast(R, await self._answer(command, "send"))

    async def send_tracked(self, command: Command[R]) -> Receipt[R]:
        """Record ``command`` like :meth:`send`; return a receipt (token from the delegate)."""
        self._record(command, Command, "send", "command", self.sent)
        if self._stub_for(type(command)) is None and self._delegate is not None:
            return await self._delegate.send_tracked(command)
        receipt: Receipt[R] = Receipt()
        receipt.result = await self._answer(command, "send")
        return receipt

    async def ask(self, query: Query[R]) -> R:
        """Record ``query``; return its stubbed result or the delegate's."""
        self._record(query, Query, "ask", "query", self.asked)
        return cast(R, await self._answer(query, "ask"))

    async def stream(self, query: Query[AsyncIterator[R]]) -> AsyncIterator[R]:
        """Record ``query``; iterate over its stubbed result (any iterable) or the
        delegate's stream."""
        self._record(query, Query, "ask", "query", self.asked)
        if self._stub_for(type(query)) is None and self._delegate is not None:
            async for item in self._delegate.stream(query):
                yield item
            return
        result: Any = await self._answer(query, "ask")
        if hasattr(result, "__aiter__"):
            async for item in result:
                yield item
        else:
            for item in result:
                yield item

    async def publish(self, event: Event, *, concurrently: bool | None = None) -> None:
        """Record ``event``; run its stub if any, else forward it to the delegate if any."""
        self._record(event, Event, "publish", "event", self.published)
        stub = self._stub_for(type(event))
        if stub is not None:
            await stub.run(event)
        elif self._delegate is not None:
            await self._delegate.publish(event, concurrently=concurrently)

    async def _answer(self, message: Any, verb: str) -> Any:
        stub = self._stub_for(type(message))
        if stub is not None:
            return await stub.run(message)
        if self._delegate is not None:
            forward: Callable[[Any], Awaitable[Any]] = getattr(self._delegate, verb)
            return await forward(message)
        raise self._no_answer(message)


class SyncRecordingMediator(_Recorder):
    """The twin of :class:`RecordingMediator` for code that uses a
    :class:`~cqrskit.sync.SyncMediator`: the same recording, stubs and assertions, with
    blocking verbs. Stub handlers must be plain functions.

    Args:
        delegate: a real :class:`~cqrskit.sync.SyncMediator` to forward to.
    """

    def __init__(self, delegate: SyncMediator | None = None) -> None:
        super().__init__()
        self._delegate = delegate

    def send(self, command: Command[R]) -> R:
        """Record ``command``; return its stubbed result or the delegate's."""
        self._record(command, Command, "send", "command", self.sent)
        return cast(R, self._answer(command, "send"))

    def send_tracked(self, command: Command[R]) -> Receipt[R]:
        """Record ``command`` like :meth:`send`; return a receipt (token from the delegate)."""
        self._record(command, Command, "send", "command", self.sent)
        if self._stub_for(type(command)) is None and self._delegate is not None:
            return self._delegate.send_tracked(command)
        receipt: Receipt[R] = Receipt()
        receipt.result = self._answer(command, "send")
        return receipt

    def ask(self, query: Query[R]) -> R:
        """Record ``query``; return its stubbed result or the delegate's."""
        self._record(query, Query, "ask", "query", self.asked)
        return cast(R, self._answer(query, "ask"))

    def stream(self, query: Query[Iterator[R]]) -> Iterator[R]:
        """Record ``query``; iterate over its stubbed result or the delegate's stream."""
        self._record(query, Query, "ask", "query", self.asked)
        if self._stub_for(type(query)) is None and self._delegate is not None:
            return self._delegate.stream(query)
        return iter(self._answer(query, "ask"))

    def publish(self, event: Event) -> None:
        """Record ``event``; run its stub if any, else forward it to the delegate if any."""
        self._record(event, Event, "publish", "event", self.published)
        stub = self._stub_for(type(event))
        if stub is not None:
            stub.run_sync(event)
        elif self._delegate is not None:
            self._delegate.publish(event)

    def _answer(self, message: Any, verb: str) -> Any:
        stub = self._stub_for(type(message))
        if stub is not None:
            return stub.run_sync(message)
        if self._delegate is not None:
            forward: Callable[[Any], Any] = getattr(self._delegate, verb)
            return forward(message)
        raise self._no_answer(message)


def _check_kind(message: object, kind: type, verb: str, what: str) -> None:
    if not isinstance(message, kind):
        raise WrongMessageKindError(
            f"mediator.{verb}() takes a {what}, but got {describe(type(message))}.",
            message_type=type(message),
        )


def _assert_one(found: list[M], message_type: type, fields: Mapping[str, Any], verb: str) -> M:
    name = message_type.__name__
    if not found:
        raise AssertionError(f"expected a {name} to be {verb}, but none was")
    for message in found:
        if all(getattr(message, k, _UNSET) == v for k, v in fields.items()):
            return message
    wanted = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    raise AssertionError(
        f"expected a {name} with {wanted} to be {verb}; {len(found)} {name} were, "
        f"none matching: {found!r}"
    )


# -- calling one handler -------------------------------------------------------------------


class HandlerHarness:
    """Call handlers alone, resolving their parameters from fakes.

    Each parameter after the message (and each ``__init__`` parameter of a handler class) is
    taken, in this order, from: a keyword given to the call by parameter name; ``deps`` by
    annotated type; the built-ins — a fresh :class:`~cqrskit.messages.Metadata` and
    :class:`~cqrskit.dependencies.Scope` per call, :attr:`mediator` for a parameter
    annotated :class:`~cqrskit.mediator.Mediator` and :attr:`sync_mediator` for one
    annotated :class:`~cqrskit.sync.SyncMediator`. Anything else is a
    :class:`~cqrskit.errors.DependencyError` naming the parameter.

    Args:
        deps: fakes by type.
        mediator: what handlers that dispatch further messages get; default a fresh
            :class:`RecordingMediator`, so the test can assert on what they dispatched.
        sync_mediator: the same for ``SyncMediator`` parameters; default a fresh
            :class:`SyncRecordingMediator`.
    """

    def __init__(
        self,
        deps: Mapping[Any, object] | None = None,
        *,
        mediator: RecordingMediator | Mediator | None = None,
        sync_mediator: SyncRecordingMediator | SyncMediator | None = None,
    ) -> None:
        self.deps: dict[Any, object] = dict(deps or {})
        self.mediator = mediator if mediator is not None else RecordingMediator()
        self.sync_mediator = sync_mediator if sync_mediator is not None else SyncRecordingMediator()
        self._specs: dict[int, HandlerSpec] = {}

    def _spec(self, handler: Any, message: Message) -> HandlerSpec:
        spec = self._specs.get(id(handler))
        if spec is None or spec.owner is not handler:
            spec = Registry().add(handler)
            self._specs[id(handler)] = spec
        if not isinstance(message, spec.message_type):
            raise TypeError(
                f"{spec.name} handles {describe(spec.message_type)}, not {describe(type(message))}"
            )
        return spec

    def _value(self, spec: HandlerSpec, name: str, tp: Any, by_name: Mapping[str, Any]) -> Any:
        if name in by_name:
            return by_name[name]
        if tp in self.deps:
            return self.deps[tp]
        if tp is Metadata:
            return Metadata()
        if tp is Scope:
            return Scope()
        if tp is Mediator or tp is RecordingMediator:
            return self.mediator
        if tp is SyncMediator or tp is SyncRecordingMediator:
            return self.sync_mediator
        raise DependencyError(
            f"{spec.name} needs parameter {name!r} of type {describe(tp)}, and no fake "
            "was given for it.",
            dependency=tp,
            handler=spec.owner,
            message_type=spec.message_type,
            hint=f"pass {name}=fake, or deps={{{getattr(tp, '__name__', tp)}: fake}}.",
        )

    def _prepare(
        self, handler: Any, message: Message, by_name: Mapping[str, Any]
    ) -> tuple[HandlerSpec, Callable[..., Any], dict[str, Any]]:
        spec = self._spec(handler, message)
        known = {n for n, _ in spec.params} | {n for n, _ in spec.init_params or ()}
        unknown = sorted(set(by_name) - known)
        if unknown:
            raise TypeError(f"{spec.name} has no dependency parameter named {unknown[0]!r}")
        kwargs = {n: self._value(spec, n, tp, by_name) for n, tp in spec.params}
        func: Callable[..., Any] = spec.func
        if spec.init_params is not None:
            init = {n: self._value(spec, n, tp, by_name) for n, tp in spec.init_params}
            instance = spec.owner(**init)
            bound = func

            def func(m: Any, **kw: Any) -> Any:
                return bound(instance, m, **kw)

        return spec, func, kwargs

    async def call(self, handler: Any, message: Message, /, **by_name: Any) -> Any:
        """Call ``handler`` (sync or async) with ``message``; await and return its result.

        A streaming handler's iterator is returned as is.
        """
        spec, func, kwargs = self._prepare(handler, message, by_name)
        result = func(message, **kwargs)
        if spec.is_async and not spec.is_generator:
            result = await result
        return result

    def call_sync(self, handler: Any, message: Message, /, **by_name: Any) -> Any:
        """Call a plain ``def`` handler with ``message`` and return its result."""
        spec, func, kwargs = self._prepare(handler, message, by_name)
        if spec.is_async and not spec.is_generator:
            raise TypeError(f"{spec.name} is async: use 'await harness.call(...)'")
        return func(message, **kwargs)


async def call_handler(
    handler: Any,
    message: Message,
    /,
    *,
    deps: Mapping[Any, object] | None = None,
    mediator: RecordingMediator | Mediator | None = None,
    **by_name: Any,
) -> Any:
    """Call one handler with fakes: ``await call_handler(open_account, cmd, uow=fake_uow)``.

    See :class:`HandlerHarness` for how parameters are filled.
    """
    return await HandlerHarness(deps, mediator=mediator).call(handler, message, **by_name)


def call_handler_sync(
    handler: Any,
    message: Message,
    /,
    *,
    deps: Mapping[Any, object] | None = None,
    mediator: SyncRecordingMediator | SyncMediator | None = None,
    **by_name: Any,
) -> Any:
    """The twin of :func:`call_handler` for plain ``def`` handlers; ``mediator`` fills
    parameters annotated ``SyncMediator``."""
    return HandlerHarness(deps, sync_mediator=mediator).call_sync(handler, message, **by_name)
