"""From a message to its plan: what both mediators share around the compiled plans.

:class:`MediatorCore` builds the tables (a plan per command and query type, the handler
entries per event type) and, for the common sizes, replaces the generic ``send``, ``ask``
and ``publish`` of a mediator with code generated for its own message types. The generic
methods, written in :class:`~cqrskit.mediator.Mediator` and
:class:`~cqrskit.sync.SyncMediator`, stay the readable path and serve everything the
generated code does not cover; the slow paths (a wrong kind of message, a subclass of a
registered message, no handler) are here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar, TypeVar

from cqrskit._dispatch.compiler import Accept, Compiler
from cqrskit._dispatch.flavours import Entries, Flavour, Plan, failed
from cqrskit._plan import Planner, check_expected, check_result
from cqrskit.dependencies import Resolver
from cqrskit.errors import NoHandlerError, PublishError, WrongMessageKindError, describe
from cqrskit.messages import Event
from cqrskit.pipeline._core import ScopedBehavior
from cqrskit.registry import HandlerSpec, Registry, message_kind

__all__ = [
    "MediatorCore",
    "check_event",
    "generate_dispatch",
    "generate_publish",
    "publish_concurrently",
    "route",
]

P = TypeVar("P")
_VERBS = {"command": "send", "query": "ask", "event": "publish"}


class MediatorCore:
    """The build and the lookups of a mediator; subclasses write the verbs.

    A subclass sets ``_flavour`` and calls :meth:`_build` from its ``__init__``; it may
    refuse what its flavour cannot run with :meth:`_check_registry` and the ``accept``
    argument of :meth:`_build`.
    """

    _flavour: ClassVar[Flavour]
    _concurrent = False  # publish runs the handlers of an event concurrently

    def _build(
        self,
        registry: Registry,
        behaviors: Sequence[Callable[..., Any] | ScopedBehavior],
        resolver: Resolver | Sequence[Resolver] | None,
        accept: Accept | None = None,
    ) -> None:
        if resolver is None:
            resolvers: list[Resolver] = []
        elif isinstance(resolver, Sequence):
            resolvers = list(resolver)
        else:
            resolvers = [resolver]
        self._registry = registry
        self._behaviors = tuple(behaviors)
        self._compiler = Compiler(self._flavour, Planner(self, resolvers), self._behaviors, accept)
        check_expected(registry)
        self._check_registry()
        self._commands = self._plans(registry.commands())
        self._queries = self._plans(registry.queries())
        self._events: dict[type, Entries] = {
            t: self._compiler.event_entries(registry, t) for t in registry.events()
        }
        self._specialize()

    def _check_registry(self) -> None:
        """Raise for a handler or behavior this flavour cannot run (none by default)."""

    def _plans(self, specs: dict[type, HandlerSpec]) -> dict[type, Plan]:
        plans: dict[type, Plan] = {}
        for mtype, spec in specs.items():
            check_result(spec)
            plans[mtype] = self._compiler.compile(spec)
        return plans

    def _specialize(self) -> None:
        """Shadow the generic verbs with code generated for this mediator's message types
        (see :func:`generate_dispatch` and :func:`generate_publish` for the cases)."""
        cls = type(self)
        is_async = self._flavour.is_async
        for verb, kind, plans in (
            ("send", "command", self._commands),
            ("ask", "query", self._queries),
        ):
            dispatch = generate_dispatch(verb, kind, plans, sync=not is_async)
            if dispatch is not None:
                dispatch.__doc__ = getattr(cls, verb).__doc__
                setattr(self, verb, dispatch)
        if self._events and not self._concurrent:
            generic = getattr(cls, "publish")  # noqa: B009 - defined by the subclass
            publish = generate_publish(self._flavour, self._events, partial(generic, self))
            publish.__doc__ = generic.__doc__
            setattr(self, "publish", publish)  # noqa: B010

    def _route_event(self, event: object) -> Entries:
        """Slow path of ``publish``: check the kind, compile the entries of a new type."""
        check_event(event)
        cls = type(event)
        entries = self._events[cls] = self._compiler.event_entries(self._registry, cls)
        return entries

    @property
    def registry(self) -> Registry:
        """The registry this mediator was built from."""
        return self._registry


# -- slow paths ----------------------------------------------------------------------------


def _wrong_kind(verb: str, kind: str, cls: type) -> WrongMessageKindError:
    actual = message_kind(cls)
    right = _VERBS.get(actual or "")
    what = f"a {actual}" if actual else "not a cqrskit message"
    article = "an" if kind == "event" else "a"
    base = "Event" if kind == "event" else f"{kind.title()}[Result]"
    return WrongMessageKindError(
        f"mediator.{verb}() takes {article} {kind}, but {describe(cls)} is {what}.",
        message_type=cls,
        hint=(
            f"use mediator.{right}() for it."
            if right
            else f"subclass cqrskit.{base} for messages given to {verb}()."
        ),
    )


def route(
    message: object, kind: str, plans: dict[type, P], *, verb: str | None = None, sync: bool = False
) -> P:
    """Slow path of ``send``/``ask``: check the kind, then find a plan by base class.

    A plan found for a base class is cached under the message's own class.

    Raises:
        WrongMessageKindError: the message is not of ``kind``.
        NoHandlerError: neither its class nor a base class has a handler.
    """
    cls = type(message)
    if message_kind(cls) != kind:
        raise _wrong_kind(verb or _VERBS[kind], kind, cls)
    for base in cls.__mro__[1:]:
        plan = plans.get(base)
        if plan is not None:
            plans[cls] = plan
            return plan
    prefix = "def" if sync else "async def"
    raise NoHandlerError(
        f"no handler registered for {kind} {describe(cls)}.",
        message_type=cls,
        hint=f"register one: @registry.handler {prefix} handle(msg: {cls.__name__}) -> ...",
    )


def check_event(event: object) -> None:
    """Slow path of ``publish``: refuse anything that is not an Event."""
    if not isinstance(event, Event):
        raise _wrong_kind("publish", "event", type(event))


# -- generated verbs -----------------------------------------------------------------------

_MAX_CHAIN = 8


def generate_dispatch(
    verb: str, kind: str, plans: dict[type, Any], *, sync: bool
) -> Callable[[Any], Any] | None:
    """Compile ``send``/``ask`` for a mediator with few message types of ``kind``.

    Fast path — up to eight types: each is tested with ``is`` before the dictionary lookup,
    which is cheaper than hashing the type and gives each plan its own (monomorphic) call
    site. Returns ``None`` when there are more types; the generic method is as fast then.
    The same code serves both flavours (an async plan's awaitable is returned, not awaited).
    The generated source holds only fixed text and integer indices.
    """
    if not plans or len(plans) > _MAX_CHAIN:
        return None
    namespace: dict[str, Any] = {"_plans": plans, "_route": route, "_kind": kind, "_sync": sync}
    lines = [f"def {verb}({kind}):", f"    cls = {kind}.__class__"]
    for i, (mtype, plan) in enumerate(plans.items()):
        namespace[f"_T{i}"] = mtype
        namespace[f"_P{i}"] = plan
        lines += [f"    if cls is _T{i}:", f"        return _P{i}({kind})"]
    lines += [
        "    try:",
        "        plan = _plans[cls]",
        "    except KeyError:",
        f"        plan = _route({kind}, _kind, _plans, sync=_sync)",
        f"    return plan({kind})",
    ]
    exec(compile("\n".join(lines), f"<cqrskit {verb}>", "exec"), namespace)
    dispatch: Callable[[Any], Any] = namespace[verb]
    return dispatch


_MAX_UNROLLED = 16
_MAX_INLINED_TYPES = 32


def generate_publish(
    flavour: Flavour, events: dict[type, Entries], fallback: Callable[..., Any]
) -> Callable[..., Any]:
    """Compile ``publish`` for one mediator: one branch per event type, one call site per
    handler, so a publish costs the handlers' own calls (and, async, one coroutine).

    Fast path — the first few dozen event types with up to sixteen handlers each; other
    types, subclasses and (async) ``concurrently=...`` calls take ``fallback``, the generic
    method. The source holds only fixed text and indices.
    """
    # async: the branches run only when no ``concurrently=`` was given
    pad = " " * 8 if flavour.is_async else " " * 4
    wait = "await " if flavour.is_async else ""
    namespace: dict[str, Any] = {
        "_failed": failed,
        "_PublishError": PublishError,
        "_fallback": fallback,
    }
    branches: list[str] = []
    for t, (event_type, entries) in enumerate(list(events.items())[:_MAX_INLINED_TYPES]):
        if len(entries) > _MAX_UNROLLED:
            continue
        namespace[f"_E{t}"] = event_type
        branches += [f"{pad}if cls is _E{t}:", f"{pad}    failures = None"]
        for i, (owner, plan) in enumerate(entries):
            namespace[f"_p{t}_{i}"] = plan
            namespace[f"_o{t}_{i}"] = owner
            branches += [
                f"{pad}    try:",
                f"{pad}        {wait}_p{t}_{i}(event)",
                f"{pad}    except Exception as exc:",
                f"{pad}        failures = _failed(failures, _o{t}_{i}, exc)",
            ]
        branches += [
            f"{pad}    if failures:",
            f"{pad}        raise _PublishError(cls, failures)",
            f"{pad}    return",
        ]
    if flavour.is_async:
        lines = ["async def publish(event, concurrently=None):", "    cls = event.__class__"]
        if branches:
            lines += ["    if concurrently is None:", *branches]
        lines.append("    await _fallback(event, concurrently=concurrently)")
    else:
        lines = [
            "def publish(event):",
            "    cls = event.__class__",
            *branches,
            "    _fallback(event)",
        ]
    exec(compile("\n".join(lines), f"<cqrskit {flavour.name} publish>", "exec"), namespace)
    publish: Callable[..., Any] = namespace["publish"]
    return publish


async def publish_concurrently(event: Event, entries: Entries) -> None:
    """Run every handler of ``event`` concurrently; failures raised together (async only)."""
    results = await asyncio.gather(*(plan(event) for _, plan in entries), return_exceptions=True)
    failures: list[tuple[object, BaseException]] = []
    for (owner, _), result in zip(entries, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result
            failures.append((owner, result))
    if failures:
        raise PublishError(event.__class__, failures)
