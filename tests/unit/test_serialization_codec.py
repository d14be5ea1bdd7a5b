"""Encoding and decoding of dataclass, pydantic and msgspec events with both codecs."""

from __future__ import annotations

import enum
import re
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal, NewType

import msgspec
import pydantic
import pytest

from cqrskit.errors import MissingExtraError, SerializationError
from cqrskit.eventlog import StoredEvent
from cqrskit.messages import Event
from cqrskit.serialization import (
    EncodedEvent,
    EventTypes,
    JsonSerializer,
    OrjsonSerializer,
    Serializer,
)

AccountId = NewType("AccountId", str)


class Currency(enum.Enum):
    EUR = "EUR"
    USD = "USD"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass(frozen=True, slots=True)
class Address:
    street: str
    city: str
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Everything(Event):
    account_id: AccountId
    ref: uuid.UUID
    at: datetime
    day: date
    clock: time
    amount: Decimal
    currency: Currency
    level: Level
    address: Address
    ratio: float
    count: int
    flag: bool
    blob: bytes
    kind: Literal["a", "b", 1]
    either: int | str
    maybe: Address | None
    pairs: tuple[int, str]
    many: tuple[Address, ...]
    by_name: dict[str, list[int]]
    anything: Any
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Small(Event):
    a: int
    b: str = "x"


@dataclass(frozen=True, slots=True)
class Tree(Event):
    label: str
    children: list[Tree] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Checked(Event):
    amount: int

    def __post_init__(self) -> None:
        if self.amount < 0:
            raise ValueError("amount must not be negative")


@dataclass(frozen=True, slots=True)
class WithDict(Event):
    values: dict[str, int]


class PydanticOpened(Event, pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)

    account_id: uuid.UUID
    owner: str
    at: datetime
    tags: list[str] = []


class PydanticLoose(Event, pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    a: int


class MsgspecOpened(msgspec.Struct, Event, frozen=True):
    account_id: uuid.UUID
    owner: str
    at: datetime
    amount: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class Untyped(Event):
    payload: dict[str, Any]


def everything() -> Everything:
    return Everything(
        account_id=AccountId("acc-1"),
        ref=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        at=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
        day=date(2024, 2, 29),
        clock=time(23, 59, 1),
        amount=Decimal("1234.5600"),
        currency=Currency.EUR,
        level=Level.HIGH,
        address=Address("1 Main St", "Zürich", ["c/o Ada"]),
        ratio=0.1,
        count=-(2**62),
        flag=False,
        blob=b"\x00\xff",
        kind=1,
        either="7",
        maybe=None,
        pairs=(1, "one"),
        many=(Address("a", "b"), Address("c", "d")),
        by_name={"x": [1, 2], "y": []},
        anything={"nested": [1, "two", None, True, 2.5]},
        note="🙂 ok",
    )


@pytest.fixture
def event_types() -> EventTypes:
    types = EventTypes()
    types.register(Everything, "everything")
    types.register(Small, "small")
    types.register(Tree, "tree")
    types.register(Checked, "checked")
    types.register(WithDict, "with.dict")
    types.register(PydanticOpened, "pydantic.opened")
    types.register(PydanticLoose, "pydantic.loose")
    types.register(MsgspecOpened, "msgspec.opened")
    types.register(Untyped, "untyped")
    return types


@pytest.fixture(params=[JsonSerializer, OrjsonSerializer])
def serializer(request: pytest.FixtureRequest, event_types: EventTypes) -> JsonSerializer:
    return request.param(event_types)


def test_both_serializers_satisfy_the_port(event_types: EventTypes) -> None:
    ports: list[Serializer] = [JsonSerializer(event_types), OrjsonSerializer(event_types)]
    assert all(isinstance(p.encode(Small(1)), EncodedEvent) for p in ports)


def test_round_trip_of_every_supported_field_kind(serializer: JsonSerializer) -> None:
    event = everything()
    encoded = serializer.encode(event)
    assert (encoded.type, encoded.schema_version) == ("everything", 1)
    decoded = serializer.decode(encoded.type, encoded.schema_version, encoded.data)
    assert decoded == event
    assert isinstance(decoded, Everything)
    assert type(decoded.currency) is Currency
    assert type(decoded.pairs) is tuple
    assert type(decoded.many[0]) is Address
    assert decoded.amount.as_tuple() == Decimal("1234.5600").as_tuple()


def test_values_are_converted_deterministically(serializer: JsonSerializer) -> None:
    data = serializer.encode(everything()).data
    assert '"ref":"12345678-1234-5678-1234-567812345678"' in data
    assert '"at":"2024-05-06T07:08:09.123456+00:00"' in data
    assert '"day":"2024-02-29"' in data
    assert '"clock":"23:59:01"' in data
    assert '"amount":"1234.5600"' in data
    assert '"currency":"EUR","level":2' in data
    assert '"blob":"AP8="' in data
    assert '"city":"Zürich"' in data  # UTF-8, not \u escapes
    assert "🙂" in data


def test_stdlib_and_orjson_write_the_same_text(event_types: EventTypes) -> None:
    for event in (everything(), Small(1), Tree("r", [Tree("c")])):
        assert JsonSerializer(event_types).encode(event) == OrjsonSerializer(event_types).encode(
            event
        )


def test_dict_fields_are_written_in_sorted_key_order(serializer: JsonSerializer) -> None:
    one = serializer.encode(WithDict({"b": 1, "a": 2}))
    two = serializer.encode(WithDict({"a": 2, "b": 1}))
    assert one.data == two.data == '{"values":{"a":2,"b":1}}'


def test_other_timezones_and_naive_datetimes_round_trip(serializer: JsonSerializer) -> None:
    event = everything()
    tz = timezone(timedelta(hours=-3, minutes=-30))
    for at in (datetime(2024, 1, 1, 12, tzinfo=tz), datetime(2024, 1, 1, 12)):
        changed = Everything(**{**_fields(event), "at": at})
        encoded = serializer.encode(changed)
        back = serializer.decode(encoded.type, 1, encoded.data)
        assert isinstance(back, Everything)
        assert back.at == at
        assert back.at.utcoffset() == at.utcoffset()


def _fields(event: Everything) -> dict[str, Any]:
    return {name: getattr(event, name) for name in Everything.__dataclass_fields__}


def test_recursive_dataclass(serializer: JsonSerializer) -> None:
    tree = Tree("root", [Tree("a", [Tree("a1")]), Tree("b")])
    encoded = serializer.encode(tree)
    assert serializer.decode("tree", 1, encoded.data) == tree


def test_defaults_fill_missing_optional_fields(serializer: JsonSerializer) -> None:
    assert serializer.decode("small", 1, '{"a":5}') == Small(5, "x")


def test_decode_bytes_and_decode_stored(serializer: JsonSerializer) -> None:
    assert serializer.decode("small", 1, b'{"a":1,"b":"y"}') == Small(1, "y")
    stored = StoredEvent(
        position=7, stream="s-1", version=1, type="small", schema_version=1, data='{"a":2}'
    )
    assert serializer.decode_stored(stored) == Small(2)


def test_pydantic_events(serializer: JsonSerializer) -> None:
    event = PydanticOpened(
        account_id=uuid.UUID(int=5), owner="ada", at=datetime(2024, 1, 1, tzinfo=UTC)
    )
    encoded = serializer.encode(event)
    assert encoded.type == "pydantic.opened"
    assert serializer.decode(encoded.type, 1, encoded.data) == event
    with pytest.raises(SerializationError, match=r"unknown field\(s\) 'extra'"):
        serializer.decode("pydantic.opened", 1, encoded.data[:-1] + ',"extra":1}')
    with pytest.raises(SerializationError, match="owner: Input should be a valid string") as info:
        serializer.decode(
            "pydantic.opened",
            1,
            '{"account_id":"00000000-0000-0000-0000-000000000005","owner":12345678,'
            '"at":"2024-01-01T00:00:00Z"}',
        )
    assert "12345678" not in str(info.value)  # input values are not echoed
    assert info.value.message_type is PydanticOpened


def test_pydantic_explicit_extra_setting_is_respected(serializer: JsonSerializer) -> None:
    assert serializer.decode("pydantic.loose", 1, '{"a":1,"zzz":2}') == PydanticLoose(a=1)


def test_msgspec_events(serializer: JsonSerializer) -> None:
    event = MsgspecOpened(
        uuid.UUID(int=9), "ada", datetime(2024, 1, 1, tzinfo=UTC), Decimal("1.50")
    )
    encoded = serializer.encode(event)
    decoded = serializer.decode(encoded.type, 1, encoded.data)
    assert decoded == event
    with pytest.raises(SerializationError, match=r"unknown field\(s\) 'zzz'"):
        serializer.decode("msgspec.opened", 1, encoded.data[:-1] + ',"zzz":1}')
    with pytest.raises(SerializationError, match=r"Expected `str`, got `int` - at `\$.owner`"):
        serializer.decode("msgspec.opened", 1, encoded.data.replace('"owner":"ada"', '"owner":1'))


def test_untyped_fields_carry_any_json(serializer: JsonSerializer) -> None:
    event = Untyped({"a": [1, {"b": None}], "c": 1.5})
    assert serializer.decode("untyped", 1, serializer.encode(event).data) == event


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (Small("1"), "field 'a': expected int, got str"),  # type: ignore[arg-type]
        (Small(True), "field 'a': expected int, got bool"),
        (Tree("r", [Tree(5)]), "field 'children[0].label': expected str"),  # type: ignore[arg-type]
        (Untyped({"x": float("nan")}), "NaN and Infinity are not allowed"),
        (Untyped({"x": object()}), "object is not a JSON type"),
        (Untyped({"x": [datetime(2024, 1, 1)]}), "field 'payload.x[0]': datetime is not a JSON"),
        (Untyped({"x": "a\x00b"}), "NUL character"),
        (Untyped({"x": "\ud800"}), "lone surrogate"),
        (Untyped({"x": 10**50}), "more than 40 digits"),
        (WithDict({"a": 1, 2: 3}), "dict keys must be str"),  # type: ignore[dict-item]
    ],
)
def test_encode_rejects_what_could_not_be_read_back(
    serializer: JsonSerializer, event: Event, text: str
) -> None:
    with pytest.raises(SerializationError, match=re.escape(text)) as info:
        serializer.encode(event)
    assert "cannot encode event" in str(info.value)
    assert info.value.message_type is type(event)


def test_encode_rejects_non_finite_float_and_decimal(serializer: JsonSerializer) -> None:
    base = _fields(everything())
    with pytest.raises(SerializationError, match="field 'ratio': inf is not allowed"):
        serializer.encode(Everything(**{**base, "ratio": float("inf")}))
    with pytest.raises(SerializationError, match="field 'amount': Decimal NaN is not allowed"):
        serializer.encode(Everything(**{**base, "amount": Decimal("NaN")}))
    with pytest.raises(SerializationError, match="field 'day': expected date, got datetime"):
        serializer.encode(Everything(**{**base, "day": datetime(2024, 1, 1)}))


def test_encode_unregistered_class_is_an_error(serializer: JsonSerializer) -> None:
    @dataclass(frozen=True)
    class Stray(Event):
        a: int

    with pytest.raises(SerializationError, match="Stray is not registered"):
        serializer.encode(Stray(1))


def test_constructor_errors_become_serialization_errors(serializer: JsonSerializer) -> None:
    with pytest.raises(
        SerializationError, match="Checked rejected the data: ValueError: amount must not be"
    ) as info:
        serializer.decode("checked", 1, '{"amount":-1}')
    assert isinstance(info.value.__cause__, ValueError)


def test_encode_too_large_is_rejected(event_types: EventTypes) -> None:
    from cqrskit.serialization import Limits

    serializer = JsonSerializer(event_types, limits=Limits(max_bytes=100))
    serializer.encode(Small(1, "x" * 50))
    with pytest.raises(SerializationError, match="exceeds the limit of 100"):
        serializer.encode(Small(1, "é" * 60))  # 60 characters, 120 bytes


def test_orjson_missing_raises_missing_extra(
    monkeypatch: pytest.MonkeyPatch, event_types: EventTypes
) -> None:
    monkeypatch.setitem(sys.modules, "orjson", None)
    with pytest.raises(MissingExtraError, match=r"cqrskit\[orjson\]") as info:
        OrjsonSerializer(event_types)
    assert info.value.extra == "orjson"


def test_the_full_limit_walk_runs_only_when_the_text_shows_a_trace(
    monkeypatch: pytest.MonkeyPatch, serializer: JsonSerializer
) -> None:
    from cqrskit.serialization import _codec

    walked: list[object] = []
    real_walk = _codec._Checker.walk

    def spy(self: _codec._Checker, value: Any, depth: int) -> None:
        if depth == 0:
            walked.append(value)
        real_walk(self, value, depth)

    encoded = serializer.encode(Small(1, "plain e123 " + "1" * 50))
    monkeypatch.setattr(_codec._Checker, "walk", spy)
    assert serializer.decode("small", 1, encoded.data) == Small(1, "plain e123 " + "1" * 50)
    assert walked == []
    # false alarms: an escaped (valid) surrogate pair, brackets inside a string
    for text in ('"\\ud83d\\ude00"', '"' + "[" * 40 + '"'):
        data = '{"a":1,"b":' + text + "}"
        assert isinstance(serializer.decode("small", 1, data), Small)
    assert len(walked) == 2


@dataclass(frozen=True, slots=True)
class Holder(Event):
    opened: PydanticOpened
    struct: MsgspecOpened | None = None


def test_pydantic_and_msgspec_nested_in_a_dataclass(event_types: EventTypes) -> None:
    event_types.register(Holder, "holder")
    at = datetime(2024, 1, 1, tzinfo=UTC)
    event = Holder(
        PydanticOpened(account_id=uuid.UUID(int=1), owner="a", at=at),
        MsgspecOpened(uuid.UUID(int=2), "b", at),
    )
    for serializer in (JsonSerializer(event_types), OrjsonSerializer(event_types)):
        encoded = serializer.encode(event)
        assert serializer.decode("holder", 1, encoded.data) == event
        with pytest.raises(SerializationError, match=r"field 'opened': .*owner: Input should be"):
            serializer.decode("holder", 1, encoded.data.replace('"owner":"a"', '"owner":[]'))
