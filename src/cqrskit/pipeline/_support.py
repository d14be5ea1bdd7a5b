"""Small shared pieces of the built-in behaviors (private)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

SyncNext = Callable[[Any], Any]
"""``next`` as the sync mediator passes it: a plain call returning the result."""


async def fail(error: BaseException) -> NoReturn:
    """An awaitable that raises ``error`` when awaited.

    Behaviors whose fast path returns ``next(message)`` without a coroutine of their own use
    it to report errors at ``await`` time, exactly where an ``async def`` behavior would.
    """
    raise error


def failed(error: BaseException) -> Coroutine[Any, Any, NoReturn]:
    """``fail(error)``, typed for the places that return it instead of a result."""
    return fail(error)


def type_name(message_type: type) -> str:
    """The name logs and errors use for a message type: its qualified name."""
    return message_type.__qualname__
