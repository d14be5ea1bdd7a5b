"""The source conformance kit on Redis Streams (the shared server, through a TCP proxy)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from tests.conftest import require_service
from tests.support.proxy import FaultProxy

from cqrskit.messaging import Source, Transport
from cqrskit.redis import RedisSource, RedisTransport
from cqrskit.testing.source import SourceConformance

URL = "redis://127.0.0.1:6379/0"


class TestRedisSource(SourceConformance):
    @pytest.fixture(autouse=True)
    async def _proxy(self) -> AsyncIterator[None]:
        require_service("redis")
        self.proxy = FaultProxy("127.0.0.1", 6379, protocol="raw")
        await self.proxy.start()
        yield
        await self.proxy.close()

    async def make_pair(self) -> tuple[Transport, Source]:
        prefix = f"cqrskit_s:{uuid.uuid4().hex[:12]}"
        t = RedisTransport(URL, key_prefix=prefix, ack_timeout=3.0)
        src = RedisSource(f"redis://127.0.0.1:{self.proxy.port}/0", key_prefix=prefix)
        return t, src

    async def interrupt(self, source: Source) -> None:
        self.proxy.reset_all()

    async def dispose(self, transport: Transport, source: Source) -> None:
        await source.close()
        await transport.close()
        assert isinstance(transport, RedisTransport)
        client = aioredis.from_url(URL)
        try:
            keys = [k async for k in client.scan_iter(match=f"{transport.key_prefix}:*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
