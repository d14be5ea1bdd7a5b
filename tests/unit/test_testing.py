"""cqrskit.testing: HandlerHarness / call_handler and RecordingMediator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from cqrskit import (
    Command,
    DependencyError,
    Event,
    Mediator,
    Metadata,
    NoHandlerError,
    Query,
    Registry,
    WrongMessageKindError,
)
from cqrskit.sync import SyncMediator
from cqrskit.testing import (
    HandlerHarness,
    RecordingMediator,
    SyncRecordingMediator,
    call_handler,
    call_handler_sync,
)


@dataclass(frozen=True, slots=True)
class OpenAccount(Command[str]):
    owner: str


@dataclass(frozen=True, slots=True)
class CloseAccount(Command[None]):
    account_id: str


@dataclass(frozen=True, slots=True)
class AccountOpened(Event):
    account_id: str
    owner: str


@dataclass(frozen=True, slots=True)
class VipAccountOpened(AccountOpened):
    pass


@dataclass(frozen=True, slots=True)
class GetOwner(Query[str]):
    account_id: str


@dataclass(frozen=True, slots=True)
class ListAccounts(Query[AsyncIterator[str]]):
    pass


class Accounts:
    """The port handlers depend on."""

    def add(self, owner: str) -> str:
        raise NotImplementedError


class FakeAccounts(Accounts):
    def __init__(self) -> None:
        self.added: list[str] = []

    def add(self, owner: str) -> str:
        self.added.append(owner)
        return f"acc-{len(self.added)}"


class IdGen:
    def next_id(self) -> str:
        raise NotImplementedError


async def open_account(cmd: OpenAccount, accounts: Accounts, mediator: Mediator) -> str:
    account_id = accounts.add(cmd.owner)
    await mediator.publish(AccountOpened(account_id, cmd.owner))
    return account_id


def open_account_sync(cmd: OpenAccount, accounts: Accounts, md: Metadata) -> str:
    assert md.message_id  # a fresh Metadata is supplied
    return accounts.add(cmd.owner)


class CloseHandler:
    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    async def handle(self, cmd: CloseAccount, ids: IdGen) -> None:
        self.accounts.add(f"closed {cmd.account_id} {ids.next_id()}")


async def list_accounts(q: ListAccounts) -> AsyncIterator[str]:
    yield "a"
    yield "b"


async def test_call_handler_by_type_and_records_nested_dispatch() -> None:
    accounts = FakeAccounts()
    recorder = RecordingMediator()
    result = await call_handler(
        open_account, OpenAccount("ada"), deps={Accounts: accounts}, mediator=recorder
    )
    assert result == "acc-1"
    assert accounts.added == ["ada"]
    event = recorder.assert_published(AccountOpened, owner="ada", account_id="acc-1")
    assert event == AccountOpened("acc-1", "ada")


async def test_by_name_overrides_by_type() -> None:
    by_type, by_name = FakeAccounts(), FakeAccounts()
    harness = HandlerHarness({Accounts: by_type})
    await harness.call(open_account, OpenAccount("x"), accounts=by_name)
    assert by_name.added == ["x"]
    assert by_type.added == []
    assert isinstance(harness.mediator, RecordingMediator)
    harness.mediator.assert_published(AccountOpened, owner="x")


async def test_missing_fake_names_parameter_and_fix() -> None:
    with pytest.raises(DependencyError) as info:
        await call_handler(open_account, OpenAccount("x"))
    text = str(info.value)
    assert "'accounts'" in text
    assert "accounts=fake" in text
    assert "deps={Accounts: fake}" in text
    assert info.value.dependency is Accounts


async def test_unknown_keyword_and_wrong_message_are_rejected() -> None:
    with pytest.raises(TypeError, match="no dependency parameter named 'acounts'"):
        await call_handler(open_account, OpenAccount("x"), acounts=FakeAccounts())
    with pytest.raises(TypeError, match="handles"):
        await call_handler(open_account, CloseAccount("x"), accounts=FakeAccounts())


def test_sync_handler_and_async_refused_by_sync_call() -> None:
    accounts = FakeAccounts()
    assert call_handler_sync(open_account_sync, OpenAccount("b"), accounts=accounts) == "acc-1"
    with pytest.raises(TypeError, match="is async"):
        call_handler_sync(open_account, OpenAccount("b"), accounts=accounts)


async def test_async_call_of_sync_handler_and_class_handler() -> None:
    accounts = FakeAccounts()

    class Ids(IdGen):
        def next_id(self) -> str:
            return "7"

    harness = HandlerHarness({Accounts: accounts, IdGen: Ids()})
    assert await harness.call(open_account_sync, OpenAccount("s")) == "acc-1"
    assert await harness.call(CloseHandler, CloseAccount("a1")) is None
    assert accounts.added == ["s", "closed a1 7"]


async def test_streaming_handler_iterator_is_returned() -> None:
    it = await call_handler(list_accounts, ListAccounts())
    assert [x async for x in it] == ["a", "b"]


async def test_recorder_stubs_results_handlers_and_errors() -> None:
    recorder = RecordingMediator()
    recorder.stub(OpenAccount, "acc-9")
    recorder.stub(GetOwner, handler=lambda q: f"owner of {q.account_id}")

    closed: list[str] = []

    async def async_stub(cmd: CloseAccount) -> None:
        closed.append(cmd.account_id)

    recorder.stub(CloseAccount, handler=async_stub)
    assert await recorder.send(OpenAccount("a")) == "acc-9"
    assert await recorder.ask(GetOwner("acc-9")) == "owner of acc-9"
    await recorder.send(CloseAccount("acc-9"))
    assert closed == ["acc-9"]
    recorder.stub(CloseAccount, error=KeyError("gone"))
    with pytest.raises(KeyError):
        await recorder.send(CloseAccount("acc-9"))
    assert recorder.dispatched == [
        OpenAccount("a"),
        GetOwner("acc-9"),
        CloseAccount("acc-9"),
        CloseAccount("acc-9"),
    ]
    assert recorder.sent_of(CloseAccount) == [CloseAccount("acc-9")] * 2
    assert recorder.asked_of(GetOwner) == [GetOwner("acc-9")]
    with pytest.raises(TypeError, match="not both"):
        recorder.stub(OpenAccount, handler=lambda c: 1, error=ValueError())


async def test_recorder_without_stub_or_delegate() -> None:
    recorder = RecordingMediator()
    with pytest.raises(NoHandlerError, match=r"recorder.stub\(OpenAccount, result\)"):
        await recorder.send(OpenAccount("a"))
    await recorder.publish(AccountOpened("a", "b"))  # events only record
    assert recorder.published == [AccountOpened("a", "b")]
    with pytest.raises(WrongMessageKindError):
        await recorder.send(GetOwner("a"))  # type: ignore[arg-type]
    with pytest.raises(WrongMessageKindError):
        await recorder.publish(OpenAccount("a"))  # type: ignore[arg-type]


async def test_assertion_helpers_fail_with_useful_text() -> None:
    recorder = RecordingMediator()
    recorder.stub(OpenAccount, "x")
    await recorder.send(OpenAccount("ada"))
    await recorder.publish(VipAccountOpened("a1", "ada"))
    recorder.assert_sent(OpenAccount, owner="ada")
    assert recorder.published_of(AccountOpened) == [VipAccountOpened("a1", "ada")]
    with pytest.raises(AssertionError, match="with owner='bob' to be sent; 1 OpenAccount"):
        recorder.assert_sent(OpenAccount, owner="bob")
    with pytest.raises(AssertionError, match="expected a CloseAccount to be sent, but none"):
        recorder.assert_sent(CloseAccount)
    with pytest.raises(AssertionError, match="no_such_field=1"):
        recorder.assert_sent(OpenAccount, no_such_field=1)
    with pytest.raises(AssertionError, match="expected no OpenAccount sent"):
        recorder.assert_not_sent(OpenAccount)
    recorder.assert_not_sent(CloseAccount)
    with pytest.raises(AssertionError, match="expected no Event published"):
        recorder.assert_not_published()
    with pytest.raises(AssertionError, match="to be asked"):
        recorder.assert_asked(GetOwner)
    recorder.reset()
    recorder.assert_not_sent()
    recorder.assert_not_published()
    assert await recorder.send(OpenAccount("again")) == "x"  # stubs survive reset


async def test_recorder_delegates_to_a_real_mediator() -> None:
    registry = Registry()
    seen: list[object] = []

    @registry.handler
    async def get_owner(q: GetOwner) -> str:
        return "real"

    @registry.handler
    async def opened(e: AccountOpened) -> None:
        seen.append(e)

    @registry.handler
    async def open_(cmd: OpenAccount) -> str:
        return f"real-{cmd.owner}"

    registry.handler(list_accounts)

    recorder = RecordingMediator(Mediator(registry))
    recorder.stub(OpenAccount, "stubbed")
    assert await recorder.ask(GetOwner("a")) == "real"
    assert await recorder.send(OpenAccount("a")) == "stubbed"  # stubs win
    await recorder.publish(AccountOpened("a", "b"))
    assert seen == [AccountOpened("a", "b")]
    assert [x async for x in recorder.stream(ListAccounts())] == ["a", "b"]
    receipt = await recorder.send_tracked(OpenAccount("t"))
    assert receipt.result == "stubbed"
    recorder.assert_asked(ListAccounts)
    plain = RecordingMediator(Mediator(registry))
    receipt = await plain.send_tracked(OpenAccount("t"))
    assert receipt.result == "real-t"
    assert receipt.token is None
    plain.assert_sent(OpenAccount, owner="t")


async def test_stream_from_a_stub() -> None:
    def rows() -> Iterator[str]:
        yield from ("x", "y")

    recorder = RecordingMediator()
    recorder.stub(ListAccounts, handler=lambda q: rows())
    assert [r async for r in recorder.stream(ListAccounts())] == ["x", "y"]


# -- the sync twin -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListOwners(Query[Iterator[str]]):
    pass


def open_account_blocking(cmd: OpenAccount, accounts: Accounts, mediator: SyncMediator) -> str:
    account_id = accounts.add(cmd.owner)
    mediator.publish(AccountOpened(account_id, cmd.owner))
    return account_id


def test_sync_harness_gives_a_sync_recorder_for_sync_mediator_parameters() -> None:
    accounts = FakeAccounts()
    harness = HandlerHarness({Accounts: accounts})
    assert harness.call_sync(open_account_blocking, OpenAccount("ada")) == "acc-1"
    assert isinstance(harness.sync_mediator, SyncRecordingMediator)
    harness.sync_mediator.assert_published(AccountOpened, owner="ada")

    recorder = SyncRecordingMediator()
    call_handler_sync(
        open_account_blocking, OpenAccount("bob"), accounts=accounts, mediator=recorder
    )
    assert recorder.published_of(AccountOpened) == [AccountOpened("acc-2", "bob")]


def test_sync_recorder_stubs_delegates_and_refuses_async_stubs() -> None:
    registry = Registry()

    @registry.handler
    def open_(cmd: OpenAccount) -> str:
        return f"real-{cmd.owner}"

    @registry.handler
    def owners(q: ListOwners) -> Iterator[str]:
        yield from ("x", "y")

    seen: list[object] = []

    @registry.handler
    def opened(e: AccountOpened) -> None:
        seen.append(e)

    recorder = SyncRecordingMediator(SyncMediator(registry))
    assert recorder.send(OpenAccount("a")) == "real-a"
    assert recorder.send_tracked(OpenAccount("b")).result == "real-b"
    assert list(recorder.stream(ListOwners())) == ["x", "y"]
    recorder.publish(AccountOpened("a", "b"))
    assert seen == [AccountOpened("a", "b")]

    recorder.stub(GetOwner, handler=lambda q: q.account_id.upper())
    assert recorder.ask(GetOwner("abc")) == "ABC"
    recorder.stub(ListOwners, ["s"])
    assert list(recorder.stream(ListOwners())) == ["s"]
    recorder.stub(OpenAccount, "stubbed")
    assert recorder.send_tracked(OpenAccount("c")).result == "stubbed"
    recorder.stub(AccountOpened, error=RuntimeError("projection down"))
    with pytest.raises(RuntimeError, match="projection down"):
        recorder.publish(AccountOpened("z", "z"))
    assert seen == [AccountOpened("a", "b")]  # the stub replaced delivery

    async def async_stub(q: GetOwner) -> str:
        return "never"

    recorder.stub(GetOwner, handler=async_stub)
    with pytest.raises(TypeError, match="is async"):
        recorder.ask(GetOwner("a"))
    recorder.assert_sent(OpenAccount, owner="c")
    assert [type(m).__name__ for m in recorder.dispatched] == [
        "OpenAccount",
        "OpenAccount",
        "ListOwners",
        "AccountOpened",
        "GetOwner",
        "ListOwners",
        "OpenAccount",
        "AccountOpened",
        "GetOwner",
    ]

    bare = SyncRecordingMediator()
    with pytest.raises(NoHandlerError):
        bare.ask(GetOwner("a"))
    with pytest.raises(WrongMessageKindError):
        bare.send(AccountOpened("a", "b"))  # type: ignore[arg-type]
