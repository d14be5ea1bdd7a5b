"""Error texts that never carry a caller's data: values dropped, keys shortened.

Validation and decoding errors reach logs, HTTP 422 bodies and dead letters, so they say
*which* field failed and *why*, never *what* was sent (a rejected value may be a password
typed in the wrong field; a key may be 100,000 characters long).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["key_label", "scrub_msgspec", "unknown_fields"]

_KEY_LIMIT = 40
_LISTED = 5
# msgspec messages that end with the rejected input ("Invalid enum value 'x'",
# "Invalid value 'x'" for tags, "Invalid value 5"): keep the words, drop the value
_VALUE_AT_END = re.compile(r"(Invalid (?:enum )?value)\b.*", re.DOTALL)
_UNKNOWN_FIELD = re.compile(r"(Object contains unknown field )`(.*)`", re.DOTALL)


def key_label(key: object) -> str:
    """A key as shown in an error: at most 40 characters, then ``...``."""
    text = key if type(key) is str else repr(key)
    return text if len(text) <= _KEY_LIMIT else text[:_KEY_LIMIT] + "..."


def unknown_fields(keys: Iterable[object]) -> str:
    """``unknown field(s) 'a', 'b' and 3 more``: a few keys, each shortened."""
    found = list(keys)
    shown = ", ".join(repr(key_label(k)) for k in found[:_LISTED])
    more = f" and {len(found) - _LISTED} more" if len(found) > _LISTED else ""
    return f"unknown field(s) {shown}{more}"


def scrub_msgspec(text: str) -> tuple[str, str]:
    """Split a ``msgspec.ValidationError`` text into (reason without the input, path).

    The path is what follows the last `` - at `$``; the reason keeps msgspec's words but
    not the rejected value, and an unknown field's name is shortened.
    """
    reason, sep, where = text.rpartition(" - at `$")
    if not sep:
        reason, where = text, ""
    elif where.endswith("`"):
        where = where[:-1]
    reason = _VALUE_AT_END.sub(r"\1", reason)
    reason = _UNKNOWN_FIELD.sub(lambda m: f"{m.group(1)}`{key_label(m.group(2))}`", reason)
    return reason, where
