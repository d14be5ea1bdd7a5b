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

_CLOSE_WAIT = 2.0  # seconds a subscription's close is waited for (it goes on after that)
_closing: set[asyncio.Future[Any]] = set()  # closes still under way past the wait


def _closed(fut: asyncio.Future[Any]) -> None:
    _closing.discard(fut)
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("RabbitMQ: closing a connection failed", exc_info=fut.exception())


async def _close(conn: AbstractConnection) -> None:
    """Close a subscription's connection: everything it left unacknowledged goes back to
    the queue, in order, and the next single active consumer gets in. The close is never
    cancelled: past :data:`_CLOSE_WAIT` it goes on in the background (aiormq ends it by
    closing the socket, which the broker treats the same)."""
    closing = asyncio.ensure_future(conn.close())
    _closing.add(closing)
    closing.add_done_callback(_closed)
    try:
        await asyncio.wait_for(asyncio.shield(closing), _CLOSE_WAIT)
    except TimeoutError:
        log.info("RabbitMQ: a subscription is still closing after %.1f s", _CLOSE_WAIT)
    except Exception:  # noqa: BLE001 - logged by _closed
        pass


class _RabbitSubscription(Subscription):
    def __init__(
        self, conn: AbstractConnection, channel: AbstractChannel, queue: Any, prefetch: int
    ) -> None:
        self.conn = conn
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
        await _close(self.conn)


class RabbitMQSource(Source):
    """Consumes the relay's quorum queues: ``<exchange>.<p>`` per partition, declared with
    single active consumer, consumed with a bounded prefetch and manual acks.

    Each subscription has a connection of its own, closed with it. A partition moving to
    another worker then never disturbs this worker's other partitions: a slow broker's
    late ``Channel.CloseOk`` makes aiormq send a second ``Channel.Close``, which RabbitMQ
    answers by closing the whole connection; and one partition's deliveries never queue
    ahead of another's replies on a shared socket.

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
        self._subscribed: set[AbstractConnection] = set()  # the subscriptions' own
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:  # the URL holds a password: never shown
        return f"RabbitMQSource(exchange={self.exchange_name!r})"

    def destination(self, partition: int) -> str:
        """See :meth:`Source.destination`: queue and routing key ``<exchange>.<p>``."""
        return f"{self.exchange_name}.{partition}"

    async def _connect(self) -> AbstractConnection:
        try:
            return await asyncio.wait_for(aio_pika.connect(self.url, heartbeat=self.heartbeat), 5.0)
        except (*_DOWN, amqp_errors.ProbableAuthenticationError) as exc:
            raise BrokerUnavailableError(f"RabbitMQ: cannot connect ({exc!r}).") from exc

    async def _connection(self) -> AbstractConnection:
        """The connection shared by the status calls (:meth:`backlog`)."""
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.is_closed:
                return conn
            self._conn = None
            conn = await self._connect()
            self._conn = conn
            return conn

    async def subscribe(self, group: str, partition: int, cursor: str) -> Subscription:
        """See :meth:`Source.subscribe` (``cursor`` is not used: RabbitMQ has none)."""
        conn = await self._connect()
        self._subscribed.add(conn)
        conn.close_callbacks.add(lambda *_: self._subscribed.discard(conn))
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
            sub = _RabbitSubscription(conn, channel, queue, self.prefetch)
            await sub.start()
        except BaseException as exc:
            await _close(conn)  # nothing else uses it
            if isinstance(exc, _DOWN):
                raise BrokerUnavailableError(f"RabbitMQ: cannot subscribe ({exc!r}).") from exc
            raise
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
        """Close the connections, the subscriptions' too, and wait (bounded) for closes
        still under way (a later subscribe reconnects)."""
        conns = [c for c in (self._conn, *self._subscribed) if c is not None]
        self._conn = None
        self._subscribed.clear()
        for conn in conns:
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:
                log.debug("RabbitMQ: error while closing", exc_info=True)
        if _closing:
            # left to the event loop's shutdown, a close under way can hang it (aiormq)
            _, late = await asyncio.wait(set(_closing), timeout=_CLOSE_WAIT + 3.0)
            if late:
                log.warning("RabbitMQ: %d connection(s) still closing", len(late))
