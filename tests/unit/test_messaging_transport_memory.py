"""The transport conformance kit on the in-memory transport."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from cqrskit.messaging import InMemoryTransport, Transport
from cqrskit.testing.transport import TransportConformance


class TestInMemoryTransport(TransportConformance):
    async def make_transport(
        self, *, max_bytes: int | None = None, missing: bool = False
    ) -> Transport:
        return InMemoryTransport(
            max_bytes=max_bytes or 1 << 20, destinations=set() if missing else None
        )

    async def read_raw(
        self, transport: Transport, partition: int
    ) -> list[tuple[Mapping[str, Any], bytes]]:
        assert isinstance(transport, InMemoryTransport)
        return list(transport.wire(partition))

    async def interrupt(self, transport: Transport) -> None:
        assert isinstance(transport, InMemoryTransport)
        transport.available = False
        asyncio.get_running_loop().call_later(0.2, setattr, transport, "available", True)

    async def dispose(self, transport: Transport) -> None:
        await transport.close()


class TestInMemoryTransportWithoutDedup(TestInMemoryTransport):
    async def make_transport(
        self, *, max_bytes: int | None = None, missing: bool = False
    ) -> Transport:
        return InMemoryTransport(
            max_bytes=max_bytes or 1 << 20,
            destinations=set() if missing else None,
            dedup_window=None,
        )
