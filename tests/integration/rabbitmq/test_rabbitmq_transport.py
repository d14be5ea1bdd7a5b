"""The transport conformance kit on RabbitMQ (the shared node on 5672)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from tests.conftest import require_service
from tests.support.brokers import rabbit_take, wait_until
from tests.support.proxy import FaultProxy, Mode
from tests.support.transport_retry import refused_then_retried

from cqrskit.errors import BrokerUnavailableError
from cqrskit.eventlog import InMemoryEventStore
from cqrskit.messaging import Envelope, Relay, Transport
from cqrskit.projections import SqliteReadDatabase, dead_letters
from cqrskit.rabbitmq import RabbitMQTransport
from cqrskit.testing.transport import TransportConformance, envelopes_for, stored_events

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
        try:  # consumed, not basic.get: refused by quorum queues with a single active consumer
            seen += await rabbit_take(ch, name)
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


async def test_a_refused_login_is_an_outage_not_a_refusal_of_every_event(
    tmp_path: Path,
) -> None:
    """A wrong password (or a user being rotated) concerns the connection, not the
    events: the relay backs off and parks nothing, instead of dead-lettering the log."""
    require_service("rabbitmq")
    t = RabbitMQTransport(
        "amqp://guest:canary-wrong-password@127.0.0.1:5672/",
        exchange=f"cqrskit_t.{uuid.uuid4().hex[:12]}",
    )
    [env] = envelopes_for(stored_events(1), 1)
    with pytest.raises(BrokerUnavailableError) as info:
        await t.publish([env])
    assert "canary-wrong-password" not in str(info.value)
    store = InMemoryEventStore()
    store._apply(stored_events(5))
    db = SqliteReadDatabase(str(tmp_path / "state.db"))
    try:
        async with Relay(store, db, t, max_backoff=0.05) as relay:
            await wait_until(lambda: relay.outages >= 1, what="an outage")
            assert relay.checkpoint == 0
        assert relay.parked == 0
        assert await dead_letters(db, "relay") == []
    finally:
        await t.close()
        await db.close()


async def test_a_silent_broker_is_an_outage_within_the_ack_timeout() -> None:
    """The connection is up but the broker stops answering (blackholed) while a new
    partition's queue is declared: publish gives up after ``ack_timeout``, as it does
    for confirms, instead of hanging until the AMQP heartbeat notices (minutes)."""
    require_service("rabbitmq")
    proxy = FaultProxy("127.0.0.1", 5672, protocol="raw")
    await proxy.start()
    exchange = f"cqrskit_t.{uuid.uuid4().hex[:12]}"
    t = RabbitMQTransport(
        f"amqp://guest:guest@127.0.0.1:{proxy.port}/", exchange=exchange, ack_timeout=2.0
    )
    try:
        envs = envelopes_for(stored_events(40, streams=40), 4)
        first = [e for e in envs if e.partition == 0][:1]
        other = [e for e in envs if e.partition == 1][:1]
        assert await t.publish(first) == [None]
        proxy.mode = Mode.BLACKHOLE
        with pytest.raises(BrokerUnavailableError):
            await asyncio.wait_for(t.publish(other), 20)
    finally:
        proxy.mode = Mode.FORWARD
        await t.close()
        await proxy.close()
        conn = await aio_pika.connect(URL)
        try:
            ch = await conn.channel()
            for p in range(4):
                await ch.queue_delete(f"{exchange}.{p}")
            await ch.exchange_delete(exchange)
        finally:
            await conn.close()


async def test_a_queue_refused_at_declare_refuses_only_its_partitions_messages() -> None:
    """One partition's queue cannot be declared as the transport declares it (a classic
    queue of that name exists: PRECONDITION_FAILED). Its messages are refused; the other
    partitions' messages of the same batch are published, and later calls keep working."""
    require_service("rabbitmq")
    exchange = f"cqrskit_t.{uuid.uuid4().hex[:12]}"
    conn = await aio_pika.connect(URL)
    ch = await conn.channel()
    await ch.declare_queue(f"{exchange}.1", durable=True)  # classic, not quorum
    t = RabbitMQTransport(URL, exchange=exchange, ack_timeout=5.0)
    try:
        envs = envelopes_for(stored_events(40, streams=40), 4)
        assert {e.partition for e in envs} == {0, 1, 2, 3}
        results = await t.publish(envs)
        for env, reason in zip(envs, results, strict=True):
            if env.partition == 1:
                assert reason is not None
                assert f"{exchange}.1" in reason, reason
            else:
                assert reason is None, reason
        later = envelopes_for(stored_events(8, streams=8, start=41), 4)
        again = await t.publish(later)
        assert [r is None for r in again] == [e.partition != 1 for e in later]
        for p in (0, 2, 3):
            held = await rabbit_take(ch, f"{exchange}.{p}")
            want = [e.message_id for e in [*envs, *later] if e.partition == p]
            assert [Envelope.from_wire(h, b).message_id for h, b in held] == want
    finally:
        await t.close()
        for p in range(4):
            await ch.queue_delete(f"{exchange}.{p}")
        await ch.exchange_delete(exchange)
        await conn.close()
