"""Every shape the dispatch compiler builds, run under both flavours.

The async ``Mediator`` and the ``SyncMediator`` share one compiler (``cqrskit._dispatch``);
each test here runs the same registry under both and checks results, the values handlers
and behaviors receive, and when per-dispatch values are made and cleaned up. Handlers are
written once as plain ``def`` and made ``async def`` for the async flavour.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, make_dataclass
from typing import Any

import pytest

from cqrskit import (
    Command,
    Dependencies,
    Event,
    Mediator,
    NoHandlerError,
    PublishError,
    Query,
    Registry,
    Scope,
    SyncMediator,
    WrongMessageKindError,
    current_scope,
)


@dataclass(frozen=True)
class Do(Command[str]):
    text: str


@dataclass(frozen=True)
class DoLoud(Do):
    pass


@dataclass(frozen=True)
class Echo(Query[str]):
    text: str


@dataclass(frozen=True)
class LoudEcho(Echo):
    pass


@dataclass(frozen=True)
class Unhandled(Query[str]):
    pass


@dataclass(frozen=True)
class Rows(Query[Iterator[str]]):
    n: int


@dataclass(frozen=True)
class Happened(Event):
    what: str


@dataclass(frozen=True)
class HappenedLater(Happened):
    pass


class Config:
    def __init__(self, name: str = "cfg") -> None:
        self.name = name


class Session:
    made = 0

    def __init__(self) -> None:
        Session.made += 1
        self.n = Session.made


class Audit:
    pass


FLAVOURS = ["async", "sync"]


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def native(flavour: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as the flavour's own kind of handler: ``async def`` for the async mediator."""
    if flavour == "sync":
        return fn
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        async def agen(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            for item in fn(*args, **kwargs):
                yield item

        return agen

    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return call


def build(flavour: str, registry: Registry, **options: Any) -> Any:
    return (
        Mediator(registry, **options) if flavour == "async" else SyncMediator(registry, **options)
    )


def run(value: Any) -> Any:
    """The result of a dispatch: awaited for the async flavour."""
    if inspect.isawaitable(value):

        async def wait() -> Any:
            return await value

        return asyncio.run(wait())
    return value


def rows(mediator: Any, query: Rows, *, take: int | None = None) -> list[str]:
    """Consume a stream (the first ``take`` items, then close it)."""
    if isinstance(mediator, SyncMediator):
        it = mediator.stream(query)
        out = [x for _, x in zip(range(take if take is not None else 10**6), it, strict=False)]
        it.close()  # type: ignore[attr-defined]
        return out

    async def consume() -> list[str]:
        out: list[str] = []
        agen = mediator.stream(query)
        async for item in agen:
            out.append(item)
            if take is not None and len(out) == take:
                break
        await agen.aclose()
        return out

    return asyncio.run(consume())


def tracked(log: list[str], name: str) -> Callable[[], Iterator[Any]]:
    """A generator factory: logs when its value is made and closed (with the error seen)."""

    def factory() -> Iterator[Any]:
        value = Session()
        log.append(f"open {name}")
        try:
            yield value
        except BaseException as exc:
            log.append(f"close {name} after {type(exc).__name__}")
            raise
        log.append(f"close {name}")

    return factory


# -- handler calls -------------------------------------------------------------------------


def test_unscoped_handler_is_the_plan_itself(flavour: str) -> None:
    registry = Registry()

    def do(cmd: Do) -> str:
        return "did " + cmd.text

    handler = native(flavour, do)
    registry.add(handler, Do)
    mediator = build(flavour, registry)
    assert run(mediator.send(Do("a"))) == "did a"
    assert mediator._commands[Do] is handler  # no wrapper frame on the hot path


def test_singletons_and_handler_class_instances_are_bound_once(flavour: str) -> None:
    registry = Registry()
    instances: list[object] = []

    class DoHandler:
        def __init__(self, config: Config) -> None:
            self.config = config
            instances.append(self)

        def handle(self, cmd: Do, config: Config) -> str:
            return f"{cmd.text} {self.config.name} {config.name}"

    if flavour == "async":
        plain = DoHandler.handle

        async def handle(self: Any, cmd: Do, config: Config) -> str:
            return plain(self, cmd, config)

        DoHandler.handle = handle  # type: ignore[method-assign, assignment]
    registry.add(DoHandler)
    deps = Dependencies()
    deps.singleton(Config, Config("one"))
    mediator = build(flavour, registry, resolver=deps)
    assert run(mediator.send(Do("a"))) == "a one one"
    assert run(mediator.send(Do("b"))) == "b one one"
    assert len(instances) == 1


def test_scoped_handler_class_instance_is_made_per_dispatch(flavour: str) -> None:
    registry = Registry()
    log: list[str] = []

    class DoHandler:
        def __init__(self, session: Session) -> None:
            self.session = session

        def handle(self, cmd: Do) -> str:
            return f"{cmd.text}{self.session.n}"

    if flavour == "async":
        plain = DoHandler.handle

        async def handle(self: Any, cmd: Do) -> str:
            return plain(self, cmd)

        DoHandler.handle = handle  # type: ignore[method-assign, assignment]
    registry.add(DoHandler)
    deps = Dependencies()
    deps.scoped(Session, tracked(log, "session"))
    mediator = build(flavour, registry, resolver=deps)
    first = run(mediator.send(Do("x")))
    second = run(mediator.send(Do("x")))
    assert first != second
    assert log == ["open session", "close session"] * 2


@pytest.mark.parametrize("positional", [True, False])
def test_plain_factory_is_called_per_dispatch_without_a_scope(
    flavour: str, positional: bool
) -> None:
    registry = Registry()
    seen: list[tuple[int, Scope | None]] = []

    if positional:

        def do(cmd: Do, session: Session) -> str:
            seen.append((session.n, current_scope()))
            return cmd.text

    else:

        def do(cmd: Do, *, session: Session) -> str:
            seen.append((session.n, current_scope()))
            return cmd.text

    registry.add(native(flavour, do), Do)
    deps = Dependencies()
    deps.scoped(Session, Session)
    mediator = build(flavour, registry, resolver=deps)
    run(mediator.send(Do("a")))
    run(mediator.send(Do("b")))
    (n1, scope1), (n2, scope2) = seen
    assert n2 == n1 + 1  # a fresh value per dispatch
    assert (scope1, scope2) == (None, None)  # and no scope was opened for it


def test_plain_factories_beside_singletons(flavour: str) -> None:
    registry = Registry()

    def do(cmd: Do, config: Config, session: Session, audit: Audit) -> str:
        assert isinstance(audit, Audit)
        return f"{config.name} {session.n > 0}"

    registry.add(native(flavour, do), Do)
    deps = Dependencies()
    deps.singleton(Config, Config("c"))
    deps.scoped(Session, Session)
    deps.scoped(Audit, Audit)
    mediator = build(flavour, registry, resolver=deps)
    assert run(mediator.send(Do("a"))) == "c True"


@pytest.mark.parametrize("positional", [True, False])
def test_one_scoped_dependency_is_closed_after_the_handler(flavour: str, positional: bool) -> None:
    registry = Registry()
    log: list[str] = []

    if positional:

        def do(cmd: Do, session: Session) -> str:
            log.append("handler")
            assert current_scope() is not None
            return cmd.text

    else:

        def do(cmd: Do, *, session: Session) -> str:
            log.append("handler")
            assert current_scope() is not None
            return cmd.text

    registry.add(native(flavour, do), Do)
    deps = Dependencies()
    deps.scoped(Session, tracked(log, "session"))
    mediator = build(flavour, registry, resolver=deps)
    assert run(mediator.send(Do("a"))) == "a"
    assert log == ["open session", "handler", "close session"]
    assert current_scope() is None


def test_several_dependencies_close_in_reverse_and_see_the_error(flavour: str) -> None:
    registry = Registry()
    log: list[str] = []

    def do(cmd: Do, config: Config, session: Session, audit: Audit) -> str:
        log.append("handler")
        if cmd.text == "fail":
            raise LookupError("boom")
        return config.name

    registry.add(native(flavour, do), Do)
    deps = Dependencies()
    deps.singleton(Config, Config("c"))
    deps.scoped(Session, tracked(log, "session"))
    deps.scoped(Audit, tracked(log, "audit"))
    mediator = build(flavour, registry, resolver=deps)
    assert run(mediator.send(Do("ok"))) == "c"
    assert log == ["open session", "open audit", "handler", "close audit", "close session"]
    log.clear()
    with pytest.raises(LookupError, match="boom"):
        run(mediator.send(Do("fail")))
    assert log == [
        "open session",
        "open audit",
        "handler",
        "close audit after LookupError",
        "close session after LookupError",
    ]
    assert current_scope() is None


# -- behaviors ------------------------------------------------------------------------------


def passing(log: list[str], name: str) -> Callable[..., Any]:
    """A behavior written for both flavours: it returns ``next(message)`` unawaited."""

    def behavior(message: Any, next: Callable[[Any], Any]) -> Any:
        log.append(name)
        return next(message)

    return behavior


def test_behaviors_fold_outermost_first(flavour: str) -> None:
    registry = Registry()
    log: list[str] = []

    def do(cmd: Do) -> str:
        log.append("handler")
        return cmd.text

    registry.add(native(flavour, do), Do)
    mediator = build(flavour, registry, behaviors=[passing(log, "outer"), passing(log, "inner")])
    assert run(mediator.send(Do("a"))) == "a"
    assert log == ["outer", "inner", "handler"]


def test_behavior_dependencies_in_every_shape(flavour: str) -> None:
    registry = Registry()
    log: list[str] = []

    def do(cmd: Do, session: Session) -> str:
        log.append(f"handler {session.n}")
        return cmd.text

    def with_config(message: Any, next: Callable[[Any], Any], config: Config) -> Any:
        log.append(f"config {config.name}")
        return next(message)

    def with_session(message: Any, next: Callable[[Any], Any], session: Session) -> Any:
        log.append(f"session {session.n}")
        return next(message)

    def with_both(
        message: Any, next: Callable[[Any], Any], config: Config, session: Session, audit: Audit
    ) -> Any:
        log.append(f"both {config.name} {session.n} {type(audit).__name__}")
        return next(message)

    registry.add(native(flavour, do), Do)
    deps = Dependencies()
    deps.singleton(Config, Config("c"))
    deps.scoped(Session, tracked(log, "session"))
    deps.scoped(Audit, Audit)
    mediator = build(
        flavour,
        registry,
        resolver=deps,
        behaviors=[passing(log, "plain"), with_config, with_session, with_both],
    )
    assert run(mediator.send(Do("a"))) == "a"
    n = Session.made
    # one Session per dispatch, shared by the behaviors and the handler, closed at the end
    assert log == [
        "plain",
        "config c",
        "open session",
        f"session {n}",
        f"both c {n} Audit",
        f"handler {n}",
        "close session",
    ]


def test_behavior_dependencies_whatever_their_parameter_names(flavour: str) -> None:
    # the fold passes them as keywords of one generated call: parameter names that are
    # also names inside that call must still reach the right parameter
    registry = Registry()
    seen: dict[str, Any] = {}

    def do(cmd: Do, session: Session) -> str:
        seen["handler scope"] = current_scope()
        seen["handler session"] = session
        return cmd.text

    def behavior(
        msg: Any,
        next: Callable[[Any], Any],
        message: Config,
        scope: Session,
        _inner: Scope,
        _v0: Audit,
    ) -> Any:
        seen.update(message=message, scope=scope, inner=_inner, audit=_v0, msg=msg)
        return next(msg)

    registry.add(native(flavour, do), Do)
    config = Config("c")
    deps = Dependencies()
    deps.singleton(Config, config)
    deps.scoped(Session, Session)
    deps.scoped(Audit, Audit)
    mediator = build(flavour, registry, resolver=deps, behaviors=[behavior])
    assert run(mediator.send(Do("a"))) == "a"
    assert seen["msg"] == Do("a")
    assert seen["message"] is config
    assert seen["scope"] is seen["handler session"]  # one per dispatch, shared
    assert isinstance(seen["inner"], Scope)
    assert seen["inner"] is seen["handler scope"]  # the dispatch's own scope
    assert isinstance(seen["audit"], Audit)


def test_behavior_with_singletons_only_needs_no_scope(flavour: str) -> None:
    registry = Registry()
    scopes: list[Scope | None] = []

    def do(cmd: Do) -> str:
        scopes.append(current_scope())
        return cmd.text

    def with_config(message: Any, next: Callable[[Any], Any], config: Config) -> Any:
        return next(message.__class__(message.text + config.name))

    registry.add(native(flavour, do), Do)
    deps = Dependencies()
    deps.singleton(Config, Config("!"))
    mediator = build(flavour, registry, resolver=deps, behaviors=[with_config])
    assert run(mediator.send(Do("a"))) == "a!"
    assert scopes == [None]


# -- streams ---------------------------------------------------------------------------------


def test_stream_keeps_its_scope_until_the_stream_ends(flavour: str) -> None:
    registry = Registry()
    log: list[str] = []

    def rows_handler(q: Rows, session: Session, audit: Audit) -> Iterator[str]:
        try:
            for i in range(q.n):
                log.append(f"row {i}")
                yield f"r{i}"
        finally:
            log.append("handler closed")

    registry.add(native(flavour, rows_handler), Rows)
    deps = Dependencies()
    deps.scoped(Session, tracked(log, "session"))
    deps.scoped(Audit, Audit)
    mediator = build(flavour, registry, resolver=deps)
    assert rows(mediator, Rows(2)) == ["r0", "r1"]
    assert log == ["open session", "row 0", "row 1", "handler closed", "close session"]
    log.clear()
    # closed early: the handler's own stream closes before its scoped values do
    assert rows(mediator, Rows(5), take=1) == ["r0"]
    assert log == [
        "open session",
        "row 0",
        "handler closed",
        "close session after GeneratorExit",
    ]


# -- publish -----------------------------------------------------------------------------------


def test_publish_runs_every_handler_and_raises_failures_together(flavour: str) -> None:
    registry = Registry()
    log: list[str] = []

    def first(e: Happened) -> None:
        log.append("first " + e.what)
        raise ValueError("first failed")

    def second(e: Happened) -> None:
        log.append("second " + e.what)

    def later(e: HappenedLater) -> None:
        log.append("later " + e.what)
        raise KeyError("later failed")

    handlers = [native(flavour, f) for f in (first, second)]
    for h in handlers:
        registry.add(h, Happened)
    later_handler = native(flavour, later)
    registry.add(later_handler, HappenedLater)
    mediator = build(flavour, registry)
    assert "publish" in vars(mediator)  # generated for this mediator's event types
    with pytest.raises(PublishError) as info:
        run(mediator.publish(Happened("a")))
    assert [owner for owner, _ in info.value.failures] == [handlers[0]]
    assert log == ["first a", "second a"]
    log.clear()
    with pytest.raises(PublishError) as info:
        run(mediator.publish(HappenedLater("b")))
    assert [owner for owner, _ in info.value.failures] == [handlers[0], later_handler]
    assert log == ["first b", "second b", "later b"]


def test_publish_of_a_subclass_and_of_many_handlers_takes_the_generic_path(
    flavour: str,
) -> None:
    registry = Registry()
    seen: list[int] = []
    for i in range(17):  # one more than the generated code unrolls

        def on(e: Happened, i: int = i) -> None:
            seen.append(i)

        registry.add(native(flavour, on), Happened)
    mediator = build(flavour, registry)
    run(mediator.publish(Happened("x")))
    assert seen == list(range(17))
    seen.clear()
    run(mediator.publish(HappenedLater("y")))  # a type the generated code does not know
    assert seen == list(range(17))


# -- generated verbs ---------------------------------------------------------------------------


def test_generated_verbs_keep_the_generic_parameter_names(flavour: str) -> None:
    registry = Registry()

    def do(cmd: Do) -> str:
        return cmd.text

    registry.add(native(flavour, do), Do)
    mediator = build(flavour, registry)
    assert "send" in vars(mediator)
    assert run(mediator.send(command=Do("kw"))) == "kw"
    assert run(mediator.send(DoLoud("sub"))) == "sub"


def test_many_message_types_keep_the_generic_send(flavour: str) -> None:
    registry = Registry()
    types = []
    for i in range(9):
        cls: Any = make_dataclass(f"Cmd{i}", [("n", int)], bases=(Command[int],), frozen=True)

        def handle(cmd: Any, i: int = i) -> int:
            return int(cmd.n) + i

        registry.add(native(flavour, handle), cls)
        types.append(cls)

    def echo(q: Echo) -> str:
        return q.text

    registry.add(native(flavour, echo), Echo)
    mediator = build(flavour, registry)
    assert "send" not in vars(mediator)
    assert [run(mediator.send(t(1))) for t in types] == list(range(1, 10))
    with pytest.raises(WrongMessageKindError, match=r"use mediator\.ask\(\)"):
        mediator.send(Echo("q"))
    # the generic methods also serve calls through the class (generated ones shadow them)
    generic = type(mediator)
    assert run(generic.ask(mediator, Echo("q"))) == "q"
    assert run(generic.ask(mediator, LoudEcho("sub"))) == "sub"
    with pytest.raises(NoHandlerError, match="Unhandled"):
        generic.ask(mediator, Unhandled())


# -- tracebacks ------------------------------------------------------------------------------


def test_tracebacks_show_the_flavours_own_source(flavour: str) -> None:
    registry = Registry()

    def do(cmd: Do, session: Session, audit: Audit) -> str:
        raise RuntimeError("in handler")

    registry.add(native(flavour, do), Do)
    deps = Dependencies()
    deps.scoped(Session, tracked([], "session"))
    deps.scoped(Audit, Audit)
    mediator = build(flavour, registry, resolver=deps)
    with pytest.raises(RuntimeError) as info:
        run(mediator.send(Do("a")))
    text = "".join(traceback.format_exception(info.value))
    expected = "await chain(scope, message)" if flavour == "async" else "= chain(scope, message)"
    assert f"<cqrskit {flavour} dispatch>" in text
    assert expected in text
    if flavour == "sync":
        assert "await" not in text


# -- async only: adapters and async factories -------------------------------------------------


async def test_plain_def_handlers_and_bound_methods_under_the_async_mediator() -> None:
    log: list[str] = []

    class Service:
        async def do(self, cmd: Do) -> str:
            return "method " + cmd.text

    def rows_handler(q: Rows) -> Iterator[str]:
        yield from (f"r{i}" for i in range(q.n))

    def on(e: Happened, session: Session, audit: Audit) -> None:
        log.append(f"plain {e.what}")

    registry = Registry()
    registry.add(Service().do, Do)
    registry.add(rows_handler, Rows)
    registry.add(on, Happened)
    deps = Dependencies()
    deps.scoped(Session, tracked(log, "session"))
    deps.scoped(Audit, Audit)
    mediator = Mediator(registry, resolver=deps)
    assert await mediator.send(Do("a")) == "method a"
    assert [r async for r in mediator.stream(Rows(2))] == ["r0", "r1"]
    await mediator.publish(Happened("e"))
    assert log == ["open session", "plain e", "close session"]


async def test_async_factories_for_handlers_instances_and_behaviors() -> None:
    log: list[str] = []

    async def open_session() -> AsyncIterator[Session]:
        log.append("open")
        yield Session()
        log.append("close")

    class DoHandler:
        def __init__(self, session: Session) -> None:
            self.session = session

        async def handle(self, cmd: Do, config: Config, audit: Audit) -> str:
            return f"{cmd.text} {config.name} {self.session.n > 0}"

    async def with_session(
        message: Any, next: Callable[[Any], Any], session: Session, config: Config, audit: Audit
    ) -> Any:
        log.append(f"behavior {config.name}")
        return await next(message)

    registry = Registry()
    registry.add(DoHandler)
    deps = Dependencies()
    deps.scoped(Session, open_session)
    deps.singleton(Config, Config("c"))
    deps.scoped(Audit, Audit)
    mediator = Mediator(registry, resolver=deps, behaviors=[with_session])
    assert await mediator.send(Do("a")) == "a c True"
    assert log == ["open", "behavior c", "close"]
