"""Metadata helpers: encode/decode the ids and ISO timestamp with the same limits."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from cqrskit.errors import SerializationError
from cqrskit.messages import Metadata
from cqrskit.serialization import Limits, decode_metadata, encode_metadata, metadata_from_dict

AT = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def test_metadata_object_round_trip() -> None:
    parent = Metadata(message_id="p1", correlation_id="c1", timestamp=AT)
    child = Metadata(message_id="m2", timestamp=AT, parent=parent)
    text = encode_metadata(child)
    assert text == (
        '{"message_id":"m2","correlation_id":"c1","causation_id":"p1",'
        '"timestamp":"2024-05-06T07:08:09.123456+00:00"}'
    )
    decoded = decode_metadata(text)
    assert decoded == child.as_dict()
    rebuilt = metadata_from_dict(decoded)
    assert (rebuilt.message_id, rebuilt.correlation_id, rebuilt.causation_id) == ("m2", "c1", "p1")
    assert rebuilt.timestamp == AT


def test_extra_keys_are_kept_and_bytes_are_accepted() -> None:
    text = encode_metadata({"message_id": "m", "tenant": "acme", "attempt": 2})
    assert decode_metadata(text.encode()) == {"message_id": "m", "tenant": "acme", "attempt": 2}


def test_missing_timestamp_rebuilds_lazily() -> None:
    rebuilt = metadata_from_dict({"message_id": "m"})
    assert rebuilt.message_id == "m"
    assert rebuilt.correlation_id == "m"
    assert rebuilt.causation_id is None


@pytest.mark.parametrize(
    ("meta", "text"),
    [
        ({"message_id": 5}, "'message_id' must be a string or null"),
        ({"causation_id": ["x"]}, "'causation_id' must be a string or null"),
        ({"timestamp": "yesterday"}, "'timestamp' is not an ISO 8601 datetime"),
        ({"timestamp": 1700000000}, "'timestamp' must be an ISO 8601 string"),
        ({"tenant": float("nan")}, "NaN"),
        ({"tenant": "a\x00"}, "NUL"),
        ({"tenant": "x" * 8001}, "longer than the limit of 8000"),
    ],
)
def test_bad_metadata_is_refused_both_ways(meta: dict[str, object], text: str) -> None:
    with pytest.raises(SerializationError, match=text):
        encode_metadata(meta)
    raw = json.dumps(meta)  # NaN written by the stdlib default, to test the decoder
    with pytest.raises(SerializationError, match="NaN|" + text):
        decode_metadata(raw)


@pytest.mark.parametrize(
    "data",
    [
        "[]",
        "",
        '{"message_id":"a","message_id":"b"}',
        '{"x":Infinity}',
        '{"x":"\\ud800"}',
        "{" * 50,
        b"\xff",
        '{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{}}}}}}}}}',
    ],
)
def test_decode_metadata_rejects_bad_text(data: str | bytes) -> None:
    with pytest.raises(SerializationError, match="cannot decode event metadata"):
        decode_metadata(data)


def test_metadata_size_limit_is_checked_first_and_configurable() -> None:
    with pytest.raises(SerializationError, match="exceeds the limit of 64000"):
        decode_metadata("[" * 64_001)
    with pytest.raises(SerializationError, match="exceeds the limit of 30"):
        decode_metadata('{"message_id":"' + "a" * 30 + '"}', limits=Limits(max_bytes=30))
    with pytest.raises(SerializationError, match="exceeds the limit of 30"):
        encode_metadata({"message_id": "a" * 30}, limits=Limits(max_bytes=30))


def test_metadata_from_dict_validates() -> None:
    with pytest.raises(SerializationError, match="invalid event metadata"):
        metadata_from_dict({"timestamp": "not a time"})
