"""The source conformance kit on NATS JetStream (the shared server, through a TCP proxy)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from tests.conftest import require_service
from tests.support.brokers import nats_delete_stream
from tests.support.proxy import FaultProxy

from cqrskit.messaging import Source, Transport
from cqrskit.nats import NatsSource, NatsTransport
from cqrskit.testing.source import SourceConformance

URL = "nats://127.0.0.1:4222"


class TestNatsSource(SourceConformance):
    @pytest.fixture(autouse=True)
    async def _proxy(self) -> AsyncIterator[None]:
        require_service("nats")
        self.proxy = FaultProxy("127.0.0.1", 4222, protocol="raw")
        await self.proxy.start()
        yield
        await self.proxy.close()

    async def make_pair(self) -> tuple[Transport, Source]:
        tag = uuid.uuid4().hex[:12]
        stream, prefix = f"CQRSKIT_S_{tag}", f"cqrskit_s.{tag}"
        t = NatsTransport(URL, stream=stream, subject_prefix=prefix, ack_timeout=3.0)
        src = NatsSource(
            f"nats://127.0.0.1:{self.proxy.port}", stream=stream, subject_prefix=prefix
        )
        return t, src

    async def interrupt(self, source: Source) -> None:
        self.proxy.reset_all()

    async def dispose(self, transport: Transport, source: Source) -> None:
        await source.close()
        await transport.close()
        assert isinstance(transport, NatsTransport)
        await nats_delete_stream(URL, transport.stream)


def test_ack_subjects_of_both_forms_give_the_stream_sequence() -> None:
    from cqrskit.errors import BrokerUnavailableError
    from cqrskit.nats.consumer import _ack_tokens

    assert _ack_tokens("$JS.ACK.S.c_0.3.1207.55.1700000000000000000.4") == ("1207", 3)
    v2 = "$JS.ACK.hub.ACCHASH.S.c_0.1.88.12.1700000000000000000.0.tok"
    assert _ack_tokens(v2) == ("88", 1)
    with pytest.raises(BrokerUnavailableError):
        _ack_tokens("_INBOX.x")
