"""Envelope wire form, signing, partitioning and bad input."""

from __future__ import annotations

import zlib

import pytest

from cqrskit.errors import ConfigurationError, EnvelopeError, SignatureError
from cqrskit.eventlog import StoredEvent
from cqrskit.messaging import (
    Envelope,
    HmacSigner,
    check_partitions,
    check_token,
    partition_of,
    traceparent_for,
)
from cqrskit.messaging.partitioning import MAX_PARTITIONS

KEY = b"k" * 32


def stored(stream: str = "acct-1", data: str = '{"amount": 5}') -> StoredEvent:
    return StoredEvent(
        42,
        stream,
        7,
        "bank.deposited",
        2,
        data,
        {
            "message_id": "0f3c1a2b-4d5e-4f60-8a7b-9c0d1e2f3a4b-0",
            "correlation_id": "0f3c1a2b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
            "causation_id": "0f3c1a2b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
            "timestamp": "2026-05-01T10:00:00.000001+00:00",
        },
    )


def test_envelope_carries_every_field_and_round_trips() -> None:
    env = Envelope.from_stored(stored(), 3, 8, 11)
    h = env.headers()
    assert h["cqrskit-partition"] == "3/8"
    assert h["cqrskit-sequence"] == "11"
    assert h["cqrskit-position"] == "42"
    assert (
        h["traceparent"] == "00-0f3c1a2b4d5e4f608a7b9c0d1e2f3a4b-" + h["traceparent"][36:52] + "-01"
    )
    back = Envelope.from_wire(h, env.payload)
    assert back == env
    assert back.to_stored() == stored()


def test_traceparent_is_w3c_shaped_and_stable() -> None:
    a = traceparent_for("not-a-uuid", "m-1")
    assert a == traceparent_for("not-a-uuid", "m-1")
    version, trace, span, flags = a.split("-")
    assert (version, flags, len(trace), len(span)) == ("00", "01", 32, 16)
    assert traceparent_for(None, "m-1") != traceparent_for(None, "m-2")


@pytest.mark.parametrize(
    "stream", ["a b", "café", "x%41", " lead", "tab\there", "line\r\nbreak", "a.*>", "\udcff"]
)
def test_awkward_stream_ids_survive_the_headers(stream: str) -> None:
    env = Envelope.from_stored(stored(stream), 0, 1, 1)
    h = env.headers()
    assert all(v.isascii() and v.isprintable() and v == v.strip() for v in h.values())
    assert Envelope.from_wire(h, env.payload).stream == stream


def test_headers_as_bytes_and_in_any_case_decode() -> None:
    env = Envelope.from_stored(stored(), 0, 1, 1)
    raw = {k.upper().encode(): v.encode() for k, v in env.headers().items()}
    raw[b"unrelated"] = b"ignored"
    assert Envelope.from_wire(raw, env.payload) == env


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"cqrskit-id": None}, "cqrskit-id"),
        ({"cqrskit-sequence": "0"}, "cqrskit-sequence"),
        ({"cqrskit-sequence": "-1"}, "cqrskit-sequence"),
        ({"cqrskit-version": "1e3"}, "cqrskit-version"),
        ({"cqrskit-position": "9" * 30}, "cqrskit-position"),
        ({"cqrskit-partition": "8/8"}, "partition"),
        ({"cqrskit-partition": "x"}, "partition"),
        ({"cqrskit-partition": "\u00b2/4"}, "partition"),  # a digit to isdigit(), not to int()
        ({"cqrskit-partition": "0/\u0664"}, "partition"),  # an Arabic-Indic four
        ({"cqrskit-partition": "0/4097"}, "partition"),  # more than MAX_PARTITIONS
        ({"cqrskit-partition": "4096/65536"}, "partition"),
        ({"cqrskit-partition": "0/0"}, "partition"),
        ({"cqrskit-position": "9" * 19}, "cqrskit-position"),  # past a signed 64-bit integer
        ({"cqrskit-kind": "py/object"}, "kind"),
        ({"cqrskit-stream": "%ff%fe"}, "percent"),
        ({"cqrskit-type": "x" * 5000}, "longer"),
    ],
)
def test_malformed_headers_are_envelope_errors(change: dict[str, str | None], text: str) -> None:
    env = Envelope.from_stored(stored(), 0, 8, 1)
    h: dict[str, str] = env.headers()
    for k, v in change.items():
        if v is None:
            del h[k]
        else:
            h[k] = v
    with pytest.raises(EnvelopeError, match=text):
        Envelope.from_wire(h, env.payload)


def test_the_envelope_takes_the_partition_counts_the_relay_can_use() -> None:
    """One bound for both: a relay can run MAX_PARTITIONS partitions, no more."""
    last = Envelope.from_stored(stored(), MAX_PARTITIONS - 1, MAX_PARTITIONS, 1)
    assert Envelope.from_wire(last.headers(), last.payload) == last
    with pytest.raises(ConfigurationError):
        check_partitions(MAX_PARTITIONS + 1)
    beyond = Envelope.from_stored(stored(), 0, MAX_PARTITIONS + 1, 1)
    with pytest.raises(EnvelopeError, match="partition"):
        Envelope.from_wire(beyond.headers(), beyond.payload)


def test_size_is_checked_before_anything_else() -> None:
    with pytest.raises(EnvelopeError, match="exceeds max_bytes"):
        Envelope.from_wire({}, b"x" * 101, max_bytes=100)


def test_not_an_envelope_names_the_problem() -> None:
    with pytest.raises(EnvelopeError, match="not a cqrskit envelope"):
        Envelope.from_wire({"content-type": "application/json"}, b"{}")


def test_signature_verifies_and_fails_closed() -> None:
    signer = HmacSigner({"k1": KEY})
    env = Envelope.from_stored(stored(), 1, 4, 5).signed(signer, "events.1")
    h = env.headers()
    assert h["cqrskit-key"] == "k1"
    assert Envelope.from_wire(h, env.payload, destination="events.1", verifier=signer) == env
    unsigned = Envelope.from_stored(stored(), 1, 4, 5)
    with pytest.raises(SignatureError, match="not signed"):
        Envelope.from_wire(unsigned.headers(), b"{}", destination="events.1", verifier=signer)
    with pytest.raises(SignatureError, match="does not match"):
        Envelope.from_wire(h, b'{"amount": 500}', destination="events.1", verifier=signer)
    with pytest.raises(SignatureError, match="does not match"):
        Envelope.from_wire(h, env.payload, destination="events.2", verifier=signer)
    with pytest.raises(SignatureError, match="does not match"):
        Envelope.from_wire(
            {**h, "cqrskit-sequence": "6"}, env.payload, destination="events.1", verifier=signer
        )
    with pytest.raises(SignatureError, match="unknown key id"):
        Envelope.from_wire(h, env.payload, destination="events.1", verifier=HmacSigner({"k2": KEY}))
    with pytest.raises(EnvelopeError, match="destination"):
        Envelope.from_wire(h, env.payload, verifier=signer)


def test_key_rotation_old_messages_still_verify() -> None:
    old = HmacSigner({"k1": KEY})
    rotated = HmacSigner({"k1": KEY, "k2": b"n" * 32}, active="k2")
    a = Envelope.from_stored(stored(), 0, 1, 1).signed(old, "d")
    b = Envelope.from_stored(stored(), 0, 1, 2).signed(rotated, "d")
    assert b.key_id == "k2"
    for env in (a, b):
        Envelope.from_wire(env.headers(), env.payload, destination="d", verifier=rotated)


def test_signer_refuses_weak_or_unnamed_keys_without_echoing_them() -> None:
    with pytest.raises(ConfigurationError) as info:
        HmacSigner({"k1": b"short-secret"})
    assert "short-secret" not in str(info.value)
    with pytest.raises(ConfigurationError):
        HmacSigner({"bad id": KEY})
    with pytest.raises(ConfigurationError):
        HmacSigner({"a": KEY, "b": KEY})
    with pytest.raises(ConfigurationError):
        HmacSigner({})
    assert "kkkk" not in repr(HmacSigner({"a": KEY}))


def test_partition_is_crc32_mod_n_and_spreads() -> None:
    assert partition_of("acct-1", 1) == 0
    assert partition_of("acct-1", 8) == zlib.crc32(b"acct-1") % 8
    counts = [0] * 8
    for i in range(8000):
        counts[partition_of(f"account-{i}", 8)] += 1
    assert min(counts) > 800
    for bad in (0, -1, 5000, True, 2.0):
        with pytest.raises(ConfigurationError):
            check_partitions(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad", ["a*", "a>", "a b", "a\r\n", "", "a..b", "a#", "x\x00", "a\n", "cqrskit.events\n"]
)
def test_broker_name_tokens_reject_wildcards_and_whitespace(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        check_token(bad, "subject prefix")
    assert check_token("cqrskit.events-v1_a", "subject prefix") == "cqrskit.events-v1_a"
