"""RabbitMQ for cqrskit (extra ``cqrskit[rabbitmq]``, on ``aio-pika``).

:class:`RabbitMQTransport` publishes the relay's envelopes to a durable direct exchange,
one routing key and one quorum queue per partition, with publisher confirms, persistent
messages and ``mandatory`` set (an unroutable message is refused, never dropped silently).
:class:`RabbitMQSource` consumes those queues (single active consumer, bounded prefetch,
manual acks).
"""

from cqrskit.rabbitmq.consumer import RabbitMQSource
from cqrskit.rabbitmq.transport import RabbitMQTransport

__all__ = ["RabbitMQSource", "RabbitMQTransport"]
