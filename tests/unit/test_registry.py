"""Registry: registration forms, discovery, validation errors, postponed annotations."""

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cqrskit import (
    Command,
    ConfigurationError,
    Dependencies,
    DependencyError,
    Event,
    HandlerSpec,
    Mediator,
    Query,
    RegistrationError,
    Registry,
    handler,
)
from tests.unit import future_handlers, scan_fixture


@dataclass(frozen=True)
class OpenAccount(Command[str]):
    owner: str


@dataclass(frozen=True)
class CloseAccount(Command[None]):
    account_id: str


@dataclass(frozen=True)
class GetAccount(Query[str | None]):
    account_id: str


@dataclass(frozen=True)
class ListAccounts(Query[AsyncIterator[str]]):
    pass


@dataclass(frozen=True)
class AccountOpened(Event):
    account_id: str


class Clock:
    def now(self) -> int:
        return 42


class NotAMessage:
    pass


def test_decorator_forms_and_lookup() -> None:
    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount) -> str:
        return "a1"

    @registry.handler(CloseAccount)
    def close(cmd: Any) -> None:
        return None

    spec = registry.handler_for(OpenAccount)
    assert isinstance(spec, HandlerSpec)
    assert spec.owner is open_account
    assert spec.is_async
    assert not spec.is_generator
    assert spec.name.endswith("test_decorator_forms_and_lookup.<locals>.open_account")
    close_spec = registry.handler_for(CloseAccount)
    assert close_spec is not None
    assert close_spec.owner is close
    assert not close_spec.is_async
    assert registry.handler_for(GetAccount) is None
    assert set(registry.commands()) == {OpenAccount, CloseAccount}
    assert registry.queries() == {}
    assert len(registry) == 2
    assert {s.owner for s in registry} == {open_account, close}


def test_add_with_explicit_type_and_several_event_handlers() -> None:
    registry = Registry()

    def first(e: AccountOpened) -> None: ...

    def second(e: AccountOpened) -> None: ...

    registry.add(first)
    registry.add(second, AccountOpened)
    assert [s.owner for s in registry.event_handlers(AccountOpened)] == [first, second]
    assert list(registry.events()) == [AccountOpened]
    with pytest.raises(RegistrationError, match="registered twice") as info:
        registry.add(first)
    assert info.value.handler is first


def test_class_handler_records_init_dependencies() -> None:
    registry = Registry()

    @registry.handler
    class OpenHandler:
        def __init__(self, clock: Clock, retries: int = 3) -> None:
            self.clock = clock

        async def handle(self, cmd: OpenAccount, deps: Dependencies) -> str:
            return "a1"

    spec = registry.handler_for(OpenAccount)
    assert spec is not None
    assert spec.owner is OpenHandler
    assert spec.init_params == (("clock", Clock),)  # defaulted parameters are left alone
    assert spec.params == (("deps", Dependencies),)


def test_class_handler_without_init_has_empty_init_params() -> None:
    registry = Registry()

    @registry.handler
    class Plain:
        def handle(self, cmd: OpenAccount) -> str:
            return "a1"

    spec = registry.handler_for(OpenAccount)
    assert spec is not None
    assert spec.init_params == ()


def test_duplicate_command_handler_is_refused() -> None:
    registry = Registry()

    @registry.handler
    def first(cmd: OpenAccount) -> str:
        return "1"

    def second(cmd: OpenAccount) -> str:
        return "2"

    with pytest.raises(RegistrationError) as info:
        registry.add(second)
    err = info.value
    assert err.message_type is OpenAccount
    assert err.handler is second
    assert "already has handler" in str(err)
    assert "first" in str(err)
    assert err.hint is not None
    assert "exactly one handler" in err.hint


def test_generator_handler_for_a_command_is_refused() -> None:
    def gen(cmd: OpenAccount) -> Iterator[str]:
        yield "a"

    with pytest.raises(RegistrationError, match="is a generator function") as info:
        Registry().add(gen)
    assert info.value.message_type is OpenAccount


def test_generator_handler_for_a_query_is_a_stream() -> None:
    async def rows(q: ListAccounts) -> AsyncIterator[str]:
        yield "a"

    spec = Registry().add(rows)
    assert spec.is_generator
    assert spec.is_async


def test_event_handler_returning_a_value_is_refused() -> None:
    def on_opened(e: AccountOpened) -> int:
        return 1

    with pytest.raises(RegistrationError, match="event handlers return None"):
        Registry().add(on_opened)


def test_non_message_first_parameter_is_refused() -> None:
    def bad(x: NotAMessage) -> None: ...

    with pytest.raises(RegistrationError, match="not a Command, Query or Event") as info:
        Registry().add(bad)
    assert info.value.hint is not None
    assert "subclass cqrskit.Command" in info.value.hint


def test_missing_annotations_are_refused() -> None:
    def no_message_annotation(cmd):  # type: ignore[no-untyped-def]
        return None

    def no_dep_annotation(cmd: OpenAccount, clock) -> str:  # type: ignore[no-untyped-def]
        return ""

    with pytest.raises(RegistrationError, match="has no annotation") as info:
        Registry().add(no_message_annotation)
    assert info.value.hint is not None
    assert "registry.handler(MyCommand)" in info.value.hint
    with pytest.raises(RegistrationError, match="'clock' has no annotation") as info:
        Registry().add(no_dep_annotation)
    assert info.value.message_type is OpenAccount


def test_handler_class_errors() -> None:
    class NoHandle:
        pass

    class UnannotatedInit:
        def __init__(self, clock) -> None:  # type: ignore[no-untyped-def]
            pass

        def handle(self, cmd: OpenAccount) -> str:
            return ""

    with pytest.raises(RegistrationError, match="has no 'handle' method"):
        Registry().add(NoHandle)
    with pytest.raises(RegistrationError, match="__init__ parameter 'clock'"):
        Registry().add(UnannotatedInit)


def test_shape_errors() -> None:
    def no_params() -> None: ...

    def star_args(cmd: OpenAccount, *rest: Any) -> str:
        return ""

    with pytest.raises(RegistrationError, match="takes no parameters"):
        Registry().add(no_params)
    with pytest.raises(RegistrationError, match=r"\*args/\*\*kwargs"):
        Registry().add(star_args)
    with pytest.raises(RegistrationError, match="neither a function nor a class"):
        Registry().add(42)


def test_explicit_type_contradicting_annotation_is_refused() -> None:
    def opener(cmd: OpenAccount) -> str:
        return ""

    with pytest.raises(RegistrationError, match="first parameter is annotated") as info:
        Registry().add(opener, CloseAccount)
    assert info.value.message_type is CloseAccount


def test_postponed_annotations_resolve_from_module_globals() -> None:
    registry = Registry()
    spec = registry.add(future_handlers.ping)
    assert spec.message_type is future_handlers.Ping
    assert spec.params == (("greeter", future_handlers.Greeter),)
    assert spec.return_type is str


@pytest.mark.parametrize(
    "func",
    [
        future_handlers.ping_with_type_checking_only_dependency,
        future_handlers.make_local_handler(),
    ],
    ids=["type-checking-only", "local-class"],
)
def test_postponed_annotations_that_cannot_resolve(func: Any) -> None:
    with pytest.raises(RegistrationError, match="cannot be resolved") as info:
        Registry().add(func)
    assert info.value.handler is func
    assert info.value.hint is not None
    assert "from __future__ import annotations" in info.value.hint


async def test_postponed_annotation_handler_dispatches() -> None:
    registry = Registry()
    registry.add(future_handlers.ping)
    deps = Dependencies()
    deps.singleton(future_handlers.Greeter, future_handlers.Greeter())
    mediator = Mediator(registry, resolver=deps)
    assert await mediator.send(future_handlers.Ping("x")) == "pong x"


def test_include_copies_registrations_and_expectations() -> None:
    accounts = Registry()

    @accounts.handler
    def open_account(cmd: OpenAccount) -> str:
        return "a1"

    @accounts.handler
    def on_opened(e: AccountOpened) -> None: ...

    accounts.expect(GetAccount)
    app = Registry()
    app.include(accounts)
    assert app.handler_for(OpenAccount) is not None
    assert [s.owner for s in app.event_handlers(AccountOpened)] == [on_opened]
    assert app.expected() == frozenset({GetAccount})
    with pytest.raises(RegistrationError, match="already has handler"):
        app.include(accounts)  # including twice duplicates the command handler


def test_expect_fails_the_build_naming_the_missing_messages() -> None:
    registry = Registry()
    registry.expect(OpenAccount, GetAccount)

    @registry.handler
    def open_account(cmd: OpenAccount) -> str:
        return "a1"

    with pytest.raises(ConfigurationError, match="no handler registered for") as info:
        Mediator(registry)
    assert "GetAccount" in str(info.value)
    assert "OpenAccount" not in str(info.value)
    assert info.value.message_type is GetAccount


async def test_scan_registers_marked_handlers_of_a_package() -> None:
    scan_fixture.TOTAL.clear()
    registry = Registry()
    assert registry.scan("tests.unit.scan_fixture") == 3
    deposit = registry.handler_for(scan_fixture.Deposit)
    assert deposit is not None
    assert deposit.owner.__name__ == "DepositHandler"
    assert [s.owner.__name__ for s in registry.event_handlers(scan_fixture.Deposited)] == [
        "on_deposited"
    ]
    assert registry.expected() == frozenset({scan_fixture.Deposit, scan_fixture.GetTotal})
    mediator = Mediator(registry)
    assert await mediator.send(scan_fixture.Deposit(5)) == 5
    await mediator.publish(scan_fixture.Deposited(2))
    assert await mediator.ask(scan_fixture.GetTotal()) == 7


def test_scan_of_a_module_object_expects_its_commands() -> None:
    from tests.unit import scan_unhandled

    registry = Registry()
    assert registry.scan(scan_unhandled) == 0
    with pytest.raises(ConfigurationError, match="Withdraw"):
        Mediator(registry)


def test_handler_marker_does_not_register() -> None:
    @handler
    def marked(cmd: OpenAccount) -> str:
        return ""

    @handler(CloseAccount)
    def marked_explicit(cmd: Any) -> None: ...

    assert marked.__cqrskit_handles__ is None  # type: ignore[attr-defined]
    assert marked_explicit.__cqrskit_handles__ is CloseAccount  # type: ignore[attr-defined]


def test_unresolvable_dependency_names_message_handler_and_parameter() -> None:
    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount, clock: Clock) -> str:
        return ""

    with pytest.raises(DependencyError) as info:
        Mediator(registry)
    err = info.value
    assert err.message_type is OpenAccount
    assert err.handler is open_account
    assert err.dependency is Clock
    text = str(err)
    assert "open_account" in text
    assert "OpenAccount" in text
    assert "'clock'" in text
    assert "deps.singleton(Clock" in text
