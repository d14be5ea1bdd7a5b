"""``Projector.stop``: a batch that does not finish in time is abandoned, and the lease is
released all the same (a standby takes over at once, not after ``lease_ttl``)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from cqrskit import Event
from cqrskit.projections import Projection, ProjectionContext, Projector
from cqrskit.serialization import EventTypes, JsonSerializer
from cqrskit.sqlite import SqliteEventStore, SqliteReadDatabase

types = EventTypes()


@types.register("stop.tick")
@dataclass(frozen=True)
class Tick(Event):
    n: int


def _lease(path: Path) -> tuple[str | None, int]:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(
            "SELECT p.lease_owner, c.position FROM cqrskit_projections p JOIN "
            "cqrskit_checkpoints c ON c.projection = p.name AND c.generation = "
            "p.active_generation WHERE p.name = 'ticks'"
        ).fetchone()
    finally:
        conn.close()
    return row[0], int(row[1])


async def _write(store: SqliteEventStore, count: int) -> None:
    for n in range(count):
        uow = await store.begin()
        uow.record(f"t-{n}", Tick(n))
        await uow.commit()


async def test_a_hung_batch_is_abandoned_and_the_lease_released(tmp_path: Path) -> None:
    serializer = JsonSerializer(types)
    store = SqliteEventStore(tmp_path / "w.db", encoder=serializer.encode)
    read_path = tmp_path / "r.db"
    read_db = SqliteReadDatabase(str(read_path))
    entered = asyncio.Event()
    ticks = Projection("ticks", tables={"t": ("CREATE TABLE {t} (n INTEGER)",)})

    @ticks.on
    async def on_tick(e: Tick, ctx: ProjectionContext) -> None:
        entered.set()
        await asyncio.Event().wait()  # a handler that never returns

    projector = Projector(store, read_db, [ticks], serializer, lease_ttl=30.0)
    await projector.start()
    try:
        await _write(store, 3)
        await asyncio.wait_for(entered.wait(), 20)
        assert projector.leading("ticks")
        owner, checkpoint = _lease(read_path)
        assert owner == projector.owner
        started = time.monotonic()
        await asyncio.wait_for(projector.stop(timeout=0.2), 20)
        assert time.monotonic() - started < 15  # not stuck behind the hung handler
        owner, checkpoint = _lease(read_path)
        assert owner is None  # released at once, though lease_ttl is 30 s
        assert checkpoint == 0  # the abandoned batch rolled back
        assert not projector.leading("ticks")
    finally:
        await read_db.close()
        store.close()


async def test_a_batch_whose_unwinding_hangs_too_is_left_behind_fenced(
    tmp_path: Path,
) -> None:
    """A handler that swallows the first cancellation and hangs again: stop() cancels it
    again, then leaves it behind, and still releases the lease within a bound (before,
    one cancellation was sent and stop() waited for ever)."""
    serializer = JsonSerializer(types)
    store = SqliteEventStore(tmp_path / "w.db", encoder=serializer.encode)
    read_path = tmp_path / "r.db"
    read_db = SqliteReadDatabase(str(read_path))
    entered = asyncio.Event()
    ticks = Projection("ticks", tables={"t": ("CREATE TABLE {t} (n INTEGER)",)})

    @ticks.on
    async def on_tick(e: Tick, ctx: ProjectionContext) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.Event().wait()  # its clean-up hangs as well

    projector = Projector(store, read_db, [ticks], serializer, lease_ttl=30.0)
    await projector.start()
    try:
        await _write(store, 3)
        await asyncio.wait_for(entered.wait(), 20)
        started = time.monotonic()
        await asyncio.wait_for(projector.stop(timeout=0.2), 20)
        assert time.monotonic() - started < 15
        owner, checkpoint = _lease(read_path)
        assert owner is None
        assert checkpoint == 0
    finally:
        await read_db.close()
        store.close()


async def test_a_batch_that_finishes_in_time_commits(tmp_path: Path) -> None:
    serializer = JsonSerializer(types)
    read_path = tmp_path / "r.db"
    async with (
        SqliteEventStore(tmp_path / "w.db", encoder=serializer.encode) as store,
        SqliteReadDatabase(str(read_path)) as read_db,
    ):
        gate = asyncio.Event()
        entered = asyncio.Event()
        ticks = Projection("ticks", tables={"t": ("CREATE TABLE {t} (n INTEGER)",)})

        @ticks.on
        async def on_tick(e: Tick, ctx: ProjectionContext) -> None:
            entered.set()
            await gate.wait()
            await ctx.execute(f"INSERT INTO {ctx.table('t')} (n) VALUES (?)", e.n)

        projector = Projector(store, read_db, [ticks], serializer, batch_size=10)
        await projector.start()
        await _write(store, 3)
        await asyncio.wait_for(entered.wait(), 20)
        stopping = asyncio.ensure_future(projector.stop(timeout=30))
        await asyncio.sleep(0)
        gate.set()  # the batch in flight finishes within the timeout
        await asyncio.wait_for(stopping, 30)
        owner, checkpoint = _lease(read_path)
        assert owner is None
        assert checkpoint >= 1
