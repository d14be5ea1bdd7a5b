"""Signing keys of the relay and consume CLIs: the file / variable format, file modes,
and errors that name the problem without showing a secret."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cqrskit.cli._keys import signer_from, verifier_from
from cqrskit.errors import ConfigurationError, SignatureError

SECRET = "5ec12e7" + "a" * 57  # 32 bytes in hex; recognisable in any output
OTHER = "0be" + "c" * 61


def write(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def refused(exc: pytest.ExceptionInfo[ConfigurationError], *words: str) -> None:
    text = str(exc.value)
    for word in words:
        assert word in text, text
    assert exc.value.hint
    for secret in (SECRET, OTHER, SECRET[:16]):
        assert secret not in text


def test_no_key_options_no_signing() -> None:
    assert signer_from(None, None) is None
    assert verifier_from([], []) is None


def test_a_relay_key_file_signs_and_a_consumer_verifies_with_keys_from_file_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = signer_from(write(tmp_path / "k", f"# active\n\n  k2:{SECRET}  \n"), None)
    assert relay is not None
    assert relay.active == "k2"
    key_id, mac = relay.sign(b"data")
    monkeypatch.setenv("VERIFY", f"k2:{SECRET.upper()}, k1:{OTHER}")
    consumer = verifier_from([write(tmp_path / "old", f"k1:{OTHER}\n", 0o440)], ["VERIFY"])
    assert consumer is not None
    consumer.verify(key_id, mac, b"data")
    with pytest.raises(SignatureError):
        consumer.verify(key_id, mac, b"other data")
    monkeypatch.setenv("SIGN", f"k9:{OTHER}")
    via_env = signer_from(None, "SIGN")
    assert via_env is not None
    assert via_env.active == "k9"
    assert SECRET not in repr(consumer)


def test_a_missing_file_or_variable_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as exc:
        signer_from(str(tmp_path / "nope.key"), None)
    refused(exc, "--signing-key-file", "nope.key", "no such file")
    with pytest.raises(ConfigurationError) as exc:
        verifier_from([], ["CQRSKIT_TEST_UNSET_KEY"])
    refused(exc, "--verify-key-env", "CQRSKIT_TEST_UNSET_KEY", "not set")
    with pytest.raises(ConfigurationError) as exc:
        verifier_from([str(tmp_path)], [])
    refused(exc, "not a regular file")


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o620, 0o666])
def test_a_key_file_others_can_read_or_change_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "k", f"k1:{SECRET}\n", mode)
    with pytest.raises(ConfigurationError) as exc:
        signer_from(path, None)
    refused(exc, f"mode {mode:04o}", "chmod 600")
    with pytest.raises(ConfigurationError):
        verifier_from([path], [])


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_private_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    assert verifier_from([write(tmp_path / "k", f"k1:{SECRET}\n", mode)], []) is not None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (f"{SECRET}\n", ["line 1", "KEY_ID:SECRET"]),
        (f"# comment\nk-1:{SECRET}\n", ["line 2", "letters and digits"]),
        (f"k1:{SECRET[:-2]}zz\n", ["line 1", "not hexadecimal"]),
        (f"{SECRET}:k1\n", ["line 1", "not hexadecimal"]),  # the wrong way round
        (f"k1:{SECRET}a\n", ["not hexadecimal"]),  # an odd number of digits
        ("k1:00112233445566778899aabbccddee\n", ["15 bytes", "at least 16"]),
        ("# nothing but a comment\n\n", ["holds no key"]),
        (f"k1:{SECRET}\nk1:{OTHER}\n", ["'k1'", "twice"]),
        ("k1:\u00e9\n", ["ASCII"]),
    ],
)
def test_a_malformed_key_is_named_without_its_secret(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    with pytest.raises(ConfigurationError) as exc:
        verifier_from([write(tmp_path / "k", text)], [])
    refused(exc, str(tmp_path / "k"), *words)


def test_a_malformed_variable_names_the_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYS", f"k1:{SECRET},k2:{OTHER[:20]}")
    with pytest.raises(ConfigurationError) as exc:
        verifier_from([], ["KEYS"])
    refused(exc, "$KEYS, entry 2", "10 bytes")


def test_the_relay_signs_with_one_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as exc:
        signer_from(write(tmp_path / "k", f"k1:{OTHER}\nk2:{SECRET}\n"), None)
    refused(exc, "2 keys (k1, k2)", "signs with one")


def test_one_key_id_with_two_secrets_across_sources_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYS", f"k1:{OTHER}")
    with pytest.raises(ConfigurationError) as exc:
        verifier_from([write(tmp_path / "k", f"k1:{SECRET}\n")], ["KEYS"])
    refused(exc, "'k1'", "different secret")
    # the same key given twice is no conflict
    monkeypatch.setenv("KEYS", f"k1:{SECRET}")
    assert verifier_from([str(tmp_path / "k")], ["KEYS"]) is not None
