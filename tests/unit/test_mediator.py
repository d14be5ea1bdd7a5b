"""Mediator verbs, routing, wrong kinds, publishing and result checks."""

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from cqrskit import (
    Command,
    Event,
    Mediator,
    NoHandlerError,
    PublishError,
    Query,
    Receipt,
    RegistrationError,
    Registry,
    WrongMessageKindError,
    current_scope,
)
from cqrskit.mediator import record_token


@dataclass(frozen=True)
class OpenAccount(Command[str]):
    owner: str


@dataclass(frozen=True)
class OpenPremiumAccount(OpenAccount):
    pass


@dataclass(frozen=True)
class Unhandled(Command[int]):
    pass


@dataclass(frozen=True)
class GetAccount(Query[str | None]):
    account_id: str


@dataclass(frozen=True)
class ListAccounts(Query[AsyncIterator[str]]):
    limit: int


@dataclass(frozen=True)
class ListSync(Query[Iterator[str]]):
    pass


@dataclass(frozen=True)
class AccountEvent(Event):
    account_id: str


@dataclass(frozen=True)
class AccountOpened(AccountEvent):
    pass


class Plain:
    pass


def make_mediator(**kwargs: object) -> tuple[Mediator, list[str]]:
    registry = Registry()
    log: list[str] = []

    @registry.handler
    async def open_account(cmd: OpenAccount) -> str:
        log.append("open:" + cmd.owner)
        return "acc-" + cmd.owner

    @registry.handler
    def get_account(q: GetAccount) -> str | None:  # a plain def in the async mediator
        return None if q.account_id == "missing" else "view-" + q.account_id

    @registry.handler
    async def list_accounts(q: ListAccounts) -> AsyncIterator[str]:
        for i in range(q.limit):
            yield f"row{i}"

    @registry.handler
    def list_sync(q: ListSync) -> Iterator[str]:
        yield from ("x", "y")

    @registry.handler
    async def on_any(e: AccountEvent) -> None:
        log.append("any:" + e.account_id)

    @registry.handler
    async def on_opened(e: AccountOpened) -> None:
        log.append("opened:" + e.account_id)

    return Mediator(registry, **kwargs), log  # type: ignore[arg-type]


async def test_send_ask_publish_stream() -> None:
    mediator, log = make_mediator()
    assert await mediator.send(OpenAccount("ada")) == "acc-ada"
    assert await mediator.ask(GetAccount("a1")) == "view-a1"
    assert await mediator.ask(GetAccount("missing")) is None
    assert [row async for row in mediator.stream(ListAccounts(3))] == ["row0", "row1", "row2"]
    assert [row async for row in mediator.stream(ListSync())] == ["x", "y"]
    await mediator.publish(AccountOpened("a1"))
    # handlers of base event classes run first (most general first), then the exact type's
    assert log == ["open:ada", "any:a1", "opened:a1"]


async def test_base_event_publishes_only_to_its_own_handlers() -> None:
    mediator, log = make_mediator()
    await mediator.publish(AccountEvent("a2"))
    assert log == ["any:a2"]


async def test_event_without_handlers_is_a_no_op() -> None:
    @dataclass(frozen=True)
    class Nobody(Event):
        pass

    mediator, log = make_mediator()
    await mediator.publish(Nobody())
    assert log == []


async def test_subclass_routes_to_the_base_command_handler() -> None:
    mediator, log = make_mediator()
    assert await mediator.send(OpenPremiumAccount("bob")) == "acc-bob"
    assert await mediator.send(OpenPremiumAccount("eve")) == "acc-eve"  # cached route
    assert log == ["open:bob", "open:eve"]


@pytest.mark.parametrize(
    ("verb", "message", "expected_text", "hint"),
    [
        ("send", GetAccount("a"), "send() takes a command", "use mediator.ask()"),
        ("send", AccountOpened("a"), "send() takes a command", "use mediator.publish()"),
        ("send", Plain(), "not a cqrskit message", "subclass cqrskit.Command[Result]"),
        ("ask", OpenAccount("a"), "ask() takes a query", "use mediator.send()"),
        ("ask", AccountOpened("a"), "ask() takes a query", "use mediator.publish()"),
        ("ask", Plain(), "not a cqrskit message", "subclass cqrskit.Query[Result]"),
        ("publish", OpenAccount("a"), "publish() takes an event", "use mediator.send()"),
        ("publish", GetAccount("a"), "publish() takes an event", "use mediator.ask()"),
        ("publish", Plain(), "not a cqrskit message", "subclass cqrskit.Event"),
    ],
)
async def test_each_verb_refuses_the_wrong_kind(
    verb: str, message: object, expected_text: str, hint: str
) -> None:
    mediator, log = make_mediator()
    with pytest.raises(WrongMessageKindError, match=re.escape(expected_text)) as info:
        await getattr(mediator, verb)(message)
    assert info.value.message_type is type(message)
    assert info.value.hint is not None
    assert hint in info.value.hint
    assert isinstance(info.value, TypeError)
    assert log == []


async def test_stream_refuses_a_command() -> None:
    mediator, _ = make_mediator()
    with pytest.raises(WrongMessageKindError, match="takes a query"):
        [x async for x in mediator.stream(OpenAccount("a"))]  # type: ignore[arg-type]


async def test_unknown_message_raises_no_handler_error() -> None:
    mediator, _ = make_mediator()
    with pytest.raises(NoHandlerError, match="no handler registered for command") as info:
        await mediator.send(Unhandled())
    assert info.value.message_type is Unhandled
    assert info.value.hint is not None
    assert "def handle(msg: Unhandled)" in info.value.hint


async def test_publish_collects_failures_and_runs_every_handler() -> None:
    registry = Registry()
    ran: list[str] = []

    @registry.handler
    async def fails_first(e: AccountOpened) -> None:
        ran.append("first")
        raise ValueError("boom")

    @registry.handler
    def succeeds(e: AccountOpened) -> None:
        ran.append("second")

    @registry.handler
    async def fails_last(e: AccountOpened) -> None:
        ran.append("third")
        raise KeyError("k")

    for concurrently in (False, True):
        ran.clear()
        mediator = Mediator(registry)
        with pytest.raises(PublishError) as info:
            await mediator.publish(AccountOpened("a"), concurrently=concurrently)
        err = info.value
        assert sorted(ran) == ["first", "second", "third"]
        assert [h for h, _ in err.failures] == [fails_first, fails_last]
        assert [type(e) for e in err.exceptions] == [ValueError, KeyError]
        assert err.message_type is AccountOpened
        assert err.handler is fails_first
        assert isinstance(err.__cause__, ValueError)
        text = str(err)
        assert "2 handler(s)" in text
        assert "fails_first raised ValueError: boom" in text
        assert "fails_last raised KeyError" in text


async def test_publish_is_sequential_by_default_and_concurrent_on_request() -> None:
    registry = Registry()
    first_started = asyncio.Event()
    second_started = asyncio.Event()
    order: list[str] = []

    @registry.handler
    async def first(e: AccountOpened) -> None:
        first_started.set()
        order.append("first-start")
        # concurrently, the second handler starts while this one waits; sequentially it
        # cannot, and the bounded wait times out instead
        try:
            await asyncio.wait_for(second_started.wait(), timeout=0.2)
        except TimeoutError:
            order.append("first-timeout")
        order.append("first-end")

    @registry.handler
    async def second(e: AccountOpened) -> None:
        second_started.set()
        order.append("second")

    await Mediator(registry).publish(AccountOpened("a"))
    assert order == ["first-start", "first-timeout", "first-end", "second"]

    order.clear()
    first_started.clear()
    second_started.clear()
    await Mediator(registry, concurrent_publish=True).publish(AccountOpened("a"))
    assert order == ["first-start", "second", "first-end"]

    order.clear()
    second_started.clear()
    await Mediator(registry, concurrent_publish=True).publish(
        AccountOpened("a"), concurrently=False
    )
    assert "first-timeout" in order


async def test_publish_concurrently_reraises_base_exceptions() -> None:
    registry = Registry()

    class Stop(BaseException):
        pass

    @registry.handler
    async def stops(e: AccountOpened) -> None:
        raise Stop

    with pytest.raises(Stop):
        await Mediator(registry).publish(AccountOpened("a"), concurrently=True)


async def test_class_handler_with_singleton_instance() -> None:
    registry = Registry()
    created: list[object] = []

    @registry.handler
    class OpenHandler:
        def __init__(self) -> None:
            created.append(self)

        async def handle(self, cmd: OpenAccount) -> str:
            return f"{cmd.owner}:{len(created)}"

    mediator = Mediator(registry)
    assert await mediator.send(OpenAccount("a")) == "a:1"
    assert await mediator.send(OpenAccount("b")) == "b:1"
    assert len(created) == 1


async def test_send_tracked_returns_result_and_highest_token() -> None:
    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount) -> str:
        record_token(7)
        record_token(3)
        return "a1"

    mediator = Mediator(registry)
    receipt = await mediator.send_tracked(OpenAccount("ada"))
    assert isinstance(receipt, Receipt)
    assert receipt.result == "a1"
    assert receipt.token == 7
    record_token(99)  # outside a tracked send nothing records
    assert receipt.token == 7


async def test_send_tracked_without_events_has_no_token() -> None:
    mediator, _ = make_mediator()
    receipt = await mediator.send_tracked(OpenAccount("ada"))
    assert (receipt.result, receipt.token) == ("acc-ada", None)


async def test_current_scope_is_set_only_inside_a_scoped_dispatch() -> None:
    from cqrskit import Scope

    registry = Registry()
    seen: list[object] = []

    @registry.handler
    async def open_account(cmd: OpenAccount, scope: Scope) -> str:
        seen.append(current_scope())
        seen.append(scope)
        return ""

    await Mediator(registry).send(OpenAccount("a"))
    assert seen[0] is seen[1]
    assert current_scope() is None


def test_check_result_refuses_a_contradicting_return_annotation() -> None:
    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount) -> int:
        return 1

    with pytest.raises(RegistrationError, match="returns int but") as info:
        Mediator(registry)
    assert info.value.message_type is OpenAccount
    assert info.value.handler is open_account
    assert info.value.hint is not None
    assert "type parameter" in info.value.hint


def test_check_result_accepts_subclasses_and_unknowable_results() -> None:
    class Name(str):
        pass

    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount) -> Name:
        return Name("x")

    @registry.handler
    async def get_account(q: GetAccount) -> str | None:  # a union: not checked
        return None

    Mediator(registry)  # builds


async def test_mediator_is_injectable_and_exposes_its_registry() -> None:
    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount, mediator: Mediator) -> str:
        return "same" if mediator.registry is registry else "other"

    assert await Mediator(registry).send(OpenAccount("a")) == "same"


async def test_unregistered_event_subclass_reaches_base_handlers() -> None:
    @dataclass(frozen=True)
    class AccountReopened(AccountEvent):
        pass

    mediator, log = make_mediator()
    await mediator.publish(AccountReopened("r1"))
    await mediator.publish(AccountReopened("r2"), concurrently=True)
    assert log == ["any:r1", "any:r2"]


async def test_same_function_for_two_events_is_named_in_failures() -> None:
    registry = Registry()

    async def fails(e: AccountEvent) -> None:
        raise ValueError(type(e).__name__)

    registry.add(fails, AccountEvent)
    registry.add(fails, AccountOpened)
    mediator = Mediator(registry)
    with pytest.raises(PublishError) as info:
        await mediator.publish(AccountOpened("a"))
    assert [h for h, _ in info.value.failures] == [fails, fails]
