"""Pipeline behaviors: the primitive and the built-ins.

A behavior is ``behavior(message, next) -> result`` (see :mod:`cqrskit.pipeline._core`).
Every built-in is a class configured once; its instance *is* the behavior. Each has a sync
twin with the same arguments and a ``Sync`` prefix for the sync mediator
(``LoggingBehavior`` / ``SyncLoggingBehavior``), except :class:`TimeoutBehavior`: a plain
``def`` handler cannot be interrupted safely.
"""

from cqrskit.pipeline._core import (
    Behavior,
    Next,
    ScopedBehavior,
    applies_to,
    for_commands,
    for_events,
    for_queries,
)
from cqrskit.pipeline._support import SyncNext
from cqrskit.pipeline.authorization import (
    AuthorizationBehavior,
    Policy,
    SyncAuthorizationBehavior,
    allow_all,
    authenticated,
)
from cqrskit.pipeline.logging import LoggingBehavior, SyncLoggingBehavior
from cqrskit.pipeline.recommended import recommended
from cqrskit.pipeline.retry import RetryBehavior, SyncRetryBehavior, is_transient
from cqrskit.pipeline.timeout import TimeoutBehavior
from cqrskit.pipeline.validation import (
    SyncValidationBehavior,
    ValidationBehavior,
    Validator,
    field_path,
)

__all__ = [
    "AuthorizationBehavior",
    "Behavior",
    "LoggingBehavior",
    "Next",
    "Policy",
    "RetryBehavior",
    "ScopedBehavior",
    "SyncAuthorizationBehavior",
    "SyncLoggingBehavior",
    "SyncNext",
    "SyncRetryBehavior",
    "SyncValidationBehavior",
    "TimeoutBehavior",
    "ValidationBehavior",
    "Validator",
    "allow_all",
    "applies_to",
    "authenticated",
    "field_path",
    "for_commands",
    "for_events",
    "for_queries",
    "is_transient",
    "recommended",
]
