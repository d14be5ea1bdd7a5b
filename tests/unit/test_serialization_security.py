"""Decoding rules from the RELIABILITY.md security checklist, for both codecs."""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from cqrskit.errors import SerializationError
from cqrskit.messages import Event
from cqrskit.serialization import EventTypes, JsonSerializer, Limits, OrjsonSerializer, _codec


@dataclass(frozen=True, slots=True)
class Opened(Event):
    account_id: str
    owner: str
    amount: int = 0


@dataclass(frozen=True, slots=True)
class Lenient(Event):
    account_id: str


@dataclass(frozen=True, slots=True)
class Bag(Event):
    value: Any


class Boom:
    """Unpickling this would fail the test: proves no pickle is ever loaded."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (pytest.fail, ("a pickle payload was unpickled",))


def registry() -> EventTypes:
    types = EventTypes()
    types.register(Opened, "account.opened")
    types.register(Lenient, "lenient", ignore_unknown_fields=True)
    types.register(Bag, "bag")
    return types


@pytest.fixture(params=[JsonSerializer, OrjsonSerializer])
def serializer(request: pytest.FixtureRequest) -> JsonSerializer:
    return request.param(registry())


@pytest.fixture
def no_system(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> int:
        pytest.fail("os.system was called")

    monkeypatch.setattr(os, "system", fail)


def bag(serializer: JsonSerializer, value_json: str) -> Any:
    event = serializer.decode("bag", 1, '{"value":' + value_json + "}")
    assert isinstance(event, Bag)
    return event.value


# --- types come from the registry only ---------------------------------------------------


@pytest.mark.parametrize(
    "type_name",
    [
        "os.system",
        "builtins.eval",
        "subprocess.Popen",
        "antigravity",
        "this.s",
        "__main__.Opened",
        f"{__name__}.Opened",
        "cqrskit.messages.Event",
        "",
        "a" * 10_000,
    ],
)
def test_type_names_are_looked_up_never_imported(
    serializer: JsonSerializer, no_system: None, type_name: str
) -> None:
    before = set(sys.modules)
    with pytest.raises(SerializationError, match="unknown event type") as info:
        serializer.decode(type_name, 1, '{"account_id":"a","owner":"b"}')
    assert set(sys.modules) == before
    assert len(str(info.value)) < 400  # an attacker's name is shortened, not echoed whole


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_payloads_are_never_unpickled(serializer: JsonSerializer, protocol: int) -> None:
    payload = pickle.dumps(Boom(), protocol=protocol)
    before = set(sys.modules)
    with pytest.raises(SerializationError):
        serializer.decode("account.opened", 1, payload)
    with pytest.raises(SerializationError):
        serializer.decode("account.opened", 1, payload.decode("latin-1"))
    assert set(sys.modules) == before


def test_yaml_tags_are_just_invalid_json(serializer: JsonSerializer, no_system: None) -> None:
    with pytest.raises(SerializationError, match="not valid JSON"):
        serializer.decode("account.opened", 1, '!!python/object/apply:os.system ["true"]')


@pytest.mark.parametrize("field", ["__class__", "py/object", "py/reduce", "__type__", "$type"])
def test_class_hint_fields_are_rejected_as_unknown(
    serializer: JsonSerializer, no_system: None, field: str
) -> None:
    before = set(sys.modules)
    data = json.dumps({field: "os.system", "account_id": "a", "owner": "b"})
    with pytest.raises(SerializationError) as info:
        serializer.decode("account.opened", 1, data)
    assert f"unknown field(s) {field!r}" in str(info.value)
    assert "'account.opened'" in str(info.value)
    assert set(sys.modules) == before


def test_class_hint_fields_are_inert_when_unknown_fields_are_ignored(
    serializer: JsonSerializer, no_system: None
) -> None:
    before = set(sys.modules)
    data = '{"__class__":"os.system","py/object":"builtins.eval","account_id":"a"}'
    assert serializer.decode("lenient", 1, data) == Lenient("a")
    assert bag(serializer, '{"py/object":"subprocess.Popen"}') == {"py/object": "subprocess.Popen"}
    assert set(sys.modules) == before


# --- size, depth, strings, integers ----------------------------------------------------------


def test_size_is_checked_before_parsing(
    serializer: JsonSerializer, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = type(serializer)(registry(), limits=Limits(max_bytes=1000))
    parsed: list[str] = []
    real_parse = _codec._TextCodec.parse

    def spy(self: _codec._TextCodec, text: str) -> Any:
        parsed.append(text)
        return real_parse(self, text)

    monkeypatch.setattr(_codec._TextCodec, "parse", spy)
    monkeypatch.setattr(_codec._OrjsonTextCodec, "parse", spy)
    for payload in ("[" * 1001, b"[" * 1001, "é" * 501):  # 1001 chars, 1001 bytes, 1002 bytes
        with pytest.raises(SerializationError, match="exceeds the limit of 1000"):
            small.decode("bag", 1, payload)
    assert parsed == []
    assert small.decode("bag", 1, '{"value":"' + "é" * 400 + '"}') == Bag("é" * 400)
    assert len(parsed) == 1


def test_default_size_limit_rejects_a_large_payload(serializer: JsonSerializer) -> None:
    with pytest.raises(SerializationError, match="exceeds the limit of 1000000"):
        serializer.decode("bag", 1, '{"value":"' + "x" * 1_000_000 + '"}')


def test_nesting_depth_limit(serializer: JsonSerializer) -> None:
    # top-level object is depth 1, so the value may nest 31 arrays
    assert bag(serializer, "[" * 31 + "]" * 31) is not None
    with pytest.raises(SerializationError, match="nesting is deeper than the limit of 32"):
        bag(serializer, "[" * 32 + "]" * 32)
    with pytest.raises(SerializationError, match="nesting is deeper than the limit of 32"):
        bag(serializer, '{"a":' * 40 + "1" + "}" * 40)


def test_very_deep_nesting_is_rejected_without_recursion_error(serializer: JsonSerializer) -> None:
    with pytest.raises(SerializationError, match="nesting is deeper"):
        bag(serializer, "[" * 200_000 + "]" * 200_000)


def test_string_length_limit_applies_to_values_and_keys() -> None:
    for cls in (JsonSerializer, OrjsonSerializer):
        serializer = cls(registry(), limits=Limits(max_string_length=10))
        assert bag(serializer, '"' + "x" * 10 + '"') == "x" * 10
        with pytest.raises(SerializationError, match="longer than the limit of 10"):
            bag(serializer, '"' + "x" * 11 + '"')
        with pytest.raises(SerializationError, match="longer than the limit of 10"):
            bag(serializer, '{"' + "k" * 11 + '":1}')


def test_integer_digit_limit(serializer: JsonSerializer) -> None:
    assert bag(serializer, "9" * 40) == int("9" * 40)
    assert bag(serializer, "-" + "9" * 40) == -int("9" * 40)
    for digits in (41, 5000, 100_000):
        with pytest.raises(SerializationError, match=r"integer|digits"):
            bag(serializer, "9" * digits)


@pytest.mark.parametrize("number", ["18446744073709551616", "-9223372036854775809", "1" * 25])
def test_integers_beyond_64_bits_keep_every_digit(serializer: JsonSerializer, number: str) -> None:
    value = bag(serializer, number)
    assert type(value) is int
    assert value == int(number)


# --- invalid numbers, duplicates, unicode ------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_non_finite_numbers_are_rejected(serializer: JsonSerializer, literal: str) -> None:
    with pytest.raises(SerializationError, match=r"NaN|Infinity|not valid JSON"):
        bag(serializer, literal)
    with pytest.raises(SerializationError):
        bag(serializer, f"[1, {literal}]")


@pytest.mark.parametrize(
    "data",
    [
        '{"account_id":"a","owner":"b","account_id":"c"}',
        '{"account_id":"a","owner":"b","\\u0061ccount_id":"c"}',
        '{"account_id":"a","owner":"b","owner" :"c"}',
        '{"account_id" : "a" , "owner" : "b" , "owner" : "b"}',
    ],
)
def test_duplicate_keys_are_rejected(serializer: JsonSerializer, data: str) -> None:
    with pytest.raises(SerializationError, match="duplicate key"):
        serializer.decode("account.opened", 1, data)


def test_nested_duplicate_keys_are_rejected(serializer: JsonSerializer) -> None:
    with pytest.raises(SerializationError, match="duplicate key 'x'"):
        bag(serializer, '[{"y":"\\":","x":1,"x":2}]')


def test_strings_that_look_like_keys_do_not_hide_duplicates(serializer: JsonSerializer) -> None:
    # the text contains `":` inside strings and whitespace before colons
    assert bag(serializer, '{"a\\":":"\\":", "b" :"c\\\\"}') == {'a":': '":', "b": "c\\"}
    with pytest.raises(SerializationError, match="duplicate key"):
        bag(serializer, '{"a\\":":"\\":", "b" :1,"b":2}')


@pytest.mark.parametrize(
    "value",
    ['"\\ud800"', '"a\\udfffb"', '{"\\ud83d":1}', '"\\u0000"', '"a\\u0000b"', '{"\\u0000":1}'],
)
def test_lone_surrogates_and_nul_escapes_are_rejected(
    serializer: JsonSerializer, value: str
) -> None:
    with pytest.raises(SerializationError, match=r"lone surrogate|NUL"):
        bag(serializer, value)


def test_valid_surrogate_pairs_are_fine(serializer: JsonSerializer) -> None:
    assert bag(serializer, '"\\ud83d\\ude00"') == "😀"


@pytest.mark.parametrize("raw", ["\ud800", "\x00"])
def test_raw_surrogate_or_nul_in_text_is_rejected(serializer: JsonSerializer, raw: str) -> None:
    with pytest.raises(SerializationError):
        bag(serializer, '"' + raw + '"')


@pytest.mark.parametrize(
    "data", [b'{"value":"\xff"}', b'{"value":"\xed\xa0\x80"}', b"\xef\xbb\xbf{}"]
)
def test_invalid_utf8_bytes_are_rejected(serializer: JsonSerializer, data: bytes) -> None:
    with pytest.raises(SerializationError, match=r"UTF-8|not valid JSON"):
        serializer.decode("bag", 1, data)


# --- shape of the payload ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data", ["[]", '"x"', "1", "null", "", "   ", "{", '{"a":1} {}', "{'a':1}"]
)
def test_non_object_or_invalid_json_is_rejected(serializer: JsonSerializer, data: str) -> None:
    with pytest.raises(SerializationError, match=r"'account\.opened'"):
        serializer.decode("account.opened", 1, data)


def test_missing_required_field_names_type_and_field(serializer: JsonSerializer) -> None:
    with pytest.raises(SerializationError) as info:
        serializer.decode("account.opened", 1, '{"account_id":"a"}')
    assert str(info.value).startswith(
        f"cannot decode event 'account.opened' (schema version 1, {__name__}.Opened): "
        "field 'owner': required field is missing."
    )
    assert info.value.message_type is Opened


def test_unknown_fields_are_rejected_by_default_and_listed(serializer: JsonSerializer) -> None:
    with pytest.raises(SerializationError, match=re.escape("unknown field(s) 'x', 'y'")):
        serializer.decode("account.opened", 1, '{"account_id":"a","owner":"b","y":1,"x":2}')


def test_unknown_fields_can_be_ignored_per_type(serializer: JsonSerializer) -> None:
    assert serializer.decode("lenient", 1, '{"account_id":"a","gone":1}') == Lenient("a")


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ('{"account_id":1,"owner":"b"}', "field 'account_id': expected a string, got number"),
        ('{"account_id":"a","owner":null}', "field 'owner': expected a string, got null"),
        ('{"account_id":"a","owner":"b","amount":1.5}', "field 'amount': expected an integer"),
        ('{"account_id":"a","owner":"b","amount":true}', "expected an integer, got boolean"),
    ],
)
def test_wrong_field_types_name_the_field(serializer: JsonSerializer, data: str, text: str) -> None:
    with pytest.raises(SerializationError, match=re.escape(text)):
        serializer.decode("account.opened", 1, data)


def test_serialization_errors_are_value_errors_not_retryable_types() -> None:
    # Retry behaviors retry transient errors; a SerializationError is a data error.
    assert issubclass(SerializationError, ValueError)
    assert not issubclass(SerializationError, (TimeoutError, ConnectionError, OSError))


def test_limit_errors_point_at_the_offending_value(serializer: JsonSerializer) -> None:
    with pytest.raises(
        SerializationError, match=re.escape("field 'value[1].k': a string contains")
    ):
        bag(serializer, '[1,{"k":"\\u0000"}]')
    with pytest.raises(SerializationError, match=re.escape("field 'value': NaN and Infinity")):
        serializer.encode(Bag(float("-inf")))


@pytest.mark.parametrize("field", ["max_bytes", "max_depth", "max_string_length", "max_int_digits"])
@pytest.mark.parametrize("value", [0, -1, 1.5, None])
def test_limits_must_be_positive_ints(field: str, value: object) -> None:
    from cqrskit.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=f"Limits.{field} must be an int >= 1"):
        Limits(**{field: value})  # type: ignore[arg-type]
