"""Small shared pieces of the built-in behaviors (private)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

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


F = TypeVar("F", bound=Callable[..., Any])


def returns_awaitable(func: F) -> F:
    """Mark a plain ``def __call__`` that returns an awaitable as asynchronous.

    The async built-ins hand over to ``next(message)`` without a coroutine of their own when
    they have nothing to do; this marker lets inspection (``SyncMediator``'s build check,
    and ``inspect.iscoroutinefunction`` on Python 3.12+) still see them as asynchronous.
    """
    func.__cqrskit_async__ = True  # type: ignore[attr-defined]
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:
        mark(func)
    return func
