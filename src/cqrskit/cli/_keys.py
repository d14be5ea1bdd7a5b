"""Signing keys for ``cqrskit relay run`` and ``cqrskit consume run``, from a file or an
environment variable (never from the command line, where ``ps`` would show them).

The format, in a file or a variable: one key per entry, ``KEY_ID:SECRET``, entries
separated by newlines or commas. ``KEY_ID`` is ASCII letters and digits (it travels in
every message's ``cqrskit-key`` header); ``SECRET`` is the key in hexadecimal, at least 32
digits (16 bytes; ``openssl rand -hex 32`` makes a good one). Blank entries and lines
starting with ``#`` are skipped::

    # relay signing key, rotated 2026-03
    k2026a:6f1ed002ab5595859014ebf0951522d9e1d2c4a4e4b2a0f5d3c9d3b1f0e8a7c6

A key file must be a regular file that others cannot read and that only its owner can
write (``0600``, ``0400``, ``0640`` or ``0440``), as PostgreSQL demands of its TLS key:
anyone who can write a consumer's key file can make it accept forged messages. No error
shows a secret: a bad entry is named by its line, or by its position in a variable.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence

from cqrskit.errors import ConfigurationError
from cqrskit.messaging import HmacSigner

__all__ = ["signer_from", "verifier_from"]

_MIN_HEX = 32  # 16 bytes, HmacSigner's minimum
_MAX_FILE = 64 * 1024
_KEY_ID = re.compile(r"[A-Za-z0-9]+")
_SECRET = re.compile(r"(?:[0-9A-Fa-f]{2})+")
_FORMAT_HINT = (
    "write one key per line as KEY_ID:SECRET, the secret in hex (at least 32 digits), "
    'e.g. echo "k1:$(openssl rand -hex 32)"; see docs/operations.md#signing-keys.'
)


def _read_file(path: str, option: str) -> str:
    """The text of a key file, after checking that it is a private regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigurationError(
            f"{option} {path}: no such file.",
            hint="give the path of the key file (absolute, or relative to the working directory).",
        ) from None
    except OSError as exc:
        raise ConfigurationError(
            f"{option} {path}: cannot be read ({exc.strerror}).",
            hint="let the user running cqrskit read it (chmod 600, owned by that user).",
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigurationError(
            f"{option} {path}: not a regular file.",
            hint="give the path of the key file itself.",
        )
    if os.name == "posix" and st.st_mode & 0o027:
        raise ConfigurationError(
            f"{option} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users "
            "read it or change it; refused.",
            hint=f"chmod 600 {path} (0640 if a group must read it, as a Kubernetes secret "
            "mounted with fsGroup and defaultMode 0440).",
        )
    if st.st_size > _MAX_FILE:
        raise ConfigurationError(
            f"{option} {path}: {st.st_size} bytes is far too large for a key file.",
            hint="give the key file, not another file.",
        )
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except OSError as exc:
        raise ConfigurationError(
            f"{option} {path}: cannot be read ({exc.strerror}).",
            hint="let the user running cqrskit read it (chmod 600, owned by that user).",
        ) from None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"{option} {path}: not a text file of ASCII characters.", hint=_FORMAT_HINT
        ) from None


def _read_env(name: str, option: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigurationError(
            f"{option} {name}: the environment variable {name} is not set or is empty.",
            hint=f"export {name}=KEY_ID:SECRET (the secret in hex) in the service's "
            "environment, e.g. from a secret store.",
        )
    return value


def _parse(text: str, where: str, option: str, *, by_line: bool) -> dict[str, bytes]:
    """``KEY_ID:SECRET`` entries of ``text`` (from ``where``); secrets are never echoed."""
    keys: dict[str, bytes] = {}
    count = 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("#"):
            continue
        for entry in line.split(","):
            entry = entry.strip()
            if not entry:
                continue
            count += 1
            at = f"{where}, line {n}" if by_line else f"{where}, entry {count}"
            key_id, sep, secret = entry.partition(":")
            key_id, secret = key_id.strip(), secret.strip()
            if not sep or not _KEY_ID.fullmatch(key_id):
                raise ConfigurationError(
                    f"{option} {at}: an entry is not KEY_ID:SECRET with a key id of ASCII "
                    "letters and digits (the entry is not shown).",
                    hint=_FORMAT_HINT,
                )
            if not _SECRET.fullmatch(secret):
                raise ConfigurationError(
                    # the key id is not shown either: it may be a secret written first
                    f"{option} {at}: the secret is not hexadecimal (an even number of 0-9, a-f).",
                    hint=_FORMAT_HINT,
                )
            if len(secret) < _MIN_HEX:
                raise ConfigurationError(
                    f"{option} {at}: the secret is {len(secret) // 2} bytes; at least "
                    f"{_MIN_HEX // 2} are needed.",
                    hint="make a new key with openssl rand -hex 32.",
                )
            raw = bytes.fromhex(secret)
            if keys.get(key_id, raw) != raw:
                raise ConfigurationError(
                    f"{option} {at}: key {key_id!r} is given twice with different secrets.",
                    hint="a key id names one secret; give a new key a new id.",
                )
            keys[key_id] = raw
    if not keys:
        raise ConfigurationError(f"{option} {where}: holds no key.", hint=_FORMAT_HINT)
    return keys


def _gather(
    files: Sequence[str], envs: Sequence[str], file_option: str, env_option: str
) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    sources = [(path, _read_file(path, file_option), file_option, True) for path in files]
    sources += [(f"${name}", _read_env(name, env_option), env_option, False) for name in envs]
    for where, text, option, by_line in sources:
        for key_id, raw in _parse(text, where, option, by_line=by_line).items():
            if keys.get(key_id, raw) != raw:
                raise ConfigurationError(
                    f"{option} {where}: key {key_id!r} has a different secret in another "
                    "key source.",
                    hint="a key id names one secret everywhere; give a new key a new id.",
                )
            keys[key_id] = raw
    return keys


def signer_from(path: str | None, env: str | None) -> HmacSigner | None:
    """The relay's signer from ``--signing-key-file PATH`` or ``--signing-key-env NAME``
    (one key: the one it signs with), or ``None`` when neither is given.

    Raises:
        ConfigurationError: a missing or unsafe file, an unset variable, a malformed key,
            or more than one key.
    """
    if path is None and env is None:
        return None
    keys = _gather(
        [] if path is None else [path],
        [] if env is None else [env],
        "--signing-key-file",
        "--signing-key-env",
    )
    if len(keys) != 1:
        where = path if env is None else f"${env}"
        raise ConfigurationError(
            f"--signing-key-{'file' if env is None else 'env'} {where}: holds "
            f"{len(keys)} keys ({', '.join(sorted(keys))}); the relay signs with one.",
            hint="give the relay only its active key; the consumers hold the previous one "
            "too while a rotation is under way (--verify-key-file, repeatable).",
        )
    return HmacSigner(keys)


def verifier_from(files: Sequence[str], envs: Sequence[str]) -> HmacSigner | None:
    """The consumer's verifier from every ``--verify-key-file`` / ``--verify-key-env``
    (the current key and, during a rotation, the previous one), or ``None`` when none
    is given.

    Raises:
        ConfigurationError: a missing or unsafe file, an unset variable, a malformed key,
            or one key id with two secrets.
    """
    if not files and not envs:
        return None
    keys = _gather(files, envs, "--verify-key-file", "--verify-key-env")
    return HmacSigner(keys, active=min(keys))  # a verifier never signs: any key is "active"
