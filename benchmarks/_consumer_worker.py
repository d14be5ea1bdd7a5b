"""A worker process for benchmarks/consumer.py (not a benchmark itself).

``python benchmarks/_consumer_worker.py consumer NATS_URL NAME N DSN SCHEMA DELAY OWNER``
``python benchmarks/_consumer_worker.py projector LOG N DSN SCHEMA DELAY OWNER``
``python benchmarks/_consumer_worker.py memory NATS_URL NAME N READ_PATH COUNT``
``python benchmarks/_consumer_worker.py visible BROKER NAME N READ_PATH OUT``

The first two run until SIGTERM with a PostgreSQL read database whose commits take DELAY
extra seconds (a latency-bound read model: a remote database, synchronous replication).
``memory`` consumes COUNT messages into SQLite and prints its peak RSS in KiB.
``visible`` consumes into SQLite until SIGTERM and writes to OUT, after each commit, each
partition's committed position with the time (``time.monotonic()``: the same clock in every
process of the machine).
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from cqrskit.messaging import Consumer
from cqrskit.nats import NatsSource
from cqrskit.projections import PartitionedProjector, ReadDatabase, Session
from cqrskit.projections.partitions import partition_status
from cqrskit.sqlite import SqliteEventStore, SqliteReadDatabase


class SlowCommits(ReadDatabase):
    """A read database whose write transactions take ``delay`` more seconds to commit."""

    def __init__(self, inner: ReadDatabase, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.dialect = inner.dialect
        self.flavor = inner.flavor

    def transaction(self) -> AbstractAsyncContextManager[Session]:
        return self._tx()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Session]:
        async with self.inner.transaction() as s:
            yield s
            await asyncio.sleep(self.delay)

    def read_only(self) -> AbstractAsyncContextManager[Session]:
        return self.inner.read_only()

    def inline(self, connection: Any) -> Session:
        return self.inner.inline(connection)

    async def close(self) -> None:
        await self.inner.close()


def slow_pg(dsn: str, schema: str, delay: float) -> ReadDatabase:
    from cqrskit.postgres import PostgresReadDatabase

    return SlowCommits(PostgresReadDatabase(dsn, schema=schema, max_size=10), delay)


async def until_term(runner: Any, stop: Any) -> None:
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
    await runner()


async def consumer(
    url: str, name: str, n: str, dsn: str, schema: str, delay: str, owner: str
) -> None:
    from consumer import balances, serializer

    db = slow_pg(dsn, schema, float(delay))
    source = NatsSource(url, stream=name.upper(), subject_prefix=name)
    c = Consumer(source, db, [balances], serializer, partitions=int(n), batch_size=100,
                 lease_ttl=2.0, owner=owner)  # fmt: skip
    try:
        await until_term(c.run, c.request_stop)
    finally:
        await source.close()
        await db.close()


async def projector(path: str, n: str, dsn: str, schema: str, delay: str, owner: str) -> None:
    from consumer import balances, serializer

    db = slow_pg(dsn, schema, float(delay))
    store = SqliteEventStore(path, create_tables=False)
    p = PartitionedProjector(store, db, [balances], serializer, partitions=int(n),
                             batch_size=100, lease_ttl=2.0, owner=owner)  # fmt: skip
    try:
        await until_term(p.run, p.request_stop)
    finally:
        await db.close()
        store.close()


async def memory(url: str, name: str, n: str, read_path: str, count: str) -> None:
    from consumer import balances, serializer

    db = SqliteReadDatabase(read_path)
    source = NatsSource(url, stream=name.upper(), subject_prefix=name)
    c = Consumer(source, db, [balances], serializer, partitions=int(n), batch_size=500)
    async with c:
        while True:
            rows = await partition_status(db, "balances")
            if rows and sum(r.sequence for r in rows) >= int(count):
                break
            await c.signal.wait(1.0)
    await source.close()
    await db.close()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)


async def visible(broker: str, name: str, n: str, read_path: str, out: str) -> None:
    import time

    from consumer import balances, serializer, transport_and_source

    db = SqliteReadDatabase(read_path)
    transport, source = transport_and_source(broker, name)
    await transport.close()
    c = Consumer(source, db, [balances], serializer, partitions=int(n), batch_size=200,
                 poll_interval=0.2)  # fmt: skip
    seen: dict[int, int] = {}
    marks: list[tuple[int, int, float]] = []
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with c:
        while not stop.is_set():
            await c.signal.wait(0.05)
            async with db.read_only() as s:
                try:
                    rows = await s.fetchall(
                        "SELECT partition, position FROM cqrskit_partitions "
                        "WHERE projection = 'balances'"
                    )
                except Exception:
                    rows = []
            now = time.monotonic()
            for p, position in rows:
                if seen.get(int(p)) != int(position):
                    seen[int(p)] = int(position)
                    marks.append((int(p), int(position), now))
    await source.close()
    await db.close()
    with open(out, "w", encoding="utf-8") as f:  # noqa: ASYNC230 - once, at the end
        for p, position, t in marks:
            f.write(f"{p} {position} {t}\n")


def main(argv: list[str]) -> None:
    kind, *rest = argv
    runners = {"consumer": consumer, "projector": projector, "memory": memory, "visible": visible}
    asyncio.run(runners[kind](*rest))


if __name__ == "__main__":
    main(sys.argv[1:])
