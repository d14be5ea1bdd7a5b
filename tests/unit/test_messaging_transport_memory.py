"""The transport conformance kit on the in-memory transport."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

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


async def test_the_kit_leaves_no_temporary_directory_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every check that gives the relay a state database removes its directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    kit = TestInMemoryTransport()
    await kit.test_relay_publishes_every_event_once_in_stream_order()
    await kit.test_relay_advances_its_checkpoint_only_after_the_ack()
    await kit.test_relay_parks_a_refused_event_and_keeps_the_sequence_whole()
    await kit.test_relay_retries_parked_events_in_stream_order()
    assert list(tmp_path.iterdir()) == []
