"""cqrskit — CQRS and the Mediator pattern for Python, from one process to many databases.

The public surface is small: messages (``Command``, ``Query``, ``Event``), the ``Registry``
of handlers and the ``Mediator`` that dispatches them. Drivers and integrations are imported
from their own modules (``cqrskit.sqlite``, ``cqrskit.postgres``, ``cqrskit.fastapi`` ...).
"""

from cqrskit.dependencies import Dependencies, Provider, Resolver, Scope
from cqrskit.errors import (
    CommitOutcomeUnknownError,
    ConcurrencyError,
    ConfigurationError,
    ConnectionLostError,
    ConsistencyError,
    CqrsError,
    DependencyError,
    DispatchError,
    DispatchTimeoutError,
    FieldError,
    IdempotencyError,
    MissingExtraError,
    NoHandlerError,
    NotAuthorizedError,
    NotFoundError,
    PersistenceError,
    PublishError,
    ReadModelMissingError,
    RegistrationError,
    ReplicaUnavailableError,
    SerializationError,
    StaleReadError,
    TokenFromFutureError,
    TransportError,
    UnavailableError,
    ValidationError,
    WrongMessageKindError,
)
from cqrskit.eventlog import EventStore, InMemoryEventStore, StoredEvent, UnitOfWork
from cqrskit.idempotency import Idempotency, idempotency_key
from cqrskit.mediator import Mediator, Receipt, current_scope
from cqrskit.messages import Command, Event, Message, Metadata, Query
from cqrskit.pipeline import applies_to, for_commands, for_events, for_queries
from cqrskit.registry import HandlerSpec, Registry, handler
from cqrskit.sync import SyncMediator

__version__ = "0.1.0"

__all__ = [
    "Command",
    "CommitOutcomeUnknownError",
    "ConcurrencyError",
    "ConfigurationError",
    "ConnectionLostError",
    "ConsistencyError",
    "CqrsError",
    "Dependencies",
    "DependencyError",
    "DispatchError",
    "DispatchTimeoutError",
    "Event",
    "EventStore",
    "FieldError",
    "HandlerSpec",
    "Idempotency",
    "IdempotencyError",
    "InMemoryEventStore",
    "Mediator",
    "Message",
    "Metadata",
    "MissingExtraError",
    "NoHandlerError",
    "NotAuthorizedError",
    "NotFoundError",
    "PersistenceError",
    "Provider",
    "PublishError",
    "Query",
    "ReadModelMissingError",
    "Receipt",
    "RegistrationError",
    "Registry",
    "ReplicaUnavailableError",
    "Resolver",
    "Scope",
    "SerializationError",
    "StaleReadError",
    "StoredEvent",
    "SyncMediator",
    "TokenFromFutureError",
    "TransportError",
    "UnavailableError",
    "UnitOfWork",
    "ValidationError",
    "WrongMessageKindError",
    "applies_to",
    "current_scope",
    "for_commands",
    "for_events",
    "for_queries",
    "handler",
    "idempotency_key",
]
