"""The transport conformance kit on RabbitMQ (the shared node on 5672)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aio_pika
import pytest
from tests.conftest import require_service
from tests.support.proxy import FaultProxy
from tests.support.transport_retry import refused_then_retried

from cqrskit.messaging import Transport
from cqrskit.rabbitmq import RabbitMQTransport
from cqrskit.testing.transport import TransportConformance

URL = "amqp://guest:guest@127.0.0.1:5672/"


class TestRabbitMQTransport(TransportConformance):
    @pytest.fixture(autouse=True)
    async def _proxy(self) -> AsyncIterator[None]:
        require_service("rabbitmq")
        self.proxy = FaultProxy("127.0.0.1", 5672, protocol="raw")
        await self.proxy.start()
        self.made: list[RabbitMQTransport] = []
        self.seen: dict[str, list[tuple[Mapping[str, Any], bytes]]] = {}
        self.conn = await aio_pika.connect(URL)
        yield
        ch = await self.conn.channel()
        for t in self.made:
            await t.close()
            for p in range(self.partitions):
                await ch.queue_delete(t.destination(p))
            await ch.exchange_delete(t.exchange_name)
        await self.conn.close()
        await self.proxy.close()

    async def make_transport(
        self, *, max_bytes: int | None = None, missing: bool = False
    ) -> Transport:
        t = RabbitMQTransport(
            f"amqp://guest:guest@127.0.0.1:{self.proxy.port}/",
            exchange=f"cqrskit_t.{uuid.uuid4().hex[:12]}",
            create=not missing,
            ack_timeout=5.0,
            max_bytes=max_bytes or 1 << 20,
        )
        self.made.append(t)
        return t

    async def read_raw(
        self, transport: Transport, partition: int
    ) -> list[tuple[Mapping[str, Any], bytes]]:
        # reading a queue consumes it: keep what was read for the next call
        name = transport.destination(partition)
        seen = self.seen.setdefault(name, [])
        ch = await self.conn.channel()
        try:
            queue = await ch.declare_queue(name, passive=True)
            while True:
                msg = await queue.get(no_ack=True, fail=False)
                if msg is None:
                    break
                seen.append((dict(msg.headers or {}), bytes(msg.body)))
        except aio_pika.exceptions.ChannelNotFoundEntity:
            pass
        finally:
            if not ch.is_closed:
                await ch.close()
        return list(seen)

    async def interrupt(self, transport: Transport) -> None:
        self.proxy.reset_all()

    async def dispose(self, transport: Transport) -> None:
        await transport.close()

    async def test_relay_retries_events_the_broker_refused(self) -> None:
        """A partition whose queue is gone is unroutable (mandatory): refused; once the
        queue is bound again, a retry publishes the parked events in order."""
        t = await self.make_transport()
        assert isinstance(t, RabbitMQTransport)
        ch = await self.conn.channel()

        async def unbind(p: int) -> None:
            await ch.queue_delete(t.destination(p))

        async def repair(p: int) -> None:
            queue = await ch.declare_queue(
                t.destination(p), durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.bind(t.exchange_name, routing_key=t.destination(p))

        try:
            await refused_then_retried(self, t, unbind, repair)
        finally:
            await ch.close()
            await self.dispose(t)
