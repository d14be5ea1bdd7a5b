"""Optional HMAC signing of envelopes, with key ids for rotation.

A :class:`HmacSigner` holds named secret keys and signs with the *active* one; a consumer
verifies with whichever key the envelope names. To rotate: add the new key to every
consumer, then make it active on the relay, then (after the old messages are consumed)
drop the old key. Verification fails closed: unsigned, unknown-key and altered messages
raise :class:`~cqrskit.errors.SignatureError`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from cqrskit.errors import ConfigurationError, SignatureError

__all__ = ["HmacSigner"]

_MIN_KEY_BYTES = 16


class HmacSigner:
    """HMAC-SHA256 over the envelope's signed bytes (see :meth:`Envelope.signing_input`).

    Args:
        keys: key id -> secret (at least 16 bytes). Key ids are short printable names.
        active: the key id new signatures use (default: the only key).
    """

    __slots__ = ("_keys", "active")

    def __init__(self, keys: Mapping[str, bytes], *, active: str | None = None) -> None:
        if not keys:
            raise ConfigurationError("HmacSigner needs at least one key.")
        for key_id, secret in keys.items():
            if not (isinstance(key_id, str) and key_id.isascii() and key_id.isalnum()):
                raise ConfigurationError(
                    f"HmacSigner: key id {key_id!r} must be ASCII letters and digits."
                )
            if not isinstance(secret, bytes) or len(secret) < _MIN_KEY_BYTES:
                raise ConfigurationError(
                    f"HmacSigner: key {key_id!r} must be bytes of at least "
                    f"{_MIN_KEY_BYTES} bytes (the secret itself is never shown).",
                    hint="use secrets.token_bytes(32).",
                )
        if active is None:
            if len(keys) != 1:
                raise ConfigurationError("HmacSigner: name the active key id (active=...).")
            active = next(iter(keys))
        if active not in keys:
            raise ConfigurationError(f"HmacSigner: the active key {active!r} is not in keys.")
        self._keys = dict(keys)
        self.active = active

    def __repr__(self) -> str:
        return f"HmacSigner(keys={sorted(self._keys)}, active={self.active!r})"

    def sign(self, data: bytes) -> tuple[str, str]:
        """Return ``(key_id, hex signature)`` of ``data`` with the active key."""
        mac = hmac.new(self._keys[self.active], data, hashlib.sha256).hexdigest()
        return self.active, mac

    def verify(self, key_id: str | None, signature: str | None, data: bytes) -> None:
        """Check ``signature`` of ``data`` under ``key_id``.

        Raises:
            SignatureError: no signature, an unknown key id, or a mismatch.
        """
        if not key_id or not signature:
            raise SignatureError(
                "the message is not signed, and this consumer requires signatures.",
                hint="sign on the relay (signer=HmacSigner(...)) or stop requiring them.",
            )
        secret = self._keys.get(key_id)
        if secret is None:
            raise SignatureError(
                f"the message is signed with an unknown key id {key_id!r}.",
                hint="add the key to this consumer's HmacSigner before the relay uses it.",
            )
        expected = hmac.new(secret, data, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise SignatureError("the message's signature does not match: altered or forged.")
