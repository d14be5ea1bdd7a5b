"""JSON text layers (stdlib, orjson) and the limits applied to every payload."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from cqrskit.serialization._plan import _Invalid, _shorten

_SURROGATE_RE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied to every payload encoded or decoded (metadata included).

    Encoding checks the same limits, so nothing is written that could not be read back.

    Attributes:
        max_bytes: maximum UTF-8 size of the JSON text; checked before parsing.
        max_depth: maximum nesting of objects and arrays (the top-level object counts 1).
        max_string_length: maximum length, in characters, of any string or object key.
        max_int_digits: maximum number of decimal digits of an integer.
    """

    max_bytes: int = 1_000_000
    max_depth: int = 32
    max_string_length: int = 100_000
    max_int_digits: int = 40


class _Checker:
    """Walks a JSON tree enforcing :class:`Limits`; returns the number of object keys."""

    __slots__ = ("max_depth", "max_int", "max_string", "max_digits")

    def __init__(self, limits: Limits) -> None:
        self.max_depth = limits.max_depth
        self.max_string = limits.max_string_length
        self.max_digits = limits.max_int_digits
        self.max_int = 10**limits.max_int_digits

    def string(self, s: str) -> None:
        if len(s) > self.max_string:
            raise _Invalid(f"a string is longer than the limit of {self.max_string} characters")
        if "\x00" in s:
            raise _Invalid("a string contains a NUL character")
        if not s.isascii() and _SURROGATE_RE.search(s):
            raise _Invalid("a string contains a lone surrogate (not valid Unicode)")

    def walk(self, value: Any, depth: int) -> int:
        kind = type(value)
        if kind is str:
            self.string(value)
            return 0
        if kind is dict:
            if depth >= self.max_depth:
                raise _Invalid(f"nesting is deeper than the limit of {self.max_depth}")
            keys = len(value)
            for k, v in value.items():
                if type(k) is not str:
                    raise _Invalid(f"object keys must be strings, got {type(k).__name__}")
                self.string(k)
                keys += self.walk(v, depth + 1)
            return keys
        if kind is list or kind is tuple:
            if depth >= self.max_depth:
                raise _Invalid(f"nesting is deeper than the limit of {self.max_depth}")
            keys = 0
            for v in value:
                keys += self.walk(v, depth + 1)
            return keys
        if kind is int:
            if not -self.max_int < value < self.max_int:
                raise _Invalid(f"an integer has more than {self.max_digits} digits")
            return 0
        if kind is float:
            if not math.isfinite(value):
                raise _Invalid("NaN and Infinity are not allowed")
            return 0
        if kind is bool or value is None:
            return 0
        raise _Invalid(f"{kind.__name__} is not a JSON type")


def _reject_constant(name: str) -> Any:
    raise _Invalid(f"{name} is not allowed")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Invalid(f"duplicate key {_shorten(k)}")
            seen.add(k)
    return obj


_STDLIB_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, object_pairs_hook=_unique_pairs, strict=True
)
_STDLIB_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class _TextCodec:
    """Stdlib JSON text layer with the limits applied on both sides."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.checker = _Checker(limits)

    def dumps(self, tree: Any) -> str:
        return _STDLIB_ENCODER.encode(tree)

    def parse(self, text: str) -> Any:
        return _STDLIB_DECODER.decode(text)

    def loads(self, data: str | bytes) -> Any:
        """Parse untrusted ``data`` into a checked JSON tree; raises :class:`_Invalid`."""
        text = self._text(data)
        try:
            tree = self.parse(text)
        except _Invalid:
            raise
        except RecursionError:
            raise _Invalid(f"nesting is deeper than the limit of {self.limits.max_depth}") from None
        except ValueError as exc:  # JSONDecodeError, int digits beyond Python's own limit
            raise _Invalid(f"not valid JSON: {exc}") from None
        self.checker.walk(tree, 0)
        return tree

    def _text(self, data: str | bytes) -> str:
        max_bytes = self.limits.max_bytes
        if type(data) is str:
            size = len(data)
            if size > max_bytes // 4 and not data.isascii():
                size = len(data.encode("utf-8", "surrogatepass"))
            if size > max_bytes:
                raise _Invalid(f"payload of {size} bytes exceeds the limit of {max_bytes}")
            return data
        if isinstance(data, bytes | bytearray | memoryview):
            raw = bytes(data)
            if len(raw) > max_bytes:
                raise _Invalid(f"payload of {len(raw)} bytes exceeds the limit of {max_bytes}")
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _Invalid("payload is not valid UTF-8") from None
        raise _Invalid(f"payload must be str or bytes, got {type(data).__name__}")

    def dump_checked(self, tree: Any) -> str:
        """Check ``tree`` against the limits, then serialize it; raises :class:`_Invalid`."""
        self.checker.walk(tree, 0)
        try:
            text = self.dumps(tree)
        except (TypeError, ValueError) as exc:
            raise _Invalid(f"not JSON-serializable: {exc}") from None
        max_bytes = self.limits.max_bytes
        if len(text) > max_bytes // 4 and not text.isascii():
            size = len(text.encode("utf-8"))
        else:
            size = len(text)
        if size > max_bytes:
            raise _Invalid(f"encoded size of {size} bytes exceeds the limit of {max_bytes}")
        return text


# Every string in (valid) JSON text, so that what is left can be searched for structure.
_JSON_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_KEY_RE = re.compile(r'""\s*:')
_BIG_INT_RE = re.compile(r"(?<![\d.])-?\d{19,}(?![\d.eE])")


class _OrjsonTextCodec(_TextCodec):
    """orjson text layer; payloads orjson would read differently fall back to the stdlib.

    orjson silently keeps the last of duplicate keys and turns integers beyond 64 bits into
    floats. Both are detected on the text with its strings blanked out, and such payloads
    are parsed by the stdlib decoder, which rejects or keeps them exactly.
    """

    def __init__(self, limits: Limits, orjson: Any) -> None:
        super().__init__(limits)
        self._orjson = orjson

    def dumps(self, tree: Any) -> str:
        text: str = self._orjson.dumps(tree).decode("utf-8")
        return text

    def parse(self, text: str) -> Any:
        try:
            tree = self._orjson.loads(text)
        except self._orjson.JSONDecodeError:
            return super().parse(text)  # the stdlib gives the reference error message
        if type(tree) is dict or type(tree) is list:
            skeleton = _JSON_STRING_RE.sub('""', text)
            if _BIG_INT_RE.search(skeleton) or len(_KEY_RE.findall(skeleton)) != _count_keys(
                tree, self.limits.max_depth
            ):
                return super().parse(text)
        return tree


def _count_keys(value: Any, depth: int) -> int:
    if depth < 0:
        return -1  # deeper than allowed: make the caller fall back; the walk rejects it
    kind = type(value)
    if kind is dict:
        return len(value) + sum(_count_keys(v, depth - 1) for v in value.values())
    if kind is list:
        return sum(_count_keys(v, depth - 1) for v in value)
    return 0
