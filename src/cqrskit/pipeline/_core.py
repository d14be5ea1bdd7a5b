"""The behavior primitive: ``behavior(message, next) -> result``, optionally scoped.

A behavior is an ``async def`` (or, for the sync mediator, a plain ``def``) taking the
message and ``next``; it calls ``await next(message)`` to run the rest of the pipeline and the
handler, and returns (or replaces) the result. Further parameters after ``next`` are
dependencies resolved by type, exactly like handler parameters. Behaviors are folded around
each handler once per message type when the mediator is built.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cqrskit.messages import Command, Event, Message, Query

__all__ = [
    "Behavior",
    "Next",
    "ScopedBehavior",
    "applies_to",
    "for_commands",
    "for_events",
    "for_queries",
]

Next = Callable[[Any], Awaitable[Any]]


class Behavior(Protocol):
    """A pipeline step: run code around ``next(message)`` and return the result."""

    def __call__(self, message: Any, next: Next, /) -> Awaitable[Any]:
        """Handle ``message``; call ``await next(message)`` to continue the pipeline."""
        ...


@dataclass(frozen=True, slots=True)
class ScopedBehavior:
    """A behavior applied only to messages that are instances of ``types``."""

    behavior: Callable[..., Any]
    types: tuple[type, ...]

    def applies(self, message_type: type) -> bool:
        """Whether this behavior wraps handlers of ``message_type``."""
        return issubclass(message_type, self.types)


def applies_to(behavior: Callable[..., Any], *types: type) -> ScopedBehavior:
    """Apply ``behavior`` only to messages of the given types (or their subclasses).

    ``types`` may be ``Command``, ``Query``, ``Event`` or concrete message classes.
    """
    if not types:
        raise TypeError("applies_to() needs at least one message type")
    for tp in types:
        if not (isinstance(tp, type) and issubclass(tp, Message)):
            raise TypeError(f"applies_to() takes message classes, got {tp!r}")
    return ScopedBehavior(behavior, tuple(types))


def for_commands(behavior: Callable[..., Any]) -> ScopedBehavior:
    """Apply ``behavior`` to commands only."""
    return applies_to(behavior, Command)


def for_queries(behavior: Callable[..., Any]) -> ScopedBehavior:
    """Apply ``behavior`` to queries only."""
    return applies_to(behavior, Query)


def for_events(behavior: Callable[..., Any]) -> ScopedBehavior:
    """Apply ``behavior`` to event handlers only."""
    return applies_to(behavior, Event)
