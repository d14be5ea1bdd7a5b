"""The asynchronous mediator: ``send`` commands, ``ask`` and ``stream`` queries, ``publish``
events.

Building a :class:`Mediator` validates every registration and compiles, per message type, a
plan: the handler with its dependencies bound and the applicable behaviors folded around it.
A dispatch is then one dictionary lookup and a call. A plan creates a per-dispatch
:class:`~cqrskit.dependencies.Scope` only when something in it needs one (a scoped
dependency, :class:`~cqrskit.messages.Metadata`, ...).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from functools import partial
from types import MethodType
from typing import Any, Generic, TypeVar

from cqrskit._plan import (
    Binding,
    Planner,
    behaviors_for,
    check_event,
    check_expected,
    check_result,
    route,
)
from cqrskit.dependencies import ASYNC_EXITS, EXITS, Provider, Resolver, Scope
from cqrskit.errors import PublishError
from cqrskit.messages import Command, Event, Metadata, Query
from cqrskit.pipeline._core import ScopedBehavior
from cqrskit.registry import HandlerSpec, Registry

__all__ = ["Mediator", "Receipt", "current_scope"]

R = TypeVar("R")
T = TypeVar("T")

Plan = Callable[[Any], Coroutine[Any, Any, Any]]
ScopedCall = Callable[[Any, Scope], Any]

_scope_var: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "cqrskit_scope", default=None
)
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


class Mediator:
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

    def __init__(
        self,
        registry: Registry,
        *,
        behaviors: Sequence[Callable[..., Any] | ScopedBehavior] = (),
        resolver: Resolver | Sequence[Resolver] | None = None,
        concurrent_publish: bool = False,
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
        self._concurrent = concurrent_publish
        self._commands: dict[type, Plan] = {}
        self._queries: dict[type, Plan] = {}
        self._events: dict[type, Plan] = {}
        self._event_plans_by_type: dict[type, tuple[Plan, ...]] = {}
        self._event_plans: dict[int, Plan] = {}
        self._owners: dict[Plan, object] = {}
        self._build()

    # -- build ---------------------------------------------------------------------------

    def _build(self) -> None:
        check_expected(self._registry)
        for mtype, spec in self._registry.commands().items():
            check_result(spec)
            self._commands[mtype] = self._compile(spec)
        for mtype, spec in self._registry.queries().items():
            check_result(spec)
            self._queries[mtype] = self._compile(spec)
        for mtype in self._registry.events():
            self._events[mtype] = self._publisher_for(mtype)
        if not self._concurrent and self._events:
            # Shadow the publish method with code generated for this mediator's event types.
            self.publish = _generate_publish(  # type: ignore[method-assign]
                [(t, self._event_plans_by_type[t]) for t in self._events],
                self._owners,
                self._publish_any,
            )

    def _event_plan_for(self, event_type: type) -> tuple[Plan, ...]:
        plans: list[Plan] = []
        for cls in reversed(event_type.__mro__):
            for spec in self._registry.event_handlers(cls):
                plan = self._event_plans.get(id(spec))
                if plan is None:
                    plan = self._compile(spec)
                    if plan in self._owners:  # the same function for two event types
                        plan = _distinct(plan)
                    self._event_plans[id(spec)] = plan
                    self._owners[plan] = spec.owner
                plans.append(plan)
        return tuple(plans)

    def _publisher_for(self, event_type: type) -> Plan:
        plans = self._event_plan_for(event_type)
        self._event_plans_by_type[event_type] = plans
        if self._concurrent:
            return partial(self._publish_concurrently, plans=plans)
        return partial(_publish_in_order, plans=plans, owners=self._owners)

    def _compile(self, spec: HandlerSpec) -> Plan:
        planner = self._planner
        binding = planner.bind_handler(spec)
        behaviors = [
            planner.bind_behavior(b, spec.message_type)
            for b in behaviors_for(self._behaviors, spec.message_type)
        ]
        if not any(b.providers for b in behaviors):
            direct = _direct_factories(spec, binding)
            if direct is not None:
                call_direct = direct
                for b in reversed(behaviors):
                    call_direct = _fold_plain(b, call_direct)
                return call_direct
        call = _handler_call(spec, binding)
        if not binding.scoped and not any(b.scoped for b in behaviors):
            plan: Plan = call
            for b in reversed(behaviors):
                plan = _fold_plain(b, plan)
            return plan
        scoped: ScopedCall = _handler_call_scoped(spec, binding)
        for b in reversed(behaviors):
            scoped = _fold_scoped(b, scoped)
        if spec.is_generator:
            return _with_stream_scope(scoped)
        return _with_scope(scoped)

    # -- verbs ---------------------------------------------------------------------------

    def send(self, command: Command[R]) -> Coroutine[Any, Any, R]:
        """Dispatch a command to its handler; await the result.

        Raises:
            WrongMessageKindError: ``command`` is not a Command.
            NoHandlerError: no handler is registered for its type.
        """
        try:
            plan = self._commands[command.__class__]
        except KeyError:
            plan = self._route(command, "command", self._commands)
        return plan(command)

    def ask(self, query: Query[R]) -> Coroutine[Any, Any, R]:
        """Dispatch a query to its handler; await the result.

        Raises:
            WrongMessageKindError: ``query`` is not a Query.
            NoHandlerError: no handler is registered for its type.
        """
        try:
            plan = self._queries[query.__class__]
        except KeyError:
            plan = self._route(query, "query", self._queries)
        return plan(query)

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
            publisher = self._events[event.__class__]
        except KeyError:
            publisher = self._route_event(event)
        if concurrently is None:
            return publisher(event)
        plans = self._event_plans_by_type[event.__class__]
        if concurrently:
            return self._publish_concurrently(event, plans)
        return _publish_in_order(event, plans, self._owners)

    _publish_any = publish

    def has_event_handlers(self, event_type: type) -> bool:
        """Whether :meth:`publish` of an ``event_type`` instance would run any handler
        (registered for the type or one of its base event types).

        Lets a caller skip building and awaiting a publish that would do nothing; the answer
        is computed once per type, from the plans ``publish`` uses.
        """
        plans = self._event_plans_by_type.get(event_type)
        if plans is None:
            if not (isinstance(event_type, type) and issubclass(event_type, Event)):
                return False
            self._events[event_type] = self._publisher_for(event_type)
            plans = self._event_plans_by_type[event_type]
        return bool(plans)

    async def _publish_concurrently(self, event: Event, plans: tuple[Plan, ...]) -> None:
        results = await asyncio.gather(*(p(event) for p in plans), return_exceptions=True)
        failures: list[tuple[object, BaseException]] = []
        for plan, result in zip(plans, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                failures.append((self._owners[plan], result))
        if failures:
            raise PublishError(event.__class__, failures)

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

    # -- introspection -------------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        """The registry this mediator was built from."""
        return self._registry

    # -- slow paths ----------------------------------------------------------------------

    def _route(self, message: object, kind: str, plans: dict[type, Plan]) -> Plan:
        return route(message, kind, plans)

    def _route_event(self, event: object) -> Plan:
        check_event(event)
        cls = type(event)
        publisher = self._publisher_for(cls)
        self._events[cls] = publisher
        return publisher


class _OuterScope:
    __slots__ = ("_metadata", "_scope", "_token")

    def __init__(self, metadata: Metadata | None) -> None:
        self._metadata = metadata

    async def __aenter__(self) -> Scope:
        scope = Scope(_scope_var.get())
        if self._metadata is not None:
            scope.metadata = self._metadata
        self._scope = scope
        self._token = _scope_var.set(scope)
        return scope

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


# -- compiling ---------------------------------------------------------------------------


def _iter_async(result: Any) -> Any:
    if hasattr(result, "__aiter__"):
        return result

    async def gen() -> AsyncIterator[Any]:
        for item in result:
            yield item

    return gen()


def _handler_call(spec: HandlerSpec, binding: Binding) -> Callable[[Any], Any]:
    """The unscoped call: ``f(message) -> awaitable``; valid when nothing is scoped."""
    func = spec.func
    if binding.instance is not None:
        func = partial(func, binding.instance.value)
    kwargs = binding.singleton_kwargs()
    if kwargs:
        func = partial(func, **kwargs)
    if spec.is_generator:
        gen_func = func

        async def stream_call(message: Any) -> Any:
            return _iter_async(gen_func(message))

        return stream_call
    if spec.is_async:
        if inspect.isfunction(func) or isinstance(func, partial):
            return func
        target = func

        async def call_async(message: Any) -> Any:
            return await target(message)

        return call_async
    sync_func = func

    async def call_sync(message: Any) -> Any:
        return sync_func(message)

    return call_sync


def _resolver_for(names: tuple[str, ...], providers: tuple[Provider, ...]) -> Any:
    """``resolve(scope) -> kwargs`` (sync) or ``async resolve(scope)`` when any is async."""
    items = tuple(zip(names, providers, strict=True))
    if any(p.is_async for p in providers):

        async def resolve_async(scope: Scope) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, p in items:
                if p.lifetime == "singleton":
                    out[name] = p.value
                elif p.is_async:
                    out[name] = await p.get(scope)  # type: ignore[misc]
                else:
                    out[name] = p.get(scope)  # type: ignore[misc]
            return out

        return resolve_async, True

    def resolve(scope: Scope) -> dict[str, Any]:
        return {
            name: (p.value if p.lifetime == "singleton" else p.get(scope))  # type: ignore[misc]
            for name, p in items
        }

    return resolve, False


def _handler_call_scoped(spec: HandlerSpec, binding: Binding) -> ScopedCall:
    func = spec.func
    resolve, is_async = _resolver_for(binding.names, binding.providers)
    inst = binding.instance
    # a single sync scoped dependency is the common case: keep it lean
    if (
        inst is None
        and not is_async
        and len(binding.providers) == 1
        and binding.providers[0].lifetime == "scoped"
        and spec.is_async
        and not spec.is_generator
    ):
        name = binding.names[0]
        get = binding.providers[0].get
        assert get is not None
        if _second_positional(func, name):

            def call_positional(message: Any, scope: Scope) -> Any:
                return func(message, get(scope))

            return call_positional

        def call_one(message: Any, scope: Scope) -> Any:
            return func(message, **{name: get(scope)})

        return call_one

    async def call(message: Any, scope: Scope) -> Any:
        kwargs = (await resolve(scope)) if is_async else resolve(scope)
        if inst is None:
            target = func
        elif inst.lifetime == "singleton":
            target = partial(func, inst.value)
        else:
            obj = inst.get(scope)  # type: ignore[misc]
            if inst.is_async:
                obj = await obj
            target = partial(func, obj)
        result = target(message, **kwargs)
        if spec.is_generator:
            return _iter_async(result)
        if spec.is_async:
            return await result
        return result

    return call


async def _publish_in_order(
    event: Event, plans: tuple[Plan, ...], owners: dict[Plan, object]
) -> None:
    failures: list[tuple[object, BaseException]] | None = None
    for plan in plans:
        try:
            await plan(event)
        except Exception as exc:  # noqa: BLE001 - collected and re-raised
            if failures is None:
                failures = []
            failures.append((owners[plan], exc))
    if failures:
        raise PublishError(event.__class__, failures)


_MAX_UNROLLED = 16


_MAX_INLINED_TYPES = 32


def _generate_publish(
    entries: list[tuple[type, tuple[Plan, ...]]],
    owners: dict[Plan, object],
    fallback: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., Coroutine[Any, Any, None]]:
    """Compile ``publish`` for one mediator: one branch per event type, one call site per
    handler, so a publish costs one coroutine and the handlers' own awaits.

    Types beyond the first few dozen, subclasses and ``concurrently=...`` calls take the
    ``fallback`` (the generic method). The source holds only fixed text and indices.
    """
    lines = [
        "async def publish(event, concurrently=None):",
        "    cls = event.__class__",
        "    if concurrently is None:",
    ]
    namespace: dict[str, Any] = {
        "_failed": _failed,
        "_PublishError": PublishError,
        "_fallback": fallback,
    }
    for t, (event_type, plans) in enumerate(entries[:_MAX_INLINED_TYPES]):
        if len(plans) > _MAX_UNROLLED:
            continue
        namespace[f"_E{t}"] = event_type
        lines += [f"        if cls is _E{t}:", "            failures = None"]
        for i, plan in enumerate(plans):
            namespace[f"_p{t}_{i}"] = plan
            namespace[f"_o{t}_{i}"] = owners[plan]
            lines += [
                "            try:",
                f"                await _p{t}_{i}(event)",
                "            except Exception as exc:",
                f"                failures = _failed(failures, _o{t}_{i}, exc)",
            ]
        lines += [
            "            if failures:",
            "                raise _PublishError(cls, failures)",
            "            return",
        ]
    lines += ["    await _fallback(event, concurrently=concurrently)"]
    exec(compile("\n".join(lines), "<cqrskit publish>", "exec"), namespace)
    publish: Callable[..., Coroutine[Any, Any, None]] = namespace["publish"]
    publish.__doc__ = Mediator.publish.__doc__
    return publish


def _failed(
    failures: list[tuple[object, BaseException]] | None, owner: object, exc: BaseException
) -> list[tuple[object, BaseException]]:
    if failures is None:
        failures = []
    failures.append((owner, exc))
    return failures


def _direct_factories(spec: HandlerSpec, binding: Binding) -> Plan | None:
    """A scope-free plan when every scoped parameter is a plain no-argument factory.

    Such a value is created for this dispatch and seen by the handler alone (no behavior
    takes dependencies), so no cache and no cleanup are needed: call the factory inline.
    """
    scoped = [p for p in binding.providers if p.lifetime == "scoped"]
    if (
        not scoped
        or binding.instance is not None
        or not spec.is_async
        or spec.is_generator
        or any(p.factory is None for p in scoped)
        or len({id(p) for p in scoped}) != len(scoped)
    ):
        return None
    func = spec.func
    if len(binding.providers) == 1 and _second_positional(func, binding.names[0]):
        factory = scoped[0].factory
        assert factory is not None

        def call_one(message: Any) -> Any:
            return func(message, factory())

        return call_one
    fixed = {
        n: p.value
        for n, p in zip(binding.names, binding.providers, strict=True)
        if p.lifetime == "singleton"
    }
    made = tuple(
        (n, p.factory)
        for n, p in zip(binding.names, binding.providers, strict=True)
        if p.lifetime == "scoped"
    )

    def call(message: Any) -> Any:
        kwargs = dict(fixed)
        for name, make in made:
            kwargs[name] = make()  # type: ignore[misc]
        return func(message, **kwargs)

    return call


def _distinct(plan: Plan) -> Plan:
    """A distinct callable wrapping ``plan`` (so it can key its own owner entry)."""

    def distinct(message: Any) -> Any:
        return plan(message)

    return distinct


def _second_positional(func: Callable[..., Any], name: str) -> bool:
    """Whether ``name`` is the positional parameter right after the message."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
    return (
        len(params) >= 2
        and params[1].name == name
        and params[1].kind in (params[1].POSITIONAL_ONLY, params[1].POSITIONAL_OR_KEYWORD)
    )


def _direct(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """An instance whose class defines ``__call__`` in Python is called through its bound
    method: CPython specializes that call, while calling the instance does not (~2x)."""
    call = inspect.getattr_static(type(behavior), "__call__", None)
    if inspect.isfunction(call) and not inspect.isfunction(behavior):
        return MethodType(call, behavior)
    return behavior


def _fold_plain(b: Binding, inner: Callable[[Any], Any]) -> Plan:
    behavior = _direct(b.func)
    if b.providers:  # singleton dependencies only: bind them once
        behavior = partial(behavior, **b.singleton_kwargs())

    def step(message: Any) -> Any:
        return behavior(message, inner)

    return step


def _fold_scoped(b: Binding, inner: ScopedCall) -> ScopedCall:
    behavior = _direct(b.func)
    if not b.providers:

        def step(message: Any, scope: Scope) -> Any:
            return behavior(message, partial(_call_inner, inner, scope))

        return step
    if not any(p.is_async for p in b.providers):
        # singletons bound once; scoped values fetched per call with no dict built
        # beyond the call's own keyword arguments, and no extra coroutine
        fixed = {
            n: p.value
            for n, p in zip(b.names, b.providers, strict=True)
            if p.lifetime == "singleton"
        }
        per_call = tuple(
            (n, p.get) for n, p in zip(b.names, b.providers, strict=True) if p.lifetime == "scoped"
        )
        bound = partial(behavior, **fixed) if fixed else behavior
        if len(per_call) == 1:
            name, get = per_call[0]
            assert get is not None

            def step_one(message: Any, scope: Scope) -> Any:
                return bound(message, partial(_call_inner, inner, scope), **{name: get(scope)})

            return step_one

        def step_sync_deps(message: Any, scope: Scope) -> Any:
            kwargs = {n: get(scope) for n, get in per_call}  # type: ignore[misc]
            return bound(message, partial(_call_inner, inner, scope), **kwargs)

        return step_sync_deps

    resolve, is_async = _resolver_for(b.names, b.providers)

    async def step_deps(message: Any, scope: Scope) -> Any:
        kwargs = (await resolve(scope)) if is_async else resolve(scope)
        return await behavior(message, partial(_call_inner, inner, scope), **kwargs)

    return step_deps


def _call_inner(inner: ScopedCall, scope: Scope, message: Any) -> Any:
    return inner(message, scope)


def _with_scope(chain: ScopedCall) -> Plan:
    new_scope = dict.__new__
    get_current = _scope_var.get
    set_current = _scope_var.set
    reset_current = _scope_var.reset

    async def plan(message: Any) -> Any:
        scope = new_scope(Scope)  # an empty Scope without a Python-level __init__ call
        parent = get_current()
        if parent is not None:
            scope.parent = parent
        token = set_current(scope)
        try:
            result = await chain(message, scope)
        except BaseException as exc:
            try:
                if EXITS in scope:
                    await scope.aclose(exc)
            finally:
                reset_current(token)
            raise
        if EXITS in scope:
            try:
                if ASYNC_EXITS in scope:
                    await scope.aclose(None)
                else:
                    scope.close_sync(None)
            finally:
                reset_current(token)
        else:
            reset_current(token)
        return result

    return plan


def _with_stream_scope(chain: ScopedCall) -> Plan:
    """Like :func:`_with_scope`, but the scope stays open until the stream is exhausted
    or closed: a streaming handler reads from its scoped dependencies while it yields."""
    get_current = _scope_var.get
    set_current = _scope_var.set
    reset_current = _scope_var.reset

    async def plan(message: Any) -> Any:
        scope = Scope(get_current())
        token = set_current(scope)
        try:
            items = await chain(message, scope)
        except BaseException as exc:
            try:
                await scope.aclose(exc)
            finally:
                reset_current(token)
            raise
        reset_current(token)
        return _closing_stream(items, scope)

    return plan


async def _closing_stream(items: Any, scope: Scope) -> AsyncIterator[Any]:
    try:
        async for item in items:
            yield item
    except BaseException as exc:  # GeneratorExit too: closing early is thrown in, as in Python
        close = getattr(items, "aclose", None)
        if close is not None and isinstance(exc, GeneratorExit):
            await close()
        await scope.aclose(exc)
        raise
    await scope.aclose(None)
