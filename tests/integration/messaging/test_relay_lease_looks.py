"""A relay looks at its lease without the write lock: on SQLite a write transaction is
``BEGIN IMMEDIATE``, the file's one write lock that every other writer (the application's
commands, the holder's checkpoints) queues behind; on PostgreSQL setting the bookkeeping
up takes an advisory lock that a standby has no business waiting for at every poll.

A standby polls every ``lease_ttl / 4`` and writes only to take the lease; an idle leader
looks for retry requests (and at its lease) every ``state_interval`` and writes only for a
heartbeat, every ``lease_ttl / 3``. The polls and looks are driven or counted directly
(no sleeps).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from tests.support.bank import Deposited

from cqrskit.eventlog import InMemoryEventStore
from cqrskit.messaging import InMemoryTransport, Relay
from cqrskit.messaging import state as relay_state
from cqrskit.messaging.relay import _Stopped
from cqrskit.projections import ReadDatabase, Session
from cqrskit.projections import schema as pschema
from cqrskit.projections.runner import LeaseLostError

Backend = tuple[Any, ReadDatabase]
POLLS = 20
BOUND = 10.0  # seconds the whole set of polls may take


class Counts:
    """The write transactions and read-only sessions ``db`` opens from now on."""

    def __init__(self, db: ReadDatabase, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writes = 0
        self.reads = 0
        transaction, read_only = db.transaction, db.read_only

        def counted_transaction(**options: Any) -> AbstractAsyncContextManager[Session]:
            self.writes += 1
            return transaction(**options)

        def counted_read_only() -> AbstractAsyncContextManager[Session]:
            self.reads += 1
            return read_only()

        monkeypatch.setattr(db, "transaction", counted_transaction)
        monkeypatch.setattr(db, "read_only", counted_read_only)


def driven(relay: Relay, polls: int) -> Callable[[], int]:
    """Make ``relay``'s pauses between looks return at once, counting them; after
    ``polls`` of them the relay is asked to stop. Returns the count."""
    done = [0]

    async def pause(seconds: float) -> None:
        assert seconds == relay.lease_ttl / 4
        done[0] += 1
        if done[0] >= polls:
            relay.request_stop()

    relay._pause = pause  # type: ignore[method-assign]
    return lambda: done[0]


async def held_by_another(db: ReadDatabase, relay: Relay) -> int:
    """Set the relay's bookkeeping up with the lease held by ``holder``; its epoch."""
    async with db.transaction() as s:
        row = await relay_state.install(s, relay.identity)
        epoch = await pschema.take_lease(s, relay.name, "holder", row)
    assert epoch is not None
    return epoch


async def test_an_idle_standby_polls_without_a_write_transaction(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, db = backend
    # lease_ttl far beyond the test: the holder's lease never looks expired
    standby = Relay(log, db, InMemoryTransport(), owner="standby", lease_ttl=300.0)
    epoch = await held_by_another(db, standby)
    counts = Counts(db, monkeypatch)
    polls = driven(standby, POLLS)
    with pytest.raises(_Stopped):
        await asyncio.wait_for(standby._acquire(), BOUND)
    assert polls() == POLLS
    assert counts.writes == 0  # no BEGIN IMMEDIATE (SQLite), no read-write BEGIN (PostgreSQL)
    assert counts.reads == POLLS  # one read-only look per poll
    assert not standby.leading
    async with db.read_only() as s:
        row = await pschema.load(s, standby.name)
    assert row is not None
    assert (row.lease_owner, row.lease_epoch) == ("holder", epoch)


async def test_a_standby_takes_a_free_or_expired_lease_in_one_write(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, db = backend
    standby = Relay(log, db, InMemoryTransport(), owner="standby", lease_ttl=300.0)
    epoch = await held_by_another(db, standby)
    async with db.transaction() as s:
        await pschema.release_lease(s, standby.name, epoch)
    counts = Counts(db, monkeypatch)
    polls = driven(standby, POLLS)
    taken = await asyncio.wait_for(standby._acquire(), BOUND)
    assert taken == epoch + 1
    assert (polls(), counts.reads, counts.writes) == (0, 1, 1)  # one look, one take

    # a lease whose beat stood still for lease_ttl is taken too (lease_ttl 0: at once)
    other = Relay(log, db, InMemoryTransport(), owner="other", lease_ttl=0.0)
    polls = driven(other, POLLS)
    counts.reads = counts.writes = 0
    assert await asyncio.wait_for(other._acquire(), BOUND) == epoch + 2
    assert (polls(), counts.reads, counts.writes) == (0, 1, 1)


@pytest.mark.postgres
async def test_a_standby_does_not_wait_for_the_bookkeeping_lock(
    postgres_dsn: str, pg_read: tuple[str, ReadDatabase]
) -> None:
    """PostgreSQL: the bookkeeping's set-up lock (taken by any projector or relay starting,
    held by a long set-up transaction) does not stall a standby's looks."""
    import asyncpg

    _, db = pg_read
    standby = Relay(InMemoryEventStore(), db, InMemoryTransport(), lease_ttl=300.0)
    await held_by_another(db, standby)
    polls = driven(standby, POLLS)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7263541)")  # schema.install's
            with pytest.raises(_Stopped):
                await asyncio.wait_for(standby._acquire(), BOUND)
    finally:
        await conn.close()
    assert polls() == POLLS


async def test_an_idle_leader_looks_without_a_write_transaction(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, db = backend
    [first] = await log.append("acct-1", Deposited("acct-1", 1))
    # lease_ttl far beyond the test: no heartbeat is due; a look at every idle poll
    relay = Relay(
        log, db, InMemoryTransport(), lease_ttl=300.0, state_interval=0.0, poll_interval=0.01
    )
    looks = [0]
    enough = asyncio.Event()
    retry_requests = relay._retry_requests

    async def counted(epoch: int, **options: Any) -> list[tuple[int, str, int]]:
        looks[0] += 1
        if looks[0] >= POLLS:
            enough.set()
        return await retry_requests(epoch, **options)

    relay._retry_requests = counted  # type: ignore[method-assign]
    async with relay:
        assert await relay.wait_published(first.position, BOUND)
        counts = Counts(db, monkeypatch)
        looks[0] = 0
        enough.clear()
        await asyncio.wait_for(enough.wait(), BOUND)
        assert relay.leading
        assert counts.writes == 0  # the looks took no write lock
        assert counts.reads >= POLLS
        # the work still gets done at once: a new event is published and checkpointed
        [second] = await log.append("acct-1", Deposited("acct-1", 2))
        assert await relay.wait_published(second.position, BOUND)
        assert counts.writes > 0


async def test_an_idle_leader_sees_its_lease_taken_in_a_look(backend: Backend) -> None:
    log, db = backend
    [first] = await log.append("acct-1", Deposited("acct-1", 1))
    relay = Relay(
        log, db, InMemoryTransport(), lease_ttl=300.0, state_interval=0.0, poll_interval=0.01
    )
    lost = asyncio.Event()
    retry_requests = relay._retry_requests

    async def watched(epoch: int, **options: Any) -> list[tuple[int, str, int]]:
        try:
            return await retry_requests(epoch, **options)
        except LeaseLostError:
            assert options == {"beat": False}  # found by a read-only look
            lost.set()
            raise

    relay._retry_requests = watched  # type: ignore[method-assign]
    async with relay:
        assert await relay.wait_published(first.position, BOUND)
        async with db.transaction() as s:  # another relay takes the lease meanwhile
            row = await pschema.load(s, relay.name)
            assert row is not None
            taken = await pschema.take_lease(s, relay.name, "intruder", row)
        await asyncio.wait_for(lost.wait(), BOUND)
    async with db.read_only() as s:
        row = await pschema.load(s, relay.name)
    assert row is not None
    assert (row.lease_owner, row.lease_epoch) == ("intruder", taken)
