"""Behaviors: order, scoping to message kinds, dependencies, folded once at build."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from cqrskit import (
    Command,
    Dependencies,
    DependencyError,
    Event,
    Mediator,
    Query,
    RegistrationError,
    Registry,
    applies_to,
    for_commands,
    for_events,
    for_queries,
)
from cqrskit._plan import Planner
from cqrskit.pipeline import ScopedBehavior

Next = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True)
class OpenAccount(Command[str]):
    owner: str


@dataclass(frozen=True)
class CloseAccount(Command[str]):
    account_id: str


@dataclass(frozen=True)
class GetAccount(Query[str]):
    account_id: str


@dataclass(frozen=True)
class AccountOpened(Event):
    account_id: str


class Audit:
    def __init__(self) -> None:
        self.lines: list[str] = []


class Session:
    pass


def build(behaviors: list[Any], resolver: Any = None) -> tuple[Mediator, list[str]]:
    registry = Registry()
    log: list[str] = []

    @registry.handler
    async def open_account(cmd: OpenAccount) -> str:
        log.append("handler")
        return "opened"

    @registry.handler
    async def close_account(cmd: CloseAccount) -> str:
        log.append("handler")
        return "closed"

    @registry.handler
    async def get_account(q: GetAccount) -> str:
        log.append("handler")
        return "view"

    @registry.handler
    async def on_opened(e: AccountOpened) -> None:
        log.append("handler")

    return Mediator(registry, behaviors=behaviors, resolver=resolver), log


def tracer(name: str, log: list[str]) -> Callable[[Any, Next], Awaitable[Any]]:
    async def behavior(message: Any, next: Next) -> Any:
        log.append(f"{name}-before")
        result = await next(message)
        log.append(f"{name}-after")
        return result

    behavior.__name__ = name
    return behavior


async def test_behaviors_run_outermost_first() -> None:
    log: list[str] = []
    mediator, handler_log = build([tracer("a", log), tracer("b", log)])
    assert await mediator.send(OpenAccount("x")) == "opened"
    assert log == ["a-before", "b-before", "b-after", "a-after"]
    assert handler_log == ["handler"]


async def test_behavior_can_replace_the_result_and_short_circuit() -> None:
    async def cached(message: Any, next: Next) -> Any:
        if isinstance(message, GetAccount) and message.account_id == "cached":
            return "from-cache"
        return "wrapped:" + await next(message)

    mediator, log = build([cached])
    assert await mediator.ask(GetAccount("cached")) == "from-cache"
    assert log == []
    assert await mediator.ask(GetAccount("other")) == "wrapped:view"
    assert log == ["handler"]


async def test_scoped_behaviors_apply_only_to_their_kinds() -> None:
    log: list[str] = []
    mediator, _ = build(
        [
            for_commands(tracer("cmd", log)),
            for_queries(tracer("qry", log)),
            for_events(tracer("evt", log)),
            applies_to(tracer("close", log), CloseAccount),
            applies_to(tracer("open-or-query", log), OpenAccount, Query),
        ]
    )
    await mediator.send(OpenAccount("x"))
    assert log == ["cmd-before", "open-or-query-before", "open-or-query-after", "cmd-after"]
    log.clear()
    await mediator.send(CloseAccount("x"))
    assert log == ["cmd-before", "close-before", "close-after", "cmd-after"]
    log.clear()
    await mediator.ask(GetAccount("x"))
    assert log == ["qry-before", "open-or-query-before", "open-or-query-after", "qry-after"]
    log.clear()
    await mediator.publish(AccountOpened("x"))
    assert log == ["evt-before", "evt-after"]


def test_applies_to_validates_its_arguments() -> None:
    async def noop(message: Any, next: Next) -> Any:
        return await next(message)

    with pytest.raises(TypeError, match="at least one message type"):
        applies_to(noop)
    with pytest.raises(TypeError, match="takes message classes"):
        applies_to(noop, int)
    scoped = applies_to(noop, Command)
    assert isinstance(scoped, ScopedBehavior)
    assert scoped.applies(OpenAccount)
    assert not scoped.applies(GetAccount)


async def test_behavior_with_a_singleton_dependency() -> None:
    async def audited(message: Any, next: Next, audit: Audit) -> Any:
        audit.lines.append(type(message).__name__)
        return await next(message)

    audit = Audit()
    deps = Dependencies()
    deps.singleton(Audit, audit)
    mediator, _ = build([audited], deps)
    await mediator.send(OpenAccount("x"))
    await mediator.ask(GetAccount("y"))
    assert audit.lines == ["OpenAccount", "GetAccount"]


async def test_behavior_shares_a_scoped_dependency_with_the_handler() -> None:
    seen: list[Session] = []

    async def with_session(message: Any, next: Next, session: Session) -> Any:
        seen.append(session)
        return await next(message)

    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount, session: Session) -> str:
        seen.append(session)
        return "ok"

    deps = Dependencies()
    deps.scoped(Session, Session)
    mediator = Mediator(registry, behaviors=[with_session], resolver=deps)
    await mediator.send(OpenAccount("a"))
    await mediator.send(OpenAccount("b"))
    assert seen[0] is seen[1]
    assert seen[2] is seen[3]
    assert seen[0] is not seen[2]


async def test_callable_object_behavior_with_dependency() -> None:
    class Stamp:
        async def __call__(self, message: Any, next: Next, audit: Audit) -> Any:
            audit.lines.append("stamp")
            return await next(message)

    audit = Audit()
    deps = Dependencies()
    deps.singleton(Audit, audit)
    mediator, _ = build([Stamp()], deps)
    await mediator.send(OpenAccount("x"))
    assert audit.lines == ["stamp"]


async def test_behaviors_are_folded_once_at_build(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[type] = []
    original = Planner.bind_behavior

    def counting(self: Planner, behavior: Any, message_type: type) -> Any:
        calls.append(message_type)
        return original(self, behavior, message_type)

    monkeypatch.setattr(Planner, "bind_behavior", counting)
    log: list[str] = []
    mediator, _ = build([tracer("a", log)])
    at_build = len(calls)
    assert at_build == 4  # one handler per message type, one behavior each
    for _ in range(5):
        await mediator.send(OpenAccount("x"))
        await mediator.ask(GetAccount("x"))
        await mediator.publish(AccountOpened("x"))
    assert len(calls) == at_build
    assert log.count("a-before") == 15


def test_behavior_signature_errors() -> None:
    async def too_few(message: Any) -> Any:
        return message

    async def unannotated(message: Any, next: Next, audit) -> Any:  # type: ignore[no-untyped-def]
        return await next(message)

    async def unknown(message: Any, next: Next, session: Session) -> Any:
        return await next(message)

    with pytest.raises(RegistrationError, match=r"must accept \(message, next\)"):
        build([too_few])
    with pytest.raises(RegistrationError, match="'audit' has no annotation"):
        build([unannotated])
    with pytest.raises(DependencyError, match="'session'") as info:
        build([unknown])
    assert info.value.handler is unknown
    assert info.value.message_type is not None


async def test_behavior_sees_errors_of_the_handler() -> None:
    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount) -> str:
        raise ValueError("bad owner")

    caught: list[BaseException] = []

    async def catcher(message: Any, next: Next) -> Any:
        try:
            return await next(message)
        except ValueError as exc:
            caught.append(exc)
            raise

    mediator = Mediator(registry, behaviors=[catcher])
    with pytest.raises(ValueError, match="bad owner"):
        await mediator.send(OpenAccount("x"))
    assert len(caught) == 1
