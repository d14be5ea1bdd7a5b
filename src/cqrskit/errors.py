"""The cqrskit error hierarchy.

Every error cqrskit raises derives from :class:`CqrsError` and carries structured
attributes — ``message_type``, ``handler`` and ``hint`` — so that logs, HTTP mappings and
tests can act on them without parsing text::

    CqrsError
    ├── ConfigurationError            the application is wired wrongly (found at build time)
    │   ├── RegistrationError         a handler cannot be registered as written
    │   ├── DependencyError           a handler parameter cannot be resolved
    │   ├── MissingExtraError         an optional dependency is not installed
    │   └── ReadModelMissingError     a query read a read-model table nobody set up
    ├── DispatchError                 a message could not be dispatched or its handler failed
    │   ├── NoHandlerError            no handler is registered for the message type
    │   ├── WrongMessageKindError     e.g. a query given to ``send``
    │   ├── PublishError              one or more event handlers failed (all are listed)
    │   ├── ValidationError           the message is invalid (every failing field listed)
    │   ├── NotAuthorizedError        the caller may not dispatch this message
    │   ├── NotFoundError             the thing a message names does not exist
    │   └── DispatchTimeoutError      the handler did not finish in time (outcome unknown)
    ├── ConcurrencyError              an optimistic-concurrency check failed
    ├── PersistenceError              the database refused or lost something
    │   ├── SerializationError        a message could not be encoded or decoded
    │   ├── IdempotencyError          an idempotency key was reused for another command
    │   ├── CommitOutcomeUnknownError the connection was lost during COMMIT (retry with a key)
    │   └── UnavailableError          a database cannot be reached or is out of connections
    │       ├── ConnectionLostError   the connection was lost before COMMIT: nothing committed
    │       └── ReplicaUnavailableError no replica could serve a query (or one failed mid-query)
    ├── ConsistencyError              a read model is behind a consistency token
    │   ├── StaleReadError            ... and the policy is to fail
    │   └── TokenFromFutureError      the token lies beyond the end of the event log
    └── TransportError                a broker refused or lost something
        ├── BrokerUnavailableError    the broker is down, slow or lost an ack (retry the batch)
        └── EnvelopeError             bytes from a broker are not a valid cqrskit envelope
            └── SignatureError        ... its signature is missing, unknown or wrong
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BrokerUnavailableError",
    "CommitOutcomeUnknownError",
    "ConcurrencyError",
    "ConfigurationError",
    "ConnectionLostError",
    "ConsistencyError",
    "CqrsError",
    "DependencyError",
    "DispatchError",
    "DispatchTimeoutError",
    "EnvelopeError",
    "FieldError",
    "IdempotencyError",
    "MissingExtraError",
    "NoHandlerError",
    "NotAuthorizedError",
    "NotFoundError",
    "PersistenceError",
    "PublishError",
    "ReadModelMissingError",
    "RegistrationError",
    "ReplicaUnavailableError",
    "SerializationError",
    "SignatureError",
    "StaleReadError",
    "TokenFromFutureError",
    "TransportError",
    "UnavailableError",
    "ValidationError",
    "WrongMessageKindError",
]


def describe(obj: object) -> str:
    """Return a readable ``module.qualname`` for a type, function or handler object."""
    if obj is None:
        return "None"
    target = obj if isinstance(obj, type) or callable(obj) else type(obj)
    func = getattr(target, "__func__", target)
    module = getattr(func, "__module__", None)
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return f"{module}.{name}" if module and module != "builtins" else str(name)


class CqrsError(Exception):
    """Root of every error raised by cqrskit.

    Attributes:
        message_type: the message class involved, when there is one.
        handler: the handler involved, when there is one.
        hint: one sentence on how to fix the problem, when there is one.
    """

    def __init__(
        self,
        text: str,
        *,
        message_type: type | None = None,
        handler: object | None = None,
        hint: str | None = None,
    ) -> None:
        self.text = text
        self.message_type = message_type
        self.handler = handler
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [self.text]
        if self.hint:
            parts.append(f"Hint: {self.hint}")
        return " ".join(parts)


class ConfigurationError(CqrsError):
    """The application is wired wrongly; raised when registering or building."""


class RegistrationError(ConfigurationError):
    """A handler cannot be registered as written (annotations, kind, duplicates)."""


class DependencyError(ConfigurationError):
    """A handler or behavior parameter cannot be resolved by the resolver.

    Attributes:
        dependency: the type that could not be resolved.
    """

    def __init__(self, text: str, *, dependency: object = None, **kwargs: Any) -> None:
        self.dependency = dependency
        super().__init__(text, **kwargs)


class MissingExtraError(ConfigurationError, ImportError):
    """An optional dependency is missing; the message names the extra to install.

    Attributes:
        extra: the name of the cqrskit extra, e.g. ``"postgres"``.
    """

    def __init__(self, extra: str, module: str) -> None:
        self.extra = extra
        super().__init__(
            f"cqrskit needs the optional package {module!r} for this feature.",
            hint=f"install it with: pip install 'cqrskit[{extra}]'",
        )


class ReadModelMissingError(ConfigurationError):
    """A query read a read-model table that does not exist: the projection that builds it
    was never set up in this read database (no projector ran against it, and no
    ``InlineProjections.setup()``).

    Attributes:
        table: the missing table, as the database named it.
    """

    def __init__(self, table: str, **kwargs: Any) -> None:
        self.table = table
        kwargs.setdefault(
            "hint",
            "set the read database up before serving queries: start the projector that "
            "builds it (Projector in the application's lifespan, or `cqrskit projections "
            "run`), or call InlineProjections.setup() at startup.",
        )
        super().__init__(f"the read-model table {table!r} does not exist.", **kwargs)


class DispatchError(CqrsError):
    """A message could not be dispatched, or its handler failed in a way cqrskit names."""


class NoHandlerError(DispatchError):
    """No handler is registered for the message type."""


class WrongMessageKindError(DispatchError, TypeError):
    """A verb was given the wrong kind of message (e.g. a query given to ``send``)."""


class PublishError(DispatchError):
    """One or more event handlers failed; the others still ran.

    Attributes:
        failures: ``(handler, exception)`` pairs, one per failing handler, in order.
    """

    def __init__(
        self,
        event_type: type,
        failures: Sequence[tuple[object, BaseException]],
    ) -> None:
        self.failures = list(failures)
        lines = ", ".join(f"{describe(h)} raised {type(e).__name__}: {e}" for h, e in failures)
        super().__init__(
            f"{len(self.failures)} handler(s) of event {describe(event_type)} failed: {lines}",
            message_type=event_type,
            handler=failures[0][0] if failures else None,
        )
        if failures:
            self.__cause__ = failures[0][1]

    @property
    def exceptions(self) -> list[BaseException]:
        """The exceptions raised, in handler order."""
        return [e for _, e in self.failures]


class FieldError:
    """One failing field of a :class:`ValidationError`."""

    __slots__ = ("field", "message")

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message

    def __repr__(self) -> str:
        return f"FieldError({self.field!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FieldError)
            and other.field == self.field
            and other.message == self.message
        )

    def __hash__(self) -> int:
        return hash((self.field, self.message))

    def as_dict(self) -> dict[str, str]:
        """Return ``{"field": ..., "message": ...}``."""
        return {"field": self.field, "message": self.message}


class ValidationError(DispatchError, ValueError):
    """The message is invalid. Never retried.

    Attributes:
        errors: every failing field, in a stable order.
    """

    def __init__(
        self,
        errors: Sequence[FieldError] | Mapping[str, str],
        *,
        message_type: type | None = None,
    ) -> None:
        if isinstance(errors, Mapping):
            errors = [FieldError(k, v) for k, v in errors.items()]
        self.errors = list(errors)
        listed = "; ".join(f"{e.field}: {e.message}" for e in self.errors)
        name = describe(message_type) if message_type else "message"
        super().__init__(f"invalid {name}: {listed}", message_type=message_type)


class NotAuthorizedError(DispatchError, PermissionError):
    """The current principal may not dispatch this message (or no policy allows it)."""


class NotFoundError(DispatchError, LookupError):
    """The entity a message refers to does not exist. Raise it from handlers."""


class DispatchTimeoutError(DispatchError, TimeoutError):
    """The handler did not finish within its timeout; its outcome is unknown.

    Attributes:
        retry_safe: ``True`` when running the message again cannot apply it twice: a query,
            or a command whose transaction was rolled back when the time ran out (the
            timeout behavior sat inside the transaction behavior). The retry behavior
            retries only such errors.
    """

    retry_safe: bool = False
    _message: Any = None  # the message whose deadline ran out (set by the timeout behavior)


class ConcurrencyError(CqrsError):
    """An optimistic-concurrency check failed: another writer got there first.

    Attributes:
        stream: the stream id.
        expected_version: the version the writer expected the stream to be at.
        actual_version: the version found, when known.
    """

    def __init__(
        self,
        text: str,
        *,
        stream: str | None = None,
        expected_version: int | None = None,
        actual_version: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.stream = stream
        self.expected_version = expected_version
        self.actual_version = actual_version
        super().__init__(text, **kwargs)


class PersistenceError(CqrsError):
    """The database refused or lost something; the cause is chained."""


class SerializationError(PersistenceError, ValueError):
    """A message could not be encoded or decoded (bad data, unknown type, limits)."""


class IdempotencyError(PersistenceError):
    """An idempotency key was reused for a different command."""


class CommitOutcomeUnknownError(PersistenceError):
    """The connection was lost while COMMIT was in flight: the command may have committed
    or not, and the client cannot tell. Retry it with the same idempotency key (see
    ``cqrskit.idempotency``); without one, check the state before retrying.

    Attributes:
        retry_safe: ``True`` when the command carried an idempotency key, so that a retry
            cannot apply it twice; the retry behavior retries only such errors.
    """

    retry_safe: bool = False


class UnavailableError(PersistenceError):
    """A database (or another service a request needs) cannot be reached right now, lost
    its connection, or has no free connection: nothing was committed; retry later.

    Raised by the drivers for an exhausted pool; ``cqrskit.fastapi`` also recognizes the
    drivers' own connection errors as this (503 with ``Retry-After``).
    """


class ConnectionLostError(UnavailableError, ConnectionError):
    """The connection to the database was lost before COMMIT was sent: nothing of the
    command was committed, and running it again applies it once. Also a built-in
    ``ConnectionError``, so the retry behavior retries it by default."""


class ReplicaUnavailableError(UnavailableError):
    """No streaming replica could serve a query (none in rotation, and falling back to the
    primary is off), or the replica serving it failed mid-query (connection lost, no answer
    within the router's query timeout). Nothing was written: the query can be retried.

    Attributes:
        replica: the replica's name, when one failed.
    """

    def __init__(self, text: str, *, replica: str | None = None, **kwargs: Any) -> None:
        self.replica = replica
        super().__init__(text, **kwargs)


class ConsistencyError(CqrsError):
    """A read model is behind the consistency token a query was given."""


class StaleReadError(ConsistencyError):
    """A read model did not reach the token in time and the policy is to fail."""


class TokenFromFutureError(ConsistencyError, ValueError):
    """The consistency token lies beyond the end of the event log."""


class TransportError(CqrsError):
    """A broker refused or lost something; the cause is chained."""


class BrokerUnavailableError(TransportError):
    """The broker could not be reached, or an acknowledgement did not arrive in time.

    The outcome of the messages in flight is unknown: publish them again (with the same
    message ids) once the broker answers.
    """


class EnvelopeError(TransportError, ValueError):
    """Bytes read from a broker are not a valid cqrskit envelope (missing or malformed
    headers, too large); the message is data to park, never to retry."""


class SignatureError(EnvelopeError):
    """An envelope's HMAC signature is missing, names an unknown key or does not match."""
