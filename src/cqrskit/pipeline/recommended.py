"""The recommended pipeline in one call: authorization, validation, retry, transaction.

``recommended(store, policies=..., principal=...)`` returns the behaviors a service needs,
in the order that makes each one right::

    AuthorizationBehavior   refuse before any work (fails closed: a type without a policy
                            is refused)
    ValidationBehavior      every failing field at once; never retried
    RetryBehavior           ConcurrencyError (another request changed the stream first),
                            timeouts, lost connections and deadlocks: up to 10 attempts
                            with jittered backoff, each in a fresh transaction
    transaction             one unit of work per command: state, events, commit
    TimeoutBehavior         (optional) bound each attempt inside its transaction, so a
                            timed-out command is rolled back and safe to retry
    consistency gate        (optional) queries wait for the read models a token needs

Each piece stays available on its own (``cqrskit.pipeline``) for a different order or
extra behaviors; this is the shape the quickstart and the FastAPI guide use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Protocol

from cqrskit.errors import ConfigurationError
from cqrskit.pipeline._core import for_queries
from cqrskit.pipeline.authorization import AuthorizationBehavior, Policy
from cqrskit.pipeline.retry import RetryBehavior
from cqrskit.pipeline.timeout import TimeoutBehavior
from cqrskit.pipeline.validation import ValidationBehavior, Validator

__all__ = ["recommended"]


class _Transactional(Protocol):
    def transaction(self) -> Any: ...


class _Gate(Protocol):
    async def behavior(self, message: Any, next: Any) -> Any: ...


_UNSET: Any = object()


def recommended(
    store: _Transactional,
    *,
    policies: Mapping[type, Policy] | None = _UNSET,
    principal: ContextVar[Any] | Callable[[], Any] | None = None,
    validators: Mapping[type, Validator | Sequence[Validator]] | None = None,
    attempts: int = 10,
    timeout: float | None = None,
    gate: _Gate | None = None,
) -> list[Any]:
    """The recommended behaviors, in order (pass them as ``Mediator(behaviors=...)``).

    Args:
        store: what opens each command's transaction: an event store, or an
            :class:`~cqrskit.idempotency.Idempotency` (its ``transaction()`` makes commands
            with an idempotency key apply at most once).
        policies: message type → policy for :class:`AuthorizationBehavior` (a type without
            one is refused). Required: pass ``None`` explicitly for a service that has no
            callers to tell apart (a worker, a script, the quickstart).
        principal: where the policies find the caller (a ``ContextVar`` or a function);
            required with ``policies``.
        validators: per-type validators for :class:`ValidationBehavior` (pydantic models
            and msgspec structs are validated without any).
        attempts: total attempts of a dispatch that fails with a transient error (default
            10: 50 concurrent commands on one stream of PostgreSQL all succeed, where 3
            still left a third of them conflicting; ``1`` turns retrying off).
        timeout: seconds per attempt (:class:`TimeoutBehavior`, inside the transaction:
            a command that times out is rolled back, so the retry may run it again);
            ``None`` (the default) sets no timeout.
        gate: a :class:`~cqrskit.projections.ConsistencyGate`: queries that declare
            ``@reads(...)`` wait for the request's consistency token.

    Raises:
        ConfigurationError: ``policies`` left out, or given without ``principal``;
            ``attempts`` below 1.
    """
    if policies is _UNSET:
        raise ConfigurationError(
            "recommended() needs policies= (authorization fails closed).",
            hint="pass policies={Command: policy, ...} with principal=..., or policies=None "
            "for a service without callers to tell apart.",
        )
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ConfigurationError(
            f"recommended(attempts=...) must be an int of at least 1, got {attempts!r}.",
            hint="attempts counts the first try too: 1 turns retrying off.",
        )
    behaviors: list[Any] = []
    if policies is not None:
        if principal is None:
            raise ConfigurationError(
                "recommended(policies=...) needs principal=: where the policies find the caller.",
                hint="pass a ContextVar your authentication sets, or a function returning "
                "the caller.",
            )
        behaviors.append(AuthorizationBehavior(policies, principal=principal))
    behaviors.append(ValidationBehavior(validators))
    if attempts > 1:
        behaviors.append(RetryBehavior(attempts=attempts))
    behaviors.append(store.transaction())
    if timeout is not None:
        behaviors.append(TimeoutBehavior(timeout))
    if gate is not None:
        behaviors.append(for_queries(gate.behavior))
    return behaviors
