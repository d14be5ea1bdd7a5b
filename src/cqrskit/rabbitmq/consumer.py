"""The RabbitMQ source (see :class:`RabbitMQSource`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from cqrskit.errors import BrokerUnavailableError, MissingExtraError
from cqrskit.messaging.partitioning import check_token
from cqrskit.messaging.source import Delivery, Source, Subscription
from cqrskit.rabbitmq.transport import QUEUE_ARGUMENTS

try:
    import aio_pika
    import aiormq.exceptions as amqp_errors
    from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingExtraError("rabbitmq", "aio-pika") from exc

__all__ = ["RabbitMQSource"]

log = logging.getLogger("cqrskit.rabbitmq")

_DOWN = (OSError, TimeoutError, amqp_errors.AMQPError, RuntimeError)


class _RabbitSubscription(Subscription):
    def __init__(self, channel: AbstractChannel, queue: Any, prefetch: int) -> None:
        self.channel = channel
        self.queue = queue
        self.buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue(prefetch + 1)
        self.tag: str | None = None

    async def start(self) -> None:
        self.tag = await self.queue.consume(self.buffer.put, no_ack=False)

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        if self.channel.is_closed:
            raise BrokerUnavailableError("RabbitMQ: the channel is closed.")
        try:
            first = await asyncio.wait_for(self.buffer.get(), max(timeout, 0.001))
        except TimeoutError:
            if self.channel.is_closed:
                raise BrokerUnavailableError("RabbitMQ: the channel is closed.") from None
            return []
        msgs = [first]
        while len(msgs) < max_messages and not self.buffer.empty():
            msgs.append(self.buffer.get_nowait())
        return [
            Delivery(dict(m.headers or {}), bytes(m.body), "", m, bool(m.redelivered)) for m in msgs
        ]

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        try:
            for d in deliveries:
                await d.handle.ack()
        except _DOWN as exc:
            raise BrokerUnavailableError(f"RabbitMQ: ack failed ({exc!r}).") from exc

    async def close(self) -> None:
        # closing the channel returns everything unacknowledged to the queue, in order
        try:
            await asyncio.wait_for(self.channel.close(), 2.0)
        except Exception:
            log.debug("RabbitMQ: closing a channel failed", exc_info=True)


class RabbitMQSource(Source):
    """Consumes the relay's quorum queues: ``<exchange>.<p>`` per partition, declared with
    single active consumer, consumed with a bounded prefetch and manual acks.

    RabbitMQ removes a message once acknowledged, so a queue serves one consumer group —
    the relay's queues belong to one target (a projection or a set of event handlers). On
    takeover the new holder gets the dead holder's unacknowledged messages again as soon as
    RabbitMQ notices the dead connection (at once after a crash; within two ``heartbeat``
    intervals for a hung process). There is no broker cursor: after a re-subscribe the
    consumer sees what is unacknowledged, in queue order, and drops what it already
    applied by sequence.

    Args:
        url: ``amqp://user:password@host:port/vhost``.
        exchange: the relay's exchange (also the queue-name prefix).
        prefetch: the most unacknowledged messages per subscription (the look-ahead past
            a gap is bounded by it).
        heartbeat: AMQP heartbeat interval in seconds (a hung consumer's connection is
            dropped by the server after about two of them).
    """

    name = "rabbitmq"

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        exchange: str = "cqrskit.events",
        prefetch: int = 1000,
        heartbeat: int = 5,
    ) -> None:
        self.url = url
        self.exchange_name = check_token(exchange, "exchange name")
        self.prefetch = prefetch
        self.max_unacked = prefetch
        self.heartbeat = heartbeat
        self._conn: AbstractConnection | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:  # the URL holds a password: never shown
        return f"RabbitMQSource(exchange={self.exchange_name!r})"

    def destination(self, partition: int) -> str:
        """See :meth:`Source.destination`: queue and routing key ``<exchange>.<p>``."""
        return f"{self.exchange_name}.{partition}"

    async def _connection(self) -> AbstractConnection:
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.is_closed:
                return conn
            self._conn = None
            try:
                conn = await asyncio.wait_for(
                    aio_pika.connect(self.url, heartbeat=self.heartbeat), 5.0
                )
            except (*_DOWN, amqp_errors.ProbableAuthenticationError) as exc:
                raise BrokerUnavailableError(f"RabbitMQ: cannot connect ({exc!r}).") from exc
            self._conn = conn
            return conn

    async def subscribe(self, group: str, partition: int, cursor: str) -> Subscription:
        """See :meth:`Source.subscribe` (``cursor`` is not used: RabbitMQ has none)."""
        conn = await self._connection()
        name = self.destination(partition)
        try:
            channel = await conn.channel()
            await channel.set_qos(prefetch_count=self.prefetch)
            try:
                queue = await channel.declare_queue(name, durable=True, arguments=QUEUE_ARGUMENTS)
                await queue.bind(self.exchange_name, routing_key=name)
            except amqp_errors.ChannelNotFoundEntity as exc:
                raise BrokerUnavailableError(
                    f"RabbitMQ: no exchange {self.exchange_name!r} yet (the relay declares it)."
                ) from exc
            except amqp_errors.ChannelPreconditionFailed:
                # declared earlier without single active consumer: use it as it is
                channel = await conn.channel()
                await channel.set_qos(prefetch_count=self.prefetch)
                queue = await channel.declare_queue(name, passive=True)
            sub = _RabbitSubscription(channel, queue, self.prefetch)
            await sub.start()
        except BrokerUnavailableError:
            raise
        except _DOWN as exc:
            await self.close()  # a broken connection is not used again
            raise BrokerUnavailableError(f"RabbitMQ: cannot subscribe ({exc!r}).") from exc
        return sub

    async def backlog(self, group: str, partition: int) -> int | None:
        """See :meth:`Source.backlog`: messages ready in the partition's queue."""
        try:
            conn = await self._connection()
            channel = await conn.channel()
            try:
                queue = await channel.declare_queue(self.destination(partition), passive=True)
                count = queue.declaration_result.message_count
            finally:
                await channel.close()
        except (BrokerUnavailableError, *_DOWN):
            return None
        return int(count or 0)

    async def close(self) -> None:
        """Close the connection (a later subscribe reconnects)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:
                log.debug("RabbitMQ: error while closing", exc_info=True)
