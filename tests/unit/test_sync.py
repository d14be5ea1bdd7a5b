"""SyncMediator: the blocking twin of Mediator."""

import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cqrskit import (
    Command,
    ConfigurationError,
    Dependencies,
    DependencyError,
    Event,
    Metadata,
    NoHandlerError,
    PublishError,
    Query,
    Receipt,
    RegistrationError,
    Registry,
    Scope,
    WrongMessageKindError,
    current_scope,
    for_commands,
    for_queries,
)
from cqrskit._plan import Planner
from cqrskit.mediator import record_token
from cqrskit.sync import SyncMediator

Next = Callable[[Any], Any]


@dataclass(frozen=True)
class OpenAccount(Command[str]):
    owner: str


@dataclass(frozen=True)
class OpenPremium(OpenAccount):
    pass


@dataclass(frozen=True)
class Unhandled(Command[int]):
    pass


@dataclass(frozen=True)
class GetAccount(Query[str | None]):
    account_id: str


@dataclass(frozen=True)
class ListAccounts(Query[Iterator[str]]):
    limit: int


@dataclass(frozen=True)
class AccountEvent(Event):
    account_id: str


@dataclass(frozen=True)
class AccountOpened(AccountEvent):
    pass


class Session:
    def __init__(self) -> None:
        self.log: list[str] = []


class Audit:
    def __init__(self) -> None:
        self.lines: list[str] = []


def make(
    behaviors: list[Any] | None = None, resolver: Any = None
) -> tuple[SyncMediator, list[str]]:
    registry = Registry()
    log: list[str] = []

    @registry.handler
    def open_account(cmd: OpenAccount) -> str:
        log.append("open:" + cmd.owner)
        return "acc-" + cmd.owner

    @registry.handler
    def get_account(q: GetAccount) -> str | None:
        return None if q.account_id == "missing" else "view-" + q.account_id

    @registry.handler
    def list_accounts(q: ListAccounts) -> Iterator[str]:
        for i in range(q.limit):
            log.append(f"row{i}")
            yield f"row{i}"

    @registry.handler
    def on_any(e: AccountEvent) -> None:
        log.append("any:" + e.account_id)

    @registry.handler
    def on_opened(e: AccountOpened) -> None:
        log.append("opened:" + e.account_id)

    return SyncMediator(registry, behaviors=behaviors or [], resolver=resolver), log


def test_verbs() -> None:
    mediator, log = make()
    assert mediator.send(OpenAccount("ada")) == "acc-ada"
    assert mediator.ask(GetAccount("a1")) == "view-a1"
    assert mediator.ask(GetAccount("missing")) is None
    rows = mediator.stream(ListAccounts(2))
    assert log == ["open:ada"]  # the handler runs as the iterator is consumed
    assert list(rows) == ["row0", "row1"]
    mediator.publish(AccountOpened("a1"))
    assert log == ["open:ada", "row0", "row1", "any:a1", "opened:a1"]


def test_send_calls_the_handler_itself_without_wrappers() -> None:
    registry = Registry()

    @registry.handler
    def open_account(cmd: OpenAccount) -> str:
        return ""

    mediator = SyncMediator(registry)
    # the hot path is a dict lookup and a call of the handler itself: no wrapper frame
    assert mediator._commands[OpenAccount] is open_account


def test_subclass_routing_and_unknown_messages() -> None:
    mediator, log = make()
    assert mediator.send(OpenPremium("bob")) == "acc-bob"
    assert log == ["open:bob"]
    with pytest.raises(NoHandlerError, match="no handler registered for command") as info:
        mediator.send(Unhandled())
    assert info.value.hint is not None
    assert "@registry.handler def handle(msg: Unhandled)" in info.value.hint


@pytest.mark.parametrize(
    ("verb", "message", "text", "hint"),
    [
        ("send", GetAccount("a"), "mediator.send() takes a command", "use mediator.ask()"),
        ("ask", OpenAccount("a"), "mediator.ask() takes a query", "use mediator.send()"),
        ("stream", OpenAccount("a"), "mediator.stream() takes a query", "use mediator.send()"),
        ("publish", GetAccount("a"), "mediator.publish() takes an event", "use mediator.ask()"),
        ("publish", object(), "not a cqrskit message", "subclass cqrskit.Event"),
    ],
)
def test_wrong_kinds(verb: str, message: object, text: str, hint: str) -> None:
    mediator, _ = make()
    with pytest.raises(WrongMessageKindError, match=re.escape(text)) as info:
        getattr(mediator, verb)(message)
    assert info.value.hint is not None
    assert hint in info.value.hint


def test_publish_collects_failures_and_runs_every_handler() -> None:
    registry = Registry()
    ran: list[str] = []

    @registry.handler
    def first(e: AccountOpened) -> None:
        ran.append("first")
        raise ValueError("boom")

    @registry.handler
    def second(e: AccountOpened) -> None:
        ran.append("second")

    mediator = SyncMediator(registry)
    with pytest.raises(PublishError) as info:
        mediator.publish(AccountOpened("a"))
    assert ran == ["first", "second"]
    assert [h for h, _ in info.value.failures] == [first]
    assert "first raised ValueError: boom" in str(info.value)


def test_publish_of_an_unregistered_subclass_uses_base_handlers() -> None:
    @dataclass(frozen=True)
    class Reopened(AccountEvent):
        pass

    mediator, log = make()
    mediator.publish(Reopened("r"))
    mediator.publish(Reopened("s"))
    assert log == ["any:r", "any:s"]


def test_behaviors_order_and_scoping() -> None:
    log: list[str] = []

    def tracer(name: str) -> Callable[[Any, Next], Any]:
        def behavior(message: Any, next: Next) -> Any:
            log.append(name + "-before")
            result = next(message)
            log.append(name + "-after")
            return result

        return behavior

    mediator, _ = make([tracer("all"), for_commands(tracer("cmd")), for_queries(tracer("q"))])
    assert mediator.send(OpenAccount("a")) == "acc-a"
    assert log == ["all-before", "cmd-before", "cmd-after", "all-after"]
    log.clear()
    mediator.ask(GetAccount("a"))
    assert log == ["all-before", "q-before", "q-after", "all-after"]


def test_behavior_dependencies_singleton_and_scoped() -> None:
    def audited(message: Any, next: Next, audit: Audit, session: Session) -> Any:
        audit.lines.append(type(message).__name__)
        session.log.append("behavior")
        return next(message)

    registry = Registry()
    sessions: list[Session] = []

    @registry.handler
    def open_account(cmd: OpenAccount, session: Session) -> str:
        session.log.append("handler")
        sessions.append(session)
        return "ok"

    audit = Audit()
    deps = Dependencies()
    deps.singleton(Audit, audit)
    deps.scoped(Session, Session)
    mediator = SyncMediator(registry, behaviors=[audited], resolver=deps)
    mediator.send(OpenAccount("a"))
    mediator.send(OpenAccount("b"))
    assert audit.lines == ["OpenAccount", "OpenAccount"]
    assert sessions[0].log == ["behavior", "handler"]
    assert sessions[0] is not sessions[1]


def test_behaviors_are_folded_once_at_build(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[type] = []
    original = Planner.bind_behavior

    def counting(self: Planner, behavior: Any, message_type: type) -> Any:
        calls.append(message_type)
        return original(self, behavior, message_type)

    monkeypatch.setattr(Planner, "bind_behavior", counting)

    def passthrough(message: Any, next: Next) -> Any:
        return next(message)

    mediator, _ = make([passthrough])
    at_build = len(calls)
    assert at_build == 5
    for _ in range(3):
        mediator.send(OpenAccount("a"))
        mediator.publish(AccountOpened("a"))
    assert len(calls) == at_build


class Lifecycle:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.thrown: list[BaseException] = []


def session_factory(lifecycle: Lifecycle) -> Iterator[Session]:
    lifecycle.log.append("open")
    try:
        yield Session()
    except BaseException as exc:
        lifecycle.thrown.append(exc)
        lifecycle.log.append("rollback")
        raise
    lifecycle.log.append("commit")


def scoped_mediator(fail: bool) -> tuple[SyncMediator, Lifecycle]:
    registry = Registry()

    @registry.handler
    def open_account(cmd: OpenAccount, session: Session) -> str:
        if fail:
            raise ValueError("nope")
        return "ok"

    @registry.handler
    def list_accounts(q: ListAccounts, session: Session, md: Metadata) -> Iterator[str]:
        for i in range(q.limit):
            lifecycle.log.append(f"row{i}")
            yield f"row{i}"
        if fail:
            raise ValueError("stream failed")

    lifecycle = Lifecycle()
    deps = Dependencies()
    deps.singleton(Lifecycle, lifecycle)
    deps.scoped(Session, session_factory)
    return SyncMediator(registry, resolver=deps), lifecycle


def test_generator_factory_closes_after_success() -> None:
    mediator, lifecycle = scoped_mediator(fail=False)
    assert mediator.send(OpenAccount("a")) == "ok"
    assert lifecycle.log == ["open", "commit"]


def test_generator_factory_gets_the_error_thrown_in() -> None:
    mediator, lifecycle = scoped_mediator(fail=True)
    with pytest.raises(ValueError, match="nope") as info:
        mediator.send(OpenAccount("a"))
    assert lifecycle.log == ["open", "rollback"]
    assert lifecycle.thrown == [info.value]


def test_stream_keeps_its_scope_open_until_exhausted() -> None:
    mediator, lifecycle = scoped_mediator(fail=False)
    rows = mediator.stream(ListAccounts(2))
    assert next(rows) == "row0"
    assert lifecycle.log == ["open", "row0"]
    assert list(rows) == ["row1"]
    assert lifecycle.log == ["open", "row0", "row1", "commit"]


def test_stream_closed_early_or_failing_closes_its_scope() -> None:
    mediator, lifecycle = scoped_mediator(fail=False)
    rows = mediator.stream(ListAccounts(5))
    assert next(rows) == "row0"
    rows.close()  # type: ignore[attr-defined]
    assert lifecycle.log[-1] == "rollback"
    assert isinstance(lifecycle.thrown[0], GeneratorExit)

    mediator, lifecycle = scoped_mediator(fail=True)
    with pytest.raises(ValueError, match="stream failed"):
        list(mediator.stream(ListAccounts(1)))
    assert lifecycle.log == ["open", "row0", "rollback"]


def test_class_handlers_singleton_and_scoped() -> None:
    registry = Registry()
    made: list[object] = []

    @registry.handler
    class OpenHandler:
        def __init__(self, audit: Audit) -> None:
            made.append(self)

        def handle(self, cmd: OpenAccount) -> str:
            return "open"

    @registry.handler
    class GetHandler:
        def __init__(self, session: Session) -> None:
            self.session = session
            made.append(self)

        def handle(self, q: GetAccount, session: Session) -> str | None:
            return "same" if session is self.session else "different"

    deps = Dependencies()
    deps.singleton(Audit, Audit())
    deps.scoped(Session, Session)
    mediator = SyncMediator(registry, resolver=deps)
    assert len(made) == 1  # the singleton handler is built with the mediator
    assert mediator.send(OpenAccount("a")) == "open"
    assert mediator.send(OpenAccount("a")) == "open"
    assert mediator.ask(GetAccount("a")) == "same"
    assert mediator.ask(GetAccount("a")) == "same"
    assert len(made) == 3


def test_nested_dispatch_and_outer_scope_propagate_metadata() -> None:
    registry = Registry()
    seen: list[Metadata] = []

    @registry.handler
    def open_account(cmd: OpenAccount, md: Metadata, mediator: SyncMediator) -> str:
        seen.append(md)
        mediator.publish(AccountOpened("a1"))
        return "a1"

    @registry.handler
    def on_opened(e: AccountOpened, md: Metadata) -> None:
        seen.append(md)

    mediator = SyncMediator(registry)
    with mediator.scope(metadata=Metadata(message_id="req", correlation_id="corr")):
        mediator.send(OpenAccount("ada"))
    command, event = seen
    assert command.correlation_id == event.correlation_id == "corr"
    assert command.causation_id == "req"
    assert event.causation_id == command.message_id
    assert current_scope() is None


def test_scope_is_injectable_and_current_during_dispatch() -> None:
    registry = Registry()
    seen: list[object] = []

    @registry.handler
    def open_account(cmd: OpenAccount, scope: Scope) -> str:
        seen.extend([scope, current_scope()])
        return ""

    SyncMediator(registry).send(OpenAccount("a"))
    assert seen[0] is seen[1]


def test_send_tracked() -> None:
    registry = Registry()

    @registry.handler
    def open_account(cmd: OpenAccount) -> str:
        record_token(4)
        record_token(9)
        return "a1"

    receipt = SyncMediator(registry).send_tracked(OpenAccount("a"))
    assert isinstance(receipt, Receipt)
    assert (receipt.result, receipt.token) == ("a1", 9)


# -- build-time refusals -------------------------------------------------------------------


def test_async_handler_is_refused_at_build() -> None:
    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount) -> str:
        return ""

    with pytest.raises(RegistrationError, match="is asynchronous") as info:
        SyncMediator(registry)
    err = info.value
    assert isinstance(err, ConfigurationError)
    assert err.handler is open_account
    assert err.message_type is OpenAccount
    assert "open_account" in str(err)
    assert err.hint is not None
    assert "plain 'def'" in err.hint


def test_async_streaming_handler_is_refused_at_build() -> None:
    @dataclass(frozen=True)
    class Rows(Query[AsyncIterator[int]]):
        pass

    registry = Registry()

    @registry.handler
    async def rows(q: Rows) -> AsyncIterator[int]:
        yield 1

    with pytest.raises(RegistrationError, match="rows for"):
        SyncMediator(registry)


def test_async_behavior_is_refused_at_build() -> None:
    async def timed(message: Any, next: Any) -> Any:
        return await next(message)

    class AsyncCallable:
        async def __call__(self, message: Any, next: Any) -> Any:
            return await next(message)

    for behavior in (timed, for_commands(timed), AsyncCallable()):
        with pytest.raises(RegistrationError, match=r"behavior .* is asynchronous") as info:
            make([behavior])
        assert info.value.hint is not None
        assert "next(message)" in info.value.hint


async def async_session() -> Session:
    return Session()


async def async_gen_session() -> AsyncIterator[Session]:
    yield Session()


class Repo:
    def __init__(self, session: Session) -> None:
        self.session = session


@pytest.mark.parametrize("factory", [async_session, async_gen_session])
def test_async_factory_is_refused_at_build(factory: Any) -> None:
    registry = Registry()

    @registry.handler
    def open_account(cmd: OpenAccount, session: Session) -> str:
        return ""

    deps = Dependencies()
    deps.scoped(Session, factory)
    with pytest.raises(DependencyError, match="async factory") as info:
        SyncMediator(registry, resolver=deps)
    err = info.value
    assert err.handler is open_account
    assert err.message_type is OpenAccount
    assert err.dependency is Session
    assert "'session'" in str(err)
    assert err.hint is not None
    assert "generator 'def' factory" in err.hint


def test_sync_factory_depending_on_async_factory_is_refused() -> None:
    registry = Registry()

    @registry.handler
    def open_account(cmd: OpenAccount, repo: Repo) -> str:
        return ""

    deps = Dependencies()
    deps.scoped(Session, async_session)
    deps.scoped(Repo, Repo)
    with pytest.raises(DependencyError, match="'repo'"):
        SyncMediator(registry, resolver=deps)


def test_async_dependency_of_a_behavior_or_handler_class_is_refused() -> None:
    def uses_session(message: Any, next: Next, session: Session) -> Any:
        return next(message)

    deps = Dependencies()
    deps.scoped(Session, async_session)
    with pytest.raises(DependencyError, match="uses_session"):
        make([uses_session], deps)

    registry = Registry()

    @registry.handler
    class OpenHandler:
        def __init__(self, session: Session) -> None:
            pass

        def handle(self, cmd: OpenAccount) -> str:
            return ""

    with pytest.raises(DependencyError, match="OpenHandler"):
        SyncMediator(registry, resolver=deps)


def test_expected_messages_and_result_checks_apply() -> None:
    registry = Registry()
    registry.expect(Unhandled)
    with pytest.raises(ConfigurationError, match="Unhandled"):
        SyncMediator(registry)

    registry = Registry()

    @registry.handler
    def open_account(cmd: OpenAccount) -> int:
        return 1

    with pytest.raises(RegistrationError, match="returns int"):
        SyncMediator(registry)


def test_registry_property() -> None:
    registry = Registry()
    assert SyncMediator(registry).registry is registry
