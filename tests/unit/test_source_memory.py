"""The source conformance kit on the in-memory broker."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from cqrskit.messaging import InMemoryTransport, Source, Transport
from cqrskit.testing.source import SourceConformance


class TestInMemorySource(SourceConformance):
    timeout = 10.0

    async def make_pair(self) -> tuple[Transport, Source]:
        t = InMemoryTransport(dedup_window=None)
        return t, t.source()

    async def interrupt(self, source: Source) -> None:
        assert isinstance(source.broker, InMemoryTransport)  # type: ignore[attr-defined]
        source.broker.available = False  # type: ignore[attr-defined]
        source.broker.available = True  # type: ignore[attr-defined]

    async def dispose(self, transport: Transport, source: Source) -> None:
        await source.close()


async def test_the_kit_leaves_no_temporary_directory_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    await TestInMemorySource().test_consumer_applies_every_event_once_in_order()
    assert list(tmp_path.iterdir()) == []
