"""A broker refuses a partition's messages, the relay parks them, the destination is
repaired, and a retry publishes them (shared by the Redis and RabbitMQ transport tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from cqrskit.messaging import Relay, Transport, partition_of
from cqrskit.projections import dead_letters, request_retry
from cqrskit.testing.transport import TransportConformance, stored_events


async def refused_then_retried(
    kit: TransportConformance,
    transport: Transport,
    break_partition: Callable[[int], Awaitable[None]],
    repair_partition: Callable[[int], Awaitable[None]],
) -> None:
    """Publish a first batch, break the destination of ``kit-1``'s partition on the broker,
    publish the rest (the broker refuses that partition: events parked, placeholders refused
    too, holes counted), repair it, request a retry and check the broker then holds every
    parked event once, in version order per stream."""
    n = kit.partitions
    bad = partition_of("kit-1", n)
    events = stored_events(24, streams=6)
    first, rest = events[:6], events[6:]
    refused = [e for e in rest if partition_of(e.stream, n) == bad]
    assert refused
    store, db, _ = await kit._relay_setup()
    try:
        relay = Relay(store, db, transport, partitions=n, state_interval=0.05, max_backoff=0.1)
        async with relay:
            await kit._append(store, first)
            assert await relay.wait_published(6, kit.timeout)
            await break_partition(bad)
            await kit._append(store, rest)
            assert await relay.wait_published(24, kit.timeout)
            letters = await dead_letters(db, "relay")
            assert [d.position for d in letters] == [e.position for e in refused]
            assert all("refused" in d.error or "unroutable" in d.error for d in letters), [
                d.error for d in letters
            ]
            assert relay.gaps == len(refused)  # their placeholders were refused too
            assert relay.published == len(events) - len(refused)
            await repair_partition(bad)
            assert await request_retry(db, "relay") == len(refused)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + kit.timeout
            while await dead_letters(db, "relay"):
                assert loop.time() < deadline, "the parked events were not published again"
                await asyncio.sleep(0.02)
            assert relay.published == len(events)
        held = [e for e in await kit.read(transport, bad) if e.kind == "event"]
        retried = [e for e in held if e.position in {r.position for r in refused}]
        assert sorted(e.position for e in retried) == [e.position for e in refused]
        assert len(retried) == len(refused), "a retried event was stored twice"
        by_stream: dict[str, list[int]] = {}
        for env in sorted(retried, key=lambda e: e.sequence):
            by_stream.setdefault(env.stream, []).append(env.version)
        for stream, versions in by_stream.items():
            want = sorted(e.version for e in refused if e.stream == stream)
            assert versions == want, (stream, versions, want)
    finally:
        await db.close()
