"""The RabbitMQ transport (see :class:`RabbitMQTransport`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from cqrskit.errors import BrokerUnavailableError, MissingExtraError
from cqrskit.messaging.envelope import DEFAULT_MAX_BYTES, Envelope
from cqrskit.messaging.partitioning import check_token
from cqrskit.messaging.transport import Transport

try:
    import aio_pika
    import aiormq.exceptions as amqp_errors
    from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
    from pamqp.commands import Basic
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingExtraError("rabbitmq", "aio-pika") from exc

__all__ = ["QUEUE_ARGUMENTS", "RabbitMQTransport"]

QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum", "x-single-active-consumer": True}
"""How every partition's queue is declared (by the transport and by the source): a quorum
queue with a single active consumer."""

log = logging.getLogger("cqrskit.rabbitmq")

# a closed channel for these reasons is a refusal of the message, not an outage
_REFUSING = (
    amqp_errors.ChannelAccessRefused,
    amqp_errors.ChannelNotFoundEntity,
    amqp_errors.ChannelPreconditionFailed,
)


class RabbitMQTransport(Transport):
    """Publishes to a durable direct exchange; partition ``p`` uses routing key and quorum
    queue ``<exchange>.<p>`` (single active consumer).

    Publisher confirms are on and every message is persistent and ``mandatory``: a call
    returns when RabbitMQ confirmed each message (stored by the quorum queue's majority),
    refused it (returned as unroutable, or the channel closed for access or a missing
    exchange), or raises :class:`~cqrskit.errors.BrokerUnavailableError`. At most
    ``window`` confirms are outstanding. The connection is not "robust": after a lost
    connection the next call connects afresh and publishes the batch again, so messages
    of one partition are never stored out of order.

    Args:
        url: ``amqp://user:password@host:port/vhost``.
        exchange: the exchange name (and the queue-name prefix).
        create: declare the exchange and each partition's quorum queue (and binding) if
            missing; with ``False`` they must exist.
        window: the most confirms outstanding at once.
        ack_timeout: seconds to wait for one window's confirms.
        max_bytes: larger payloads are refused without being sent.
    """

    name = "rabbitmq"
    broker_dedup = False
    max_bytes: int

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        exchange: str = "cqrskit.events",
        create: bool = True,
        window: int = 1000,
        ack_timeout: float = 5.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.url = url
        self.exchange_name = check_token(exchange, "exchange name")
        self.create = create
        self.window = window
        self.ack_timeout = ack_timeout
        self.max_bytes = max_bytes
        self._conn: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._declared: set[int] = set()
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:  # the URL holds a password: never shown
        return f"RabbitMQTransport(exchange={self.exchange_name!r})"

    def refusal(self, envelope: Envelope) -> str | None:
        """See :meth:`Transport.refusal`: a payload over ``max_bytes``."""
        if len(envelope.payload) > self.max_bytes:
            return f"payload of {len(envelope.payload)} bytes exceeds {self.max_bytes}"
        return None

    def destination(self, partition: int) -> str:
        """See :meth:`Transport.destination`: routing key and queue ``<exchange>.<p>``."""
        return f"{self.exchange_name}.{partition}"

    async def _open(self) -> AbstractExchange | str:
        """The exchange, or why publishing to it is refused."""
        ch = self._channel
        if self._exchange is not None and ch is not None and not ch.is_closed:
            return self._exchange
        async with self._lock:
            await self._drop()
            try:
                conn = await asyncio.wait_for(aio_pika.connect(self.url), self.ack_timeout)
            except amqp_errors.ProbableAuthenticationError as exc:
                # about the connection, not the messages: parking them would dead-letter
                # the whole log over a password being rotated
                raise BrokerUnavailableError(
                    f"RabbitMQ refused the login ({type(exc).__name__}): check the user, "
                    "password and vhost of the URL (not shown)."
                ) from exc
            except (OSError, TimeoutError, amqp_errors.AMQPError) as exc:
                raise BrokerUnavailableError(f"RabbitMQ: cannot connect ({exc!r}).") from exc
            self._conn = conn
            try:
                ch, ex = await asyncio.wait_for(self._setup(conn), self.ack_timeout)
            except _REFUSING as exc:
                await self._drop()
                return f"RabbitMQ refused the exchange {self.exchange_name!r}: {exc}"
            except (OSError, TimeoutError, amqp_errors.AMQPError) as exc:
                await self._drop()
                raise BrokerUnavailableError(f"RabbitMQ: channel setup failed ({exc!r}).") from exc
            self._channel, self._exchange = ch, ex
            return ex

    async def _setup(self, conn: AbstractConnection) -> tuple[AbstractChannel, AbstractExchange]:
        ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
        if self.create:
            ex = await ch.declare_exchange(
                self.exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
            )
        else:
            ex = await ch.get_exchange(self.exchange_name, ensure=True)
        return ch, ex

    async def _declare(self, partition: int) -> str | None:
        """Declare ``partition``'s queue and binding (once per connection); return why
        RabbitMQ refused them, or ``None``."""
        if partition in self._declared or not self.create:
            return None
        assert self._channel is not None
        name = self.destination(partition)
        try:
            # bounded like a confirm: a broker that stops answering is an outage
            async with asyncio.timeout(self.ack_timeout):
                queue = await self._channel.declare_queue(
                    name, durable=True, arguments=QUEUE_ARGUMENTS
                )
                await queue.bind(self.exchange_name, routing_key=name)
        except _REFUSING as exc:
            # e.g. a queue of that name declared otherwise (PRECONDITION_FAILED): about
            # this partition only. The refusal closed the channel: the caller opens another
            await self._drop()
            return f"RabbitMQ refused the queue {name!r}: {exc}"
        self._declared.add(partition)
        return None

    async def publish(self, messages: Sequence[Envelope]) -> list[str | None]:
        """See :meth:`Transport.publish`. A partition whose queue RabbitMQ refuses to
        declare refuses that partition's messages; the others are published."""
        ex = await self._open()
        if isinstance(ex, str):
            return [ex] * len(messages)
        results: list[str | None] = [None] * len(messages)
        try:
            refused: dict[int, str] = {}
            for p in sorted({env.partition for env in messages}):
                reason = await self._declare(p)
                if reason is not None:
                    refused[p] = reason
                    ex = await self._open()  # nothing was published yet in this call
                    if isinstance(ex, str):
                        return [ex] * len(messages)
            if refused:
                results = [refused.get(env.partition) for env in messages]
            for start in range(0, len(messages), self.window):
                await self._publish_window(messages, start, results)
        except _REFUSING as exc:
            # the channel is closed now: everything not confirmed in this call is refused
            await self._drop()
            reason = f"RabbitMQ refused the message: {exc}"
            return [r if r is not None else reason for r in results]
        except (OSError, TimeoutError, amqp_errors.AMQPError, RuntimeError) as exc:
            await self._drop()
            raise BrokerUnavailableError(f"RabbitMQ: publish failed ({exc!r}).") from exc
        return results

    async def _publish_window(
        self,
        messages: Sequence[Envelope],
        start: int,
        results: list[str | None],
    ) -> None:
        tasks: list[tuple[int, asyncio.Future[Any]]] = []
        # aio-pika's channel hands the frames to aiormq's; publishing on aiormq's directly
        # saves building an aio_pika.Message per event (a quarter of the client's CPU per
        # message) and behaves the same: confirms, returns raised, nacks raised
        assert self._channel is not None
        channel = await self._channel.get_underlay_channel()
        exchange = self.exchange_name
        for i in range(start, min(start + self.window, len(messages))):
            if results[i] is not None:
                continue  # its partition's queue was refused
            env = messages[i]
            reason = self.refusal(env)
            if reason is not None:
                results[i] = reason
                continue
            properties = Basic.Properties(
                headers=env.headers(),  # type: ignore[arg-type]
                delivery_mode=2,  # persistent
                message_id=env.message_id,
                content_type="application/json",
            )
            # publishes take the channel lock in creation order: frames go out in order
            task: asyncio.Future[Any] = asyncio.ensure_future(
                channel.basic_publish(
                    env.payload,
                    exchange=exchange,
                    routing_key=self.destination(env.partition),
                    properties=properties,
                    mandatory=True,
                )
            )
            tasks.append((i, task))
        if not tasks:
            return
        try:
            _done, late = await asyncio.wait([f for _, f in tasks], timeout=self.ack_timeout)
            if late:
                raise BrokerUnavailableError(
                    f"RabbitMQ: {len(late)} confirms did not arrive within {self.ack_timeout} s."
                )
        finally:
            for _, fut in tasks:
                if not fut.done():
                    fut.cancel()
            await asyncio.gather(*(f for _, f in tasks), return_exceptions=True)
        for i, fut in tasks:
            error = fut.exception()
            if error is None:
                continue
            if isinstance(error, amqp_errors.PublishError):
                results[i] = (
                    f"unroutable: no queue is bound to {self.destination(messages[i].partition)!r}"
                )
            elif isinstance(error, amqp_errors.DeliveryError):
                raise BrokerUnavailableError(f"RabbitMQ: message nacked ({error!r}).") from error
            else:
                raise error

    async def _drop(self) -> None:
        conn, self._conn, self._channel, self._exchange = self._conn, None, None, None
        self._declared.clear()
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:
                log.debug("RabbitMQ: error while closing", exc_info=True)

    async def close(self) -> None:
        """Close the connection (a later publish reconnects)."""
        await self._drop()
