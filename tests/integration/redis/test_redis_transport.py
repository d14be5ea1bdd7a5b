"""The transport conformance kit on Redis Streams (the shared server on 6379)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import redis.asyncio as aioredis
from tests.conftest import require_service
from tests.support.brokers import redis_read
from tests.support.proxy import FaultProxy
from tests.support.transport_retry import refused_then_retried

from cqrskit.messaging import Transport
from cqrskit.redis import RedisTransport
from cqrskit.testing.transport import TransportConformance

URL = "redis://127.0.0.1:6379/0"


class TestRedisTransport(TransportConformance):
    @pytest.fixture(autouse=True)
    async def _proxy(self) -> AsyncIterator[None]:
        require_service("redis")
        self.proxy = FaultProxy("127.0.0.1", 6379, protocol="raw")
        await self.proxy.start()
        self.made: list[RedisTransport] = []
        yield
        client = aioredis.from_url(URL)
        try:
            for t in self.made:
                await t.close()
                keys = [k async for k in client.scan_iter(match=f"{t.key_prefix}:*")]
                if keys:
                    await client.delete(*keys)
        finally:
            await client.aclose()
        await self.proxy.close()

    async def make_transport(
        self, *, max_bytes: int | None = None, missing: bool = False
    ) -> Transport:
        t = RedisTransport(
            f"redis://127.0.0.1:{self.proxy.port}/0",
            key_prefix=f"cqrskit_t:{uuid.uuid4().hex[:12]}",
            create=not missing,
            ack_timeout=3.0,
            max_bytes=max_bytes or 1 << 20,
        )
        self.made.append(t)
        return t

    async def read_raw(
        self, transport: Transport, partition: int
    ) -> list[tuple[Mapping[str, Any], bytes]]:
        return await redis_read(URL, transport.destination(partition))

    async def interrupt(self, transport: Transport) -> None:
        self.proxy.reset_all()

    async def dispose(self, transport: Transport) -> None:
        await transport.close()

    async def test_relay_retries_events_the_broker_refused(self) -> None:
        """A partition key that is not a stream (WRONGTYPE) is refused; once it is
        deleted, a retry publishes the parked events in order."""
        t = await self.make_transport()
        assert isinstance(t, RedisTransport)
        client = aioredis.from_url(URL)

        async def wrong_type(p: int) -> None:
            await client.delete(t.destination(p))
            await client.set(t.destination(p), "not a stream")

        async def repair(p: int) -> None:
            await client.delete(t.destination(p))

        try:
            await refused_then_retried(self, t, wrong_type, repair)
        finally:
            await client.aclose()
            await self.dispose(t)
