"""Retry behavior: run a dispatch again after a *transient* failure, a bounded number of
times, with exponential backoff and full jitter.

An error is transient when :func:`is_transient` (or the predicate you pass) says so. The
default recognizes, anywhere in the ``__cause__``/``__context__`` chain:

* :class:`~cqrskit.errors.ConcurrencyError` (another writer won; re-reading and retrying
  usually succeeds);
* ``TimeoutError`` and ``ConnectionError``;
* database errors whose SQLSTATE is a serialization failure or deadlock (``40001``,
  ``40P01``) or that say SQLite's ``database is locked``, recognized by attribute and text
  so no driver is imported;
* any exception type you list in ``retry_on``.

:class:`~cqrskit.errors.CommitOutcomeUnknownError` (the connection was lost during COMMIT)
is retried only when its ``retry_safe`` flag is set, i.e. the command carried an
idempotency key (``cqrskit.idempotency``): without one a retry could apply it twice.
:class:`~cqrskit.errors.DispatchTimeoutError` likewise, which is ``retry_safe`` for a query
and for a command whose transaction was rolled back when the time ran out (the timeout
behavior inside the transaction behavior); a command timed out outside its transaction
may have committed and is not retried, even with an idempotency key (retry it yourself
with the same key). A type listed in ``retry_on`` is retried whatever its flag says.

:class:`~cqrskit.errors.ValidationError` and :class:`~cqrskit.errors.NotAuthorizedError` are
never retried, whatever the predicate says. When the behavior gives up, the last error
propagates with a note (``add_note``) telling how many attempts were made.

Every attempt runs inside the same dispatch scope, so per-dispatch dependencies are shared
by the attempts: put the retry behavior *outside* the transaction behavior, which begins a
fresh transaction on each attempt.
"""

from __future__ import annotations

import asyncio
import random as _random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cqrskit.errors import (
    CommitOutcomeUnknownError,
    ConcurrencyError,
    DispatchTimeoutError,
    NotAuthorizedError,
    ValidationError,
)
from cqrskit.pipeline._core import Next
from cqrskit.pipeline._support import SyncNext, type_name

__all__ = ["RetryBehavior", "SyncRetryBehavior", "is_transient"]

_NEVER = (ValidationError, NotAuthorizedError)
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "08000", "08003", "08006"})
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    ConcurrencyError,
    TimeoutError,
    ConnectionError,
)
_MAX_CHAIN = 16


def _transient_one(error: BaseException, extra: tuple[type[BaseException], ...]) -> bool:
    if isinstance(error, _TRANSIENT_TYPES) or (extra and isinstance(error, extra)):
        return True
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if isinstance(code, str) and code in _TRANSIENT_SQLSTATES:
        return True
    return type(error).__name__ == "OperationalError" and "database is locked" in str(error)


def is_transient(error: BaseException, retry_on: tuple[type[BaseException], ...] = ()) -> bool:
    """The default transient-error predicate (see the module docstring).

    Walks ``error`` and its causes (at most 16 links); ``retry_on`` adds exception types.
    """
    seen: BaseException | None = error
    for _ in range(_MAX_CHAIN):
        if seen is None:
            return False
        if isinstance(seen, _NEVER):
            return False
        if retry_on and isinstance(seen, retry_on):
            return True  # listed explicitly: the caller's decision
        if isinstance(seen, CommitOutcomeUnknownError | DispatchTimeoutError):
            # the command may have been applied: retry only when that is known to be safe
            return seen.retry_safe
        if _transient_one(seen, retry_on):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _RetryConfig:
    __slots__ = ("attempts", "base_delay", "max_delay", "_is_transient", "_random")

    def __init__(
        self,
        *,
        attempts: int = 3,
        base_delay: float = 0.05,
        max_delay: float = 2.0,
        retry_on: tuple[type[BaseException], ...] = (),
        transient: Callable[[BaseException], bool] | None = None,
        random: Callable[[], float] | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        if base_delay < 0 or max_delay < 0:
            raise ValueError("base_delay and max_delay must not be negative")
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        if transient is None:
            extra = tuple(retry_on)

            def transient(error: BaseException) -> bool:
                return is_transient(error, extra)

        self._is_transient = transient
        self._random = random if random is not None else _random.random

    def delay(self, attempt: int) -> float:
        """The sleep before attempt ``attempt + 1``: uniform in ``[0, min(max_delay,
        base_delay * 2 ** (attempt - 1))]`` ("full jitter")."""
        ceiling = min(self.max_delay, self.base_delay * (2.0 ** (attempt - 1)))
        return ceiling * self._random()

    def _should_retry(self, error: BaseException, attempt: int) -> bool:
        if attempt >= self.attempts or not isinstance(error, Exception):
            return False
        if isinstance(error, _NEVER):
            return False
        return self._is_transient(error)

    @staticmethod
    def _note(error: BaseException, message: Any, attempt: int, limit: int) -> None:
        if attempt > 1:
            error.add_note(
                f"cqrskit: {type_name(type(message))} failed on attempt {attempt} of {limit} "
                f"(retried {attempt - 1} time(s))."
            )


class RetryBehavior(_RetryConfig):
    """Retry a dispatch that failed with a transient error.

    Args:
        attempts: total attempts, the first included (default 3).
        base_delay: seconds; the backoff ceiling doubles per attempt from here.
        max_delay: the backoff ceiling never exceeds this many seconds.
        retry_on: more exception types to treat as transient.
        transient: replace the default predicate (``retry_on`` is then ignored).
            ValidationError and NotAuthorizedError are never retried regardless.
        sleep: ``await sleep(seconds)`` between attempts (default ``asyncio.sleep``;
            inject a fake in tests).
        random: returns a float in ``[0, 1)`` for the jitter (default ``random.random``;
            pass ``random.Random(seed).random`` for determinism).
    """

    __slots__ = ("_sleep",)

    def __init__(
        self,
        *,
        attempts: int = 3,
        base_delay: float = 0.05,
        max_delay: float = 2.0,
        retry_on: tuple[type[BaseException], ...] = (),
        transient: Callable[[BaseException], bool] | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        random: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(
            attempts=attempts,
            base_delay=base_delay,
            max_delay=max_delay,
            retry_on=retry_on,
            transient=transient,
            random=random,
        )
        self._sleep = sleep

    async def __call__(self, message: Any, next: Next) -> Any:
        """Run ``next(message)``, again after each transient failure, up to ``attempts``."""
        for attempt in range(1, self.attempts + 1):
            try:
                return await next(message)
            except Exception as exc:
                if not self._should_retry(exc, attempt):
                    self._note(exc, message, attempt, self.attempts)
                    raise
            await self._sleep(self.delay(attempt))
        raise AssertionError("unreachable: the last attempt re-raises")  # pragma: no cover


class SyncRetryBehavior(_RetryConfig):
    """The sync mediator's twin of :class:`RetryBehavior` (``sleep`` defaults to
    ``time.sleep``)."""

    __slots__ = ("_sleep",)

    def __init__(
        self,
        *,
        attempts: int = 3,
        base_delay: float = 0.05,
        max_delay: float = 2.0,
        retry_on: tuple[type[BaseException], ...] = (),
        transient: Callable[[BaseException], bool] | None = None,
        sleep: Callable[[float], Any] = time.sleep,
        random: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(
            attempts=attempts,
            base_delay=base_delay,
            max_delay=max_delay,
            retry_on=retry_on,
            transient=transient,
            random=random,
        )
        self._sleep = sleep

    def __call__(self, message: Any, next: SyncNext) -> Any:
        """Run ``next(message)``, again after each transient failure, up to ``attempts``."""
        for attempt in range(1, self.attempts + 1):
            try:
                return next(message)
            except Exception as exc:
                if not self._should_retry(exc, attempt):
                    self._note(exc, message, attempt, self.attempts)
                    raise
            self._sleep(self.delay(attempt))
        raise AssertionError("unreachable: the last attempt re-raises")  # pragma: no cover
