"""A partition handed over on a slow RabbitMQ leaves the worker's other partitions alone.

Closing a subscription is how a worker hands a partition over (RabbitMQ then returns its
unacknowledged messages and lets the next single active consumer in). When the broker's
``Channel.CloseOk`` comes later than the heartbeat interval, aiormq gives up waiting and
sends a second ``Channel.Close``, which RabbitMQ answers by closing the whole connection:
had the subscriptions shared one, every other partition of the worker would fail with it.
The broker is made slow with a TCP proxy adding latency to every chunk, both ways.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from tests.conftest import require_service
from tests.support.proxy import FaultProxy

from cqrskit.messaging import Delivery, Subscription
from cqrskit.rabbitmq import RabbitMQSource, RabbitMQTransport
from cqrskit.rabbitmq import consumer as rabbit_consumer
from cqrskit.testing.transport import envelopes_for, stored_events

URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    require_service("rabbitmq")
    p = FaultProxy("127.0.0.1", 5672, protocol="raw")
    await p.start()
    yield p
    await p.close()


async def fetch_all(sub: Subscription, count: int) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + 20
    while len(got) < count:
        assert time.monotonic() < deadline, f"{len(got)} of {count} messages came"
        got += await sub.fetch(count - len(got), 0.5)
    return got


async def test_a_slow_close_leaves_the_other_subscriptions_working(
    proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    exchange = f"cqrskit_h.{uuid.uuid4().hex[:12]}"
    transport = RabbitMQTransport(URL, exchange=exchange, ack_timeout=5.0)
    # heartbeat 1 s: aiormq waits that long for Channel.CloseOk
    source = RabbitMQSource(f"amqp://guest:guest@127.0.0.1:{proxy.port}/", exchange=exchange,
                            heartbeat=1)  # fmt: skip
    monkeypatch.setattr(rabbit_consumer, "_CLOSE_WAIT", 0.2)
    envs = envelopes_for(stored_events(8), 2)
    try:
        assert await transport.publish(envs) == [None] * len(envs)
        per = {p: sum(e.partition == p for e in envs) for p in (0, 1)}
        leaving = await source.subscribe("g", 0, "")
        staying = await source.subscribe("g", 1, "")
        await fetch_all(leaving, per[0])  # left unacknowledged: they go back on close
        held = await fetch_all(staying, per[1])
        proxy.latency = 1.2  # a slow broker: CloseOk comes after aiormq's 1 s
        await leaving.close()
        # sent after the close (and after aiormq's second Channel.Close, if it sent one)
        await staying.ack(held)
        assert isinstance(staying, rabbit_consumer._RabbitSubscription)
        declared = await staying.channel.declare_queue(source.destination(1), passive=True)
        assert declared.declaration_result.message_count == 0  # the acks went through
        proxy.latency = 0.0
        assert not staying.channel.is_closed
        # the next holder of partition 0 gets the messages the closed one left
        again = await source.subscribe("g", 0, "")
        assert len(await fetch_all(again, per[0])) == per[0]
        await again.close()
        await staying.close()
    finally:
        proxy.latency = 0.0
        await source.close()
        await transport.close()
        conn = await aio_pika.connect(URL)
        try:
            ch = await conn.channel()
            for p in (0, 1):
                await ch.queue_delete(transport.destination(p))
            await ch.exchange_delete(exchange)
        finally:
            await conn.close()
