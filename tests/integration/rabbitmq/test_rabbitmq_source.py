"""The source conformance kit on RabbitMQ (the shared node, through a TCP proxy)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from tests.conftest import require_service
from tests.support.proxy import FaultProxy

from cqrskit.messaging import Source, Transport
from cqrskit.rabbitmq import RabbitMQSource, RabbitMQTransport
from cqrskit.testing.source import SourceConformance

URL = "amqp://guest:guest@127.0.0.1:5672/"


class TestRabbitMQSource(SourceConformance):
    independent_groups = False

    @pytest.fixture(autouse=True)
    async def _proxy(self) -> AsyncIterator[None]:
        require_service("rabbitmq")
        self.proxy = FaultProxy("127.0.0.1", 5672, protocol="raw")
        await self.proxy.start()
        yield
        await self.proxy.close()

    async def make_pair(self) -> tuple[Transport, Source]:
        exchange = f"cqrskit_s.{uuid.uuid4().hex[:12]}"
        t = RabbitMQTransport(URL, exchange=exchange, ack_timeout=5.0)
        src = RabbitMQSource(
            f"amqp://guest:guest@127.0.0.1:{self.proxy.port}/", exchange=exchange, heartbeat=2
        )
        return t, src

    async def interrupt(self, source: Source) -> None:
        self.proxy.reset_all()

    async def dispose(self, transport: Transport, source: Source) -> None:
        await source.close()
        await transport.close()
        assert isinstance(transport, RabbitMQTransport)
        conn = await aio_pika.connect(URL)
        try:
            ch = await conn.channel()
            for p in range(self.partitions):
                await ch.queue_delete(transport.destination(p))
            await ch.exchange_delete(transport.exchange_name)
        finally:
            await conn.close()
