"""Timeout behavior: bound how long a dispatch may take.

When the time is up the handler is cancelled and :class:`~cqrskit.errors.DispatchTimeoutError`
is raised. Its outcome is *unknown*: a command may have committed just before the deadline,
so retry it only with the same idempotency key. Async only — a plain ``def`` handler cannot
be interrupted safely, so there is no sync twin.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import Any

from cqrskit.errors import DispatchTimeoutError
from cqrskit.messages import Query
from cqrskit.pipeline._core import Next
from cqrskit.pipeline._support import returns_awaitable, type_name

__all__ = ["TimeoutBehavior"]


class TimeoutBehavior:
    """Cancel a dispatch that runs longer than its timeout and raise
    :class:`~cqrskit.errors.DispatchTimeoutError`.

    Args:
        default: seconds allowed for every message type without an override; ``None`` means
            no limit.
        per_type: overrides per message type (a base class's override applies to its
            subclasses; the most derived wins); ``None`` lifts the limit for that type.

    A type without a limit costs one dictionary lookup per dispatch.
    """

    __slots__ = ("_default", "_per_type", "_limits")

    def __init__(
        self,
        default: float | None = None,
        *,
        per_type: Mapping[type, float | None] | None = None,
    ) -> None:
        for value in (default, *(per_type or {}).values()):
            if value is not None and not value > 0:
                raise ValueError(f"a timeout must be a positive number of seconds, got {value!r}")
        self._default = default
        self._per_type = dict(per_type or {})
        self._limits: dict[type, float | None] = {}

    def limit_for(self, message_type: type) -> float | None:
        """The timeout in seconds applied to ``message_type`` (``None``: no limit)."""
        try:
            return self._limits[message_type]
        except KeyError:
            pass
        limit = self._default
        for cls in message_type.__mro__:
            if cls in self._per_type:
                limit = self._per_type[cls]
                break
        self._limits[message_type] = limit
        return limit

    @returns_awaitable
    def __call__(self, message: Any, next: Next) -> Awaitable[Any]:
        """Run ``next(message)`` within the message type's time limit."""
        try:
            limit = self._limits[message.__class__]
        except KeyError:
            limit = self.limit_for(message.__class__)
        if limit is None:
            return next(message)
        return self._bounded(message, next, limit)

    @staticmethod
    async def _bounded(message: Any, next: Next, limit: float) -> Any:
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await next(message)
        except TimeoutError as exc:
            if not deadline.expired():
                raise  # the handler's own TimeoutError, not this deadline
            cls = type(message)
            error = DispatchTimeoutError(
                f"{type_name(cls)} did not finish within {limit:g} s; its outcome is unknown.",
                message_type=cls,
                hint=(
                    "retry only with the same idempotency key, or raise the limit with "
                    f"TimeoutBehavior(per_type={{{cls.__name__}: seconds}})."
                ),
            )
            error.retry_safe = isinstance(message, Query)  # a read changes nothing
            error._message = message
            raise error from exc
