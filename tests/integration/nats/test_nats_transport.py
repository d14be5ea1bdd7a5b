"""The transport conformance kit on NATS JetStream (the shared server on 4222)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from tests.conftest import require_service
from tests.support.brokers import nats_delete_stream, nats_read
from tests.support.proxy import FaultProxy

from cqrskit.errors import ConfigurationError
from cqrskit.eventlog import StoredEvent
from cqrskit.messaging import Envelope, Transport
from cqrskit.nats import NatsSource, NatsTransport
from cqrskit.testing.transport import TransportConformance, envelopes_for, stored_events

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


async def test_a_message_over_the_servers_max_payload_is_refused_not_retried() -> None:
    """A payload within ``max_bytes`` whose headers take the message past the server's
    ``max_payload`` is refused; the server would drop the connection instead, forever."""
    require_service("nats")
    tag = uuid.uuid4().hex[:12]
    t = NatsTransport(URL, stream=f"CQRSKIT_T_{tag}", subject_prefix=f"cqrskit_t.{tag}")
    try:
        first, after = stored_events(2, streams=2)
        data = json.dumps({"blob": "x" * ((1 << 20) - 12)})
        assert len(data) == 1 << 20  # the default max_bytes and NATS's default max_payload
        big = StoredEvent(
            first.position, first.stream, 1, first.type, 1, data, first.metadata
        )  # fmt: skip
        envs = envelopes_for([big, after], 1)
        results = await asyncio.wait_for(t.publish(envs), 30)
        assert results[1] is None, results
        assert isinstance(results[0], str), results
        assert "max_payload" in results[0], results
        held = await nats_read(URL, t.stream, t.destination(0))
        assert [Envelope.from_wire(h, b).message_id for h, b in held] == [envs[1].message_id]
    finally:
        await t.close()
        await nats_delete_stream(URL, t.stream)


@pytest.mark.parametrize(
    "options",
    [
        {"allow_reconnect": True},
        {"allow_reconnect": 1},
        {"max_reconnect_attempts": -1},  # would retry even the first connect forever
        {"reconnect_time_wait": 0.5},
        {"servers": ["nats://elsewhere:4222"]},
    ],
)
def test_connect_options_cannot_turn_the_clients_own_reconnects_back_on(
    options: dict[str, Any],
) -> None:
    """The transport and the source reconnect themselves (the client's reconnect would
    resend buffered publishes out of order): user options may not undo that."""
    for cls in (NatsTransport, NatsSource):
        with pytest.raises(ConfigurationError) as info:
            cls(URL, connect_options=options)
        assert next(iter(options)) in str(info.value)
        assert info.value.hint
    # what the transport sets itself, and options of other kinds, are taken
    kept = NatsTransport(URL, connect_options={"allow_reconnect": False, "name": "relay-1"})
    assert kept.connect_options == {"name": "relay-1"}
    assert NatsSource(URL, connect_options={"name": "c"}).connect_options == {"name": "c"}
