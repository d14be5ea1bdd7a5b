"""The transport conformance kit on NATS JetStream (the shared server on 4222)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from tests.conftest import require_service
from tests.support.brokers import nats_delete_stream, nats_read
from tests.support.proxy import FaultProxy

from cqrskit.messaging import Transport
from cqrskit.nats import NatsTransport
from cqrskit.testing.transport import TransportConformance

URL = "nats://127.0.0.1:4222"


class TestNatsTransport(TransportConformance):
    @pytest.fixture(autouse=True)
    async def _proxy(self) -> AsyncIterator[None]:
        require_service("nats")
        self.proxy = FaultProxy("127.0.0.1", 4222, protocol="raw")
        await self.proxy.start()
        self.made: list[NatsTransport] = []
        yield
        for t in self.made:
            await t.close()
            await nats_delete_stream(URL, t.stream)
        await self.proxy.close()

    async def make_transport(
        self, *, max_bytes: int | None = None, missing: bool = False
    ) -> Transport:
        tag = uuid.uuid4().hex[:12]
        t = NatsTransport(
            f"nats://127.0.0.1:{self.proxy.port}",
            stream=f"CQRSKIT_T_{tag}",
            subject_prefix=f"cqrskit_t.{tag}",
            create=not missing,
            ack_timeout=3.0,
            max_bytes=max_bytes or 1 << 20,
        )
        self.made.append(t)
        return t

    async def read_raw(
        self, transport: Transport, partition: int
    ) -> list[tuple[Mapping[str, Any], bytes]]:
        assert isinstance(transport, NatsTransport)
        return await nats_read(URL, transport.stream, transport.destination(partition))

    async def interrupt(self, transport: Transport) -> None:
        self.proxy.reset_all()

    async def dispose(self, transport: Transport) -> None:
        await transport.close()
