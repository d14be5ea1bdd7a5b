"""EventTypes: stable names, versions, duplicates, renames, unsupported declarations."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cqrskit.errors import ConfigurationError, SerializationError
from cqrskit.messages import Event
from cqrskit.serialization import EventTypes, JsonSerializer


@dataclass(frozen=True, slots=True)
class Opened(Event):
    account_id: str
    owner: str


@dataclass(frozen=True, slots=True)
class Closed(Event):
    account_id: str


@dataclass(frozen=True, slots=True)
class OpenedRenamed(Event):
    """The same event after a refactoring renamed the Python class."""

    account_id: str
    owner: str


@dataclass(frozen=True, slots=True)
class NotAnEvent:
    x: int


class PlainEvent(Event):
    pass


@dataclass(frozen=True, slots=True)
class WithSet(Event):
    tags: set[str]


@dataclass(frozen=True, slots=True)
class WithIntKeys(Event):
    counts: dict[int, int]


@dataclass(frozen=True, slots=True)
class WithAmbiguousUnion(Event):
    value: int | Opened


@dataclass(frozen=True, slots=True)
class WithDerived(Event):
    a: int
    doubled: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "doubled", self.a * 2)


def test_register_directly_and_look_up_both_ways() -> None:
    types = EventTypes()
    assert types.register(Opened, "account.opened", version=2) is Opened
    assert types.type_for("account.opened") is Opened
    assert types.name_for(Opened) == "account.opened"
    assert types.version_for("account.opened") == 2
    assert types.names() == ["account.opened"]


def test_register_as_decorator_with_and_without_arguments() -> None:
    types = EventTypes()
    types.register("closed", version=3)(Closed)
    types.register(None, version=1)(Opened)
    assert types.type_for("closed") is Closed
    assert types.version_for("closed") == 3
    assert types.name_for(Opened) == f"{__name__}.Opened"


def test_default_name_is_module_and_qualname() -> None:
    types = EventTypes()
    types.register(Opened)
    assert types.name_for(Opened) == f"{__name__}.Opened"
    assert types.version_for(f"{__name__}.Opened") == 1


def test_duplicate_name_is_an_error_naming_both_classes() -> None:
    types = EventTypes()
    types.register(Opened, "account.opened")
    with pytest.raises(ConfigurationError, match=r"'account\.opened'.*Opened.*Closed"):
        types.register(Closed, "account.opened")
    assert types.type_for("account.opened") is Opened


def test_one_class_under_two_names_is_an_error() -> None:
    types = EventTypes()
    types.register(Opened, "account.opened")
    with pytest.raises(ConfigurationError, match=r"already registered as 'account\.opened'"):
        types.register(Opened, "account.created")
    assert types.names() == ["account.opened"]


@pytest.mark.parametrize("name", ["", " x", "a b", "a\nb", "x" * 201, "é", "a/b"])
def test_malformed_names_are_rejected(name: str) -> None:
    with pytest.raises(ConfigurationError, match="is not valid"):
        EventTypes().register(Opened, name)


def test_local_class_needs_an_explicit_name() -> None:
    @dataclass(frozen=True)
    class Local(Event):
        x: int

    types = EventTypes()
    with pytest.raises(ConfigurationError, match="pass it explicitly"):
        types.register(Local)
    types.register(Local, "local")
    assert types.type_for("local") is Local


@pytest.mark.parametrize("version", [0, -1, True, 1.0])
def test_bad_version_is_rejected(version: object) -> None:
    with pytest.raises(ConfigurationError, match="schema version"):
        EventTypes().register(Opened, "x", version=version)  # type: ignore[arg-type]


def test_non_event_and_non_dataclass_are_rejected() -> None:
    types = EventTypes()
    with pytest.raises(ConfigurationError, match="not an event class"):
        types.register(NotAnEvent, "x")  # type: ignore[type-var]
    with pytest.raises(ConfigurationError, match="not a dataclass, pydantic model"):
        types.register(PlainEvent, "y")


@pytest.mark.parametrize(
    ("cls", "text"),
    [
        (WithSet, "set"),
        (WithIntKeys, "dict keys must be str"),
        (WithAmbiguousUnion, "a union may combine only"),
    ],
)
def test_unsupported_field_types_fail_at_registration(cls: type[Event], text: str) -> None:
    types = EventTypes()
    with pytest.raises(ConfigurationError, match=text) as info:
        types.register(cls, "x")
    assert cls.__qualname__ in str(info.value)
    assert types.names() == []


def test_unknown_name_and_unregistered_class_are_serialization_errors() -> None:
    types = EventTypes()
    with pytest.raises(SerializationError, match="unknown event type 'nope'"):
        types.type_for("nope")
    with pytest.raises(SerializationError, match="not registered"):
        types.name_for(Opened)


def test_renaming_the_python_class_keeps_old_events_readable() -> None:
    before = EventTypes()
    before.register(Opened, "account.opened")
    stored = JsonSerializer(before).encode(Opened("a-1", "ada"))

    after = EventTypes()  # the new deployment: the class was renamed, the name kept
    after.register(OpenedRenamed, "account.opened")
    decoded = JsonSerializer(after).decode(stored.type, stored.schema_version, stored.data)
    assert decoded == OpenedRenamed("a-1", "ada")


def test_renaming_breaks_events_stored_under_a_default_name() -> None:
    before = EventTypes()
    before.register(Opened)
    stored = JsonSerializer(before).encode(Opened("a-1", "ada"))
    after = EventTypes()
    after.register(OpenedRenamed)
    with pytest.raises(SerializationError, match="unknown event type"):
        JsonSerializer(after).decode(stored.type, stored.schema_version, stored.data)


def test_fields_with_init_false_are_not_serialized() -> None:
    types = EventTypes()
    types.register(WithDerived, "derived")
    serializer = JsonSerializer(types)
    encoded = serializer.encode(WithDerived(21))
    assert encoded.data == '{"a":21}'
    assert serializer.decode("derived", 1, encoded.data) == WithDerived(21)


def test_check_lists_missing_upcaster_steps() -> None:
    types = EventTypes()
    types.register(Opened, "account.opened", version=3)
    types.register(Closed, "account.closed", version=1)
    types.register_upcaster("account.opened", 1, lambda d: d)
    with pytest.raises(ConfigurationError, match=r"'account\.opened' \(v3\) lacks upcasters 2->3"):
        types.check()
    types.register_upcaster("account.opened", 2, lambda d: d)
    types.check()


def test_duplicate_or_invalid_upcaster_is_rejected() -> None:
    types = EventTypes()
    types.register_upcaster("a", 1, lambda d: d)
    with pytest.raises(ConfigurationError, match="already registered"):
        types.register_upcaster("a", 1, lambda d: d)
    with pytest.raises(ConfigurationError, match="from_version must be an int >= 1"):
        types.register_upcaster("a", 0, lambda d: d)


@dataclass(frozen=True, slots=True)
class Node:
    children: list[Node]
    bad: set[int]


@dataclass(frozen=True, slots=True)
class GoodNode:
    children: list[GoodNode]


@dataclass(frozen=True, slots=True)
class UsesNodes(Event):
    nodes: list[Node]


@dataclass(frozen=True, slots=True)
class UsesGoodNodes(Event):
    nodes: list[GoodNode]


def test_a_failed_registration_leaves_no_half_built_plans() -> None:
    types = EventTypes()
    with pytest.raises(ConfigurationError, match="set"):
        types.register(UsesNodes, "uses.nodes")
    types.register(UsesGoodNodes, "uses.good")
    serializer = JsonSerializer(types)
    event = UsesGoodNodes([GoodNode([GoodNode([])])])
    assert serializer.decode("uses.good", 1, serializer.encode(event).data) == event
    with pytest.raises(SerializationError, match="unknown event type"):
        serializer.decode("uses.nodes", 1, "{}")
