"""The broker a ``--broker`` URL names, and what ``--destination`` means for it: one place
for the relay's transports and the consumers' sources."""

from __future__ import annotations

from typing import Any, Literal

from cqrskit.errors import ConfigurationError

__all__ = ["broker_options"]

Broker = Literal["nats", "rabbitmq", "redis"]


def broker_options(url: str, destination: str | None) -> tuple[Broker, dict[str, Any]]:
    """The broker of ``url`` (by scheme) and the keyword arguments ``destination`` gives its
    transport or source: stream and subject prefix (NATS), exchange (RabbitMQ) or key prefix
    (Redis); none when ``destination`` is ``None``.

    Raises:
        ConfigurationError: an unknown scheme (the URL is not echoed: it may hold a secret).
    """
    if url.startswith(("nats://", "tls://")):
        if destination is None:
            return "nats", {}
        return "nats", {
            "stream": destination.upper().replace(".", "_"),
            "subject_prefix": destination,
        }
    if url.startswith(("amqp://", "amqps://")):
        return "rabbitmq", {} if destination is None else {"exchange": destination}
    if url.startswith(("redis://", "rediss://", "unix://")):
        if destination is None:
            return "redis", {}
        return "redis", {"key_prefix": destination.replace(".", ":")}
    raise ConfigurationError(
        "--broker must be a nats://, amqp:// or redis:// URL (the URL is not echoed)."
    )
