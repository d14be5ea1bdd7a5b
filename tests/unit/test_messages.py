"""Messages (dataclass, pydantic, msgspec), Metadata laziness and lineage propagation."""

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import pydantic
import pytest

import cqrskit.messages
from cqrskit import Command, Event, Mediator, Message, Metadata, Query, Registry
from cqrskit.registry import message_kind


@dataclass(frozen=True, slots=True)
class OpenAccount(Command[str]):
    owner: str


@dataclass(frozen=True, slots=True)
class GetBalance(Query[int]):
    account_id: str


@dataclass(frozen=True, slots=True)
class AccountOpened(Event):
    account_id: str


class RenameAccount(pydantic.BaseModel, Command[str]):
    model_config = pydantic.ConfigDict(frozen=True)
    account_id: str
    name: str


class FindByName(pydantic.BaseModel, Query[list[str]]):
    name: str


class AccountRenamed(pydantic.BaseModel, Event):
    account_id: str


class CloseAccount(msgspec.Struct, Command[bool], frozen=True):
    account_id: str


class CountAccounts(Query[int], msgspec.Struct, frozen=True):
    pass


class AccountClosed(msgspec.Struct, Event, frozen=True):
    account_id: str


class Counter:
    """Counts calls of the patched id generator."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return f"id{self.calls}"


@pytest.fixture
def ids(monkeypatch: pytest.MonkeyPatch) -> Counter:
    counter = Counter()
    monkeypatch.setattr(cqrskit.messages, "_new_id", counter)
    return counter


# -- message classes -----------------------------------------------------------------------


def test_bases_are_slotless_markers() -> None:
    for base in (Message, Command, Query, Event):
        assert base.__slots__ == ()
    assert message_kind(OpenAccount) == "command"
    assert message_kind(GetBalance) == "query"
    assert message_kind(AccountOpened) == "event"
    assert message_kind(int) is None
    assert message_kind("not a type") is None  # type: ignore[arg-type]


def test_frozen_dataclass_message_is_a_frozen_value() -> None:
    cmd = OpenAccount("ada")
    assert cmd == OpenAccount("ada")
    assert hash(cmd) == hash(OpenAccount("ada"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cmd.owner = "bob"  # type: ignore[misc]
    assert not hasattr(cmd, "__dict__")


@pytest.mark.parametrize(
    ("cls", "kind"),
    [
        (RenameAccount, "command"),
        (FindByName, "query"),
        (AccountRenamed, "event"),
        (CloseAccount, "command"),
        (CountAccounts, "query"),
        (AccountClosed, "event"),
    ],
)
def test_pydantic_and_msgspec_subclasses_are_messages(cls: type, kind: str) -> None:
    assert message_kind(cls) == kind


def test_pydantic_message_validates_and_is_frozen() -> None:
    msg = RenameAccount(account_id="a1", name="Ada")
    with pytest.raises(pydantic.ValidationError):
        msg.name = "Bob"
    with pytest.raises(pydantic.ValidationError):
        RenameAccount(account_id="a1")  # type: ignore[call-arg]


def test_msgspec_struct_can_inherit_the_bases_in_either_order() -> None:
    # the bases define empty __slots__, so msgspec accepts them as mixins on either side
    closed = msgspec.json.decode(b'{"account_id": "a1"}', type=AccountClosed)
    assert closed == AccountClosed("a1")
    assert isinstance(closed, Event)
    assert msgspec.json.decode(b"{}", type=CountAccounts) == CountAccounts()
    with pytest.raises(AttributeError):
        CloseAccount("a1").account_id = "a2"  # type: ignore[misc]


async def test_pydantic_and_msgspec_messages_dispatch() -> None:
    registry = Registry()
    seen: list[str] = []

    @registry.handler
    async def rename(cmd: RenameAccount) -> str:
        return cmd.name

    @registry.handler
    def close(cmd: CloseAccount) -> bool:
        return cmd.account_id == "a1"

    @registry.handler
    async def renamed(e: AccountRenamed) -> None:
        seen.append(e.account_id)

    @registry.handler
    async def closed(e: AccountClosed) -> None:
        seen.append("closed:" + e.account_id)

    mediator = Mediator(registry)
    assert await mediator.send(RenameAccount(account_id="a1", name="Ada")) == "Ada"
    assert await mediator.send(CloseAccount("a1")) is True
    await mediator.publish(AccountRenamed(account_id="a2"))
    await mediator.publish(AccountClosed("a3"))
    assert seen == ["a2", "closed:a3"]


# -- Metadata ------------------------------------------------------------------------------


def test_metadata_generates_nothing_until_read(ids: Counter) -> None:
    md = Metadata()
    assert ids.calls == 0
    assert md.causation_id is None
    assert md.message_id == "id1"
    assert md.message_id == "id1"
    assert md.correlation_id == "id1"  # an origin correlates with itself
    assert ids.calls == 1


def test_metadata_child_inherits_correlation_and_causation(ids: Counter) -> None:
    parent = Metadata(correlation_id="corr")
    child = Metadata(parent=parent)
    assert child.correlation_id == "corr"
    assert child.causation_id == parent.message_id
    assert child.message_id != parent.message_id


def test_metadata_explicit_values_and_as_dict() -> None:
    ts = datetime(2024, 1, 2, tzinfo=UTC)
    md = Metadata(message_id="m", correlation_id="c", causation_id="x", timestamp=ts)
    assert md.as_dict() == {
        "message_id": "m",
        "correlation_id": "c",
        "causation_id": "x",
        "timestamp": "2024-01-02T00:00:00+00:00",
    }
    assert "message_id='m'" in repr(md)
    assert Metadata().timestamp.tzinfo is UTC


async def test_dispatch_without_metadata_generates_no_id(ids: Counter) -> None:
    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount) -> str:
        return cmd.owner

    @registry.handler
    async def balance(q: GetBalance, md: Metadata) -> int:
        return 0

    mediator = Mediator(registry)
    assert await mediator.send(OpenAccount("ada")) == "ada"
    assert await mediator.ask(GetBalance("a")) == 0  # asked for Metadata, never read it
    assert ids.calls == 0


async def test_correlation_and_causation_flow_through_nested_dispatch() -> None:
    registry = Registry()
    seen: dict[str, Metadata] = {}

    @registry.handler
    async def open_account(cmd: OpenAccount, md: Metadata, mediator: Mediator) -> str:
        seen["command"] = md
        await mediator.publish(AccountOpened("a1"))
        return "a1"

    @registry.handler
    async def on_opened(e: AccountOpened, md: Metadata, mediator: Mediator) -> None:
        seen["event"] = md
        await mediator.ask(GetBalance(e.account_id))

    @registry.handler
    async def balance(q: GetBalance, md: Metadata) -> int:
        seen["query"] = md
        return 0

    mediator = Mediator(registry)
    await mediator.send(OpenAccount("ada"))
    command, event, query = seen["command"], seen["event"], seen["query"]
    assert command.causation_id is None
    assert command.correlation_id == command.message_id
    assert event.correlation_id == query.correlation_id == command.message_id
    assert event.causation_id == command.message_id
    assert query.causation_id == event.message_id
    assert len({command.message_id, event.message_id, query.message_id}) == 3


async def test_outer_scope_metadata_is_inherited() -> None:
    registry = Registry()
    seen: list[Metadata] = []

    @registry.handler
    async def open_account(cmd: OpenAccount, md: Metadata) -> str:
        seen.append(md)
        return "a1"

    mediator = Mediator(registry)
    request = Metadata(message_id="req-1", correlation_id="corr-1")
    async with mediator.scope(metadata=request) as scope:
        assert scope.metadata is request
        await mediator.send(OpenAccount("ada"))
        await mediator.send(OpenAccount("bob"))
    await mediator.send(OpenAccount("eve"))
    assert [m.correlation_id for m in seen[:2]] == ["corr-1", "corr-1"]
    assert [m.causation_id for m in seen[:2]] == ["req-1", "req-1"]
    assert seen[2].correlation_id != "corr-1"
    assert seen[2].causation_id is None


async def test_outer_scope_without_metadata_still_correlates() -> None:
    registry = Registry()
    seen: list[Metadata] = []

    @registry.handler
    async def open_account(cmd: OpenAccount, md: Metadata) -> str:
        seen.append(md)
        return "a1"

    mediator = Mediator(registry)
    async with mediator.scope() as scope:
        await mediator.send(OpenAccount("ada"))
        await mediator.send(OpenAccount("bob"))
    assert seen[0].correlation_id == seen[1].correlation_id == scope.metadata.message_id
