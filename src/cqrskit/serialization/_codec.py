"""JSON text layers (stdlib, orjson) and the limits applied to every payload."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from cqrskit.errors import ConfigurationError
from cqrskit.serialization._plan import _Invalid, _key_label, _shorten

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

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_depth", "max_string_length", "max_int_digits"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigurationError(f"Limits.{name} must be an int >= 1, got {value!r}.")


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

    def walk(self, value: Any, depth: int) -> None:
        """Raise :class:`_Invalid` (with the path to the culprit) if ``value`` breaks a limit."""
        kind = type(value)
        if kind is str:
            self.string(value)
        elif kind is dict:
            if depth >= self.max_depth:
                raise _Invalid(f"nesting is deeper than the limit of {self.max_depth}")
            for k, v in value.items():
                try:
                    if type(k) is not str:
                        raise _Invalid(f"object keys must be strings, got {type(k).__name__}")
                    self.string(k)
                    self.walk(v, depth + 1)
                except _Invalid as exc:
                    exc.path.append(_key_label(k))
                    raise
        elif kind is list or kind is tuple:
            if depth >= self.max_depth:
                raise _Invalid(f"nesting is deeper than the limit of {self.max_depth}")
            for i, v in enumerate(value):
                try:
                    self.walk(v, depth + 1)
                except _Invalid as exc:
                    exc.path.append(f"[{i}]")
                    raise
        elif kind is int:
            if not -self.max_int < value < self.max_int:
                raise _Invalid(f"an integer has more than {self.max_digits} digits")
        elif kind is float:
            if not math.isfinite(value):
                raise _Invalid("NaN and Infinity are not allowed")
        elif kind is not bool and value is not None:
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


_STDLIB_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_ESCAPED_NUL_OR_SURROGATE_RE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _TextCodec:
    """Stdlib JSON text layer with the limits applied on both sides.

    Decoding: the parser's hooks reject NaN and Infinity, duplicate keys, integers with too
    many digits and floats that overflow, while parsing. Walking the whole tree for the
    other limits would cost as much as parsing, and most payloads visibly cannot break
    them: no string is longer than the text, nesting is at most the number of brackets, and
    a NUL or lone surrogate needs a raw character or a ``\\u0000``/``\\udXXX`` escape. Those
    C-speed checks on the text decide whether the precise walk runs; a false alarm (an
    escaped emoji, say) only costs the walk.

    Encoding walks the tree before writing it (there is no text to screen yet).
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.checker = _Checker(limits)
        max_digits = limits.max_int_digits

        def parse_int(literal: str) -> int:
            if len(literal) - literal.startswith("-") > max_digits:
                raise _Invalid(f"an integer has more than {max_digits} digits")
            return int(literal)

        def parse_float(literal: str) -> float:
            value = float(literal)
            if not math.isfinite(value):
                raise _Invalid("NaN and Infinity are not allowed (a number overflows)")
            return value

        self._decoder = json.JSONDecoder(
            parse_int=parse_int,
            parse_float=parse_float,
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_pairs,
            strict=True,
        )

    def dumps(self, tree: Any) -> str:
        return _STDLIB_ENCODER.encode(tree)

    def parse(self, text: str) -> Any:
        return self._decoder.decode(text)

    def _check(self, text: str, tree: Any) -> None:
        limits = self.limits
        if (
            len(text) > limits.max_string_length
            or text.count("[") + text.count("{") > limits.max_depth
            or "\x00" in text
            or ("\\u" in text and _ESCAPED_NUL_OR_SURROGATE_RE.search(text) is not None)
            or (not text.isascii() and not _is_valid_unicode(text))
        ):
            self.checker.walk(tree, 0)

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
        self._check(text, tree)
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
        except (TypeError, ValueError) as exc:  # e.g. orjson and integers beyond 64 bits
            raise _Invalid(f"not JSON-serializable: {exc}") from None
        max_bytes = self.limits.max_bytes
        if len(text) > max_bytes // 4 and not text.isascii():
            size = len(text.encode("utf-8", "surrogatepass"))
        else:
            size = len(text)
        if size > max_bytes:
            raise _Invalid(f"encoded size of {size} bytes exceeds the limit of {max_bytes}")
        return text


class _OrjsonTextCodec(_TextCodec):
    """orjson for writing; reading stays with the stdlib decoder.

    orjson's reader silently keeps the last of duplicate keys and turns integers beyond
    64 bits into floats; detecting that in Python costs more than orjson saves, so
    payloads are parsed by the stdlib decoder, whose hooks reject such input exactly.
    """

    def __init__(self, limits: Limits, orjson: Any) -> None:
        super().__init__(limits)
        self._dumps = orjson.dumps

    def dumps(self, tree: Any) -> str:
        text: str = self._dumps(tree).decode("utf-8")
        return text
