"""Logging behavior: one line when a dispatch starts, ends or fails, with its duration.

Only the message *type* is logged by default — message fields may hold secrets. When the
logger is disabled for every level the behavior uses, a call costs one
``logger.isEnabledFor`` check and then hands over to ``next`` directly: no clock read, no
string formatting, no coroutine of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

from cqrskit.pipeline._core import Next
from cqrskit.pipeline._support import SyncNext, returns_awaitable, type_name

__all__ = ["LoggingBehavior", "SyncLoggingBehavior"]

_DEFAULT_LOGGER = "cqrskit.dispatch"


class _LoggingConfig:
    __slots__ = (
        "logger",
        "level",
        "failure_level",
        "include_message",
        "traceback",
        "_gate",
        "_enabled",
    )

    def __init__(
        self,
        logger: logging.Logger | str | None = None,
        *,
        level: int = logging.DEBUG,
        failure_level: int = logging.WARNING,
        include_message: bool = False,
        traceback: bool = True,
    ) -> None:
        if logger is None or isinstance(logger, str):
            logger = logging.getLogger(logger or _DEFAULT_LOGGER)
        self.logger = logger
        self.level = level
        self.failure_level = failure_level
        self.include_message = include_message
        self.traceback = traceback
        # the behavior works when either line would be emitted; the higher level decides
        self._gate = max(level, failure_level)
        self._enabled = logger.isEnabledFor

    def _started(self, message: Any) -> tuple[str, bool]:
        name = type_name(type(message))
        verbose = self.logger.isEnabledFor(self.level)
        if verbose:
            if self.include_message:
                self.logger.log(
                    self.level,
                    "dispatch %s started: %r",
                    name,
                    message,
                    extra={"message_type": name},
                )
            else:
                self.logger.log(
                    self.level, "dispatch %s started", name, extra={"message_type": name}
                )
        return name, verbose

    def _ended(self, name: str, started: float, verbose: bool) -> None:
        if verbose:
            ms = (time.perf_counter() - started) * 1000.0
            self.logger.log(
                self.level,
                "dispatch %s ended in %.3f ms",
                name,
                ms,
                extra={"message_type": name, "duration_ms": ms},
            )

    def _failed(self, name: str, started: float, error: BaseException) -> None:
        if not self.logger.isEnabledFor(self.failure_level):
            return
        ms = (time.perf_counter() - started) * 1000.0
        self.logger.log(
            self.failure_level,
            "dispatch %s failed after %.3f ms with %s",
            name,
            ms,
            type(error).__qualname__,
            exc_info=error if self.traceback else None,
            extra={"message_type": name, "duration_ms": ms, "error_type": type(error).__name__},
        )


class LoggingBehavior(_LoggingConfig):
    """Log the start, end and failure of each dispatch with the message type and duration.

    Args:
        logger: a logger or a logger name; default ``"cqrskit.dispatch"``.
        level: level of the start and end lines (default ``DEBUG``).
        failure_level: level of the failure line (default ``WARNING``).
        include_message: also log ``repr(message)`` on the start line. Off by default because
            message fields may hold secrets; when on, hide secret fields from ``repr``
            (``field(repr=False)`` on dataclasses, ``Field(repr=False)`` with pydantic).
        traceback: attach the traceback to the failure line.

    Every record carries ``message_type`` (and ``duration_ms``, ``error_type`` where they
    apply) as ``extra`` attributes for structured log handlers. Cancellation is logged as a
    failure too (``CancelledError``) and re-raised.
    """

    __slots__ = ()

    @returns_awaitable
    def __call__(self, message: Any, next: Next) -> Awaitable[Any]:
        """Run ``next(message)``, logging around it when the logger is enabled."""
        if not self._enabled(self._gate):
            return next(message)
        return self._logged(message, next)

    async def _logged(self, message: Any, next: Next) -> Any:
        started = time.perf_counter()
        name, verbose = self._started(message)
        try:
            result = await next(message)
        except BaseException as exc:
            self._failed(name, started, exc)
            raise
        self._ended(name, started, verbose)
        return result


class SyncLoggingBehavior(_LoggingConfig):
    """The sync mediator's twin of :class:`LoggingBehavior` (same arguments)."""

    __slots__ = ()

    def __call__(self, message: Any, next: SyncNext) -> Any:
        """Run ``next(message)``, logging around it when the logger is enabled."""
        if not self._enabled(self._gate):
            return next(message)
        started = time.perf_counter()
        name, verbose = self._started(message)
        try:
            result = next(message)
        except BaseException as exc:
            self._failed(name, started, exc)
            raise
        self._ended(name, started, verbose)
        return result
