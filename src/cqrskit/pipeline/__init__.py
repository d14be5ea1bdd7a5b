"""Pipeline behaviors: the primitive and the built-ins (logging, validation, timeout,
retry, authorization)."""

from cqrskit.pipeline._core import (
    Behavior,
    Next,
    ScopedBehavior,
    applies_to,
    for_commands,
    for_events,
    for_queries,
)

__all__ = [
    "Behavior",
    "Next",
    "ScopedBehavior",
    "applies_to",
    "for_commands",
    "for_events",
    "for_queries",
]
