"""Typed JSON text for arbitrary values: the seam other modules use to store results.

:class:`ValueCodecs` plans one encoder/decoder per Python type (dataclasses, pydantic and
msgspec models, primitives and containers of them) with the same limits as event payloads,
and hands out :class:`ValueCodec` objects; the idempotency behavior stores command results
and hashes command payloads through it.
"""

from __future__ import annotations

from typing import Any

from cqrskit.errors import SerializationError
from cqrskit.serialization._codec import Limits, _TextCodec
from cqrskit.serialization._plan import _Invalid, _Planner

__all__ = ["ValueCodec", "ValueCodecs"]


class ValueCodec:
    """JSON text for values of one type; built by :meth:`ValueCodecs.codec`."""

    __slots__ = ("_decode", "_encode", "_text")

    def __init__(self, encode: Any, decode: Any, text: _TextCodec) -> None:
        self._encode = encode
        self._decode = decode
        self._text = text

    def dumps(self, value: object) -> str:
        """``value`` as checked JSON text.

        Raises:
            SerializationError: the value does not match the type or breaks a limit; the
                error's ``text`` says what and where.
        """
        try:
            return self._text.dump_checked(self._encode(value))
        except _Invalid as exc:
            raise SerializationError(exc.message) from None

    def loads(self, text: str | bytes) -> Any:
        """Parse untrusted ``text`` into a value of the type.

        Raises:
            SerializationError: not valid JSON, over a limit, or not of the type.
        """
        try:
            return self._decode(self._text.loads(text))
        except _Invalid as exc:
            raise SerializationError(exc.message) from None


class ValueCodecs:
    """A cache of :class:`ValueCodec` per type, sharing one set of :class:`Limits`."""

    def __init__(self, limits: Limits | None = None) -> None:
        self._planner = _Planner()
        self._text = _TextCodec(limits or Limits())

    def codec(self, tp: Any, *, where: str) -> ValueCodec:
        """The codec for ``tp``; ``where`` names the value in errors.

        Raises:
            ConfigurationError: ``tp`` cannot be serialized (names the field and the fix).
        """
        encode, decode = self._planner.plan(tp, False, where)
        return ValueCodec(encode, decode, self._text)
