"""Idempotent commands on PostgreSQL: the shared kit, and retries after a lost COMMIT reply
(through the fault proxy)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
from tests.support.proxy import FaultProxy, Mode

from cqrskit.dependencies import Dependencies
from cqrskit.errors import (
    CommitOutcomeUnknownError,
    ConcurrencyError,
    ConnectionLostError,
    PersistenceError,
)
from cqrskit.eventlog import EventStore, UnitOfWork
from cqrskit.idempotency import Idempotency, idempotency_key, postgres_idempotency_ddl
from cqrskit.mediator import Mediator, Receipt
from cqrskit.pipeline.retry import RetryBehavior
from cqrskit.postgres import PostgresEventStore, PostgresUnitOfWork
from cqrskit.testing.idempotency import (
    Balance,
    Deposit,
    IdempotencyConformance,
    Probe,
    Withdraw,
)

pytestmark = pytest.mark.postgres


class TestPostgresIdempotency(IdempotencyConformance):
    @pytest.fixture(autouse=True)
    def _db(self, postgres_dsn: str, pg_schema: str) -> None:
        self.dsn = postgres_dsn
        self.schema = pg_schema

    async def make_store(self) -> EventStore:
        store = await PostgresEventStore.open(self.dsn, schema=self.schema, max_size=4)
        async with store.pool.acquire() as conn:
            await conn.execute(f'CREATE TABLE "{self.schema}".state (key text NOT NULL)')
        return store

    async def close_store(self, store: EventStore) -> None:
        assert isinstance(store, PostgresEventStore)
        await store.close()

    async def write_state(self, uow: UnitOfWork, key: str) -> None:
        assert isinstance(uow, PostgresUnitOfWork)
        await uow.connection.execute(f'INSERT INTO "{self.schema}".state VALUES ($1)', key)

    async def state_keys(self, store: EventStore) -> list[str]:
        assert isinstance(store, PostgresEventStore)
        async with store.pool.acquire() as conn:
            rows = await conn.fetch(f'SELECT key FROM "{self.schema}".state')
        return sorted(r[0] for r in rows)

    async def wait_blocked(self, idem: Idempotency, store: EventStore) -> None:
        # the duplicate's claim (its INSERT) waits on the first attempt's uncommitted key
        sql = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1"
        )
        conn = await asyncpg.connect(self.dsn)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while await conn.fetchval(sql, f'%"{self.schema}"."cqrskit_idempotency_claim"%') < 1:
                if loop.time() > deadline:
                    raise TimeoutError("the duplicate never waited for the first attempt")
                await asyncio.sleep(0.005)
        finally:
            await conn.close()


# -- faults: the reply to COMMIT is lost -----------------------------------------------------


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", 5432)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def _setup(dsn: str, schema: str, via: FaultProxy) -> tuple[PostgresEventStore, Idempotency]:
    store = await PostgresEventStore.open(
        via.dsn(dsn), schema=schema, min_size=1, max_size=2, notify=False
    )
    async with store.pool.acquire() as conn:
        await conn.execute(f'CREATE TABLE "{schema}".state (key text NOT NULL)')
    return store, await Idempotency.open(store)


async def _counts(dsn: str, schema: str) -> tuple[int, int, int]:
    """(state rows, events, idempotency rows) read on a direct connection."""
    conn = await asyncpg.connect(dsn)
    try:
        return (
            await conn.fetchval(f'SELECT count(*) FROM "{schema}".state'),
            await conn.fetchval(f'SELECT count(*) FROM "{schema}".cqrskit_events'),
            await conn.fetchval(f'SELECT count(*) FROM "{schema}".cqrskit_idempotency'),
        )
    finally:
        await conn.close()


class _Kit(TestPostgresIdempotency):
    def __init__(self, schema: str) -> None:
        self.schema = schema


@pytest.mark.parametrize("tracked", [False, True], ids=["one-round-trip", "send_tracked"])
async def test_lost_commit_reply_then_retry_returns_stored_result(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy, tracked: bool
) -> None:
    store, idem = await _setup(postgres_dsn, pg_schema, proxy)
    try:
        probe = Probe()
        mediator = _Kit(pg_schema).app(store, idem, probe)
        key = f"order-{uuid.uuid4().hex}"
        proxy.mode = Mode.DROP_COMMIT_REPLY
        send = mediator.send_tracked if tracked else mediator.send
        with idempotency_key(key), pytest.raises(CommitOutcomeUnknownError) as info:
            await send(Deposit("a", 5))
        await proxy.wait_fault(1)
        assert info.value.hint is not None
        assert "same idempotency key" in info.value.hint
        # the COMMIT reached the server: the command committed, the client could not know
        assert await _counts(postgres_dsn, pg_schema) == (1, 1, 1)
        proxy.mode = Mode.FORWARD
        with idempotency_key(key):
            receipt = await mediator.send_tracked(Deposit("a", 5))
        assert receipt.result == Balance("a", 5)
        [event] = await store.read_stream("acc-a")
        assert receipt.token == event.position  # the first attempt's token
        assert probe.calls == 1
        assert len(probe.published) == 0  # the first attempt never got to publish
        assert await _counts(postgres_dsn, pg_schema) == (1, 1, 1)
    finally:
        await store.close()


async def test_commit_never_arrives_then_retry_runs_once(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy
) -> None:
    store, idem = await _setup(postgres_dsn, pg_schema, proxy)
    try:
        probe = Probe()
        mediator = _Kit(pg_schema).app(store, idem, probe)
        proxy.mode = Mode.BLACKHOLE_COMMIT
        with idempotency_key("k"), pytest.raises(CommitOutcomeUnknownError):
            await mediator.send(Deposit("a", 5))
        await proxy.wait_fault(1)
        assert await _counts(postgres_dsn, pg_schema) == (0, 0, 0)
        proxy.mode = Mode.FORWARD
        # the server may still be ending the dropped session; the retry's claim waits for it
        with idempotency_key("k"):
            assert await mediator.send(Deposit("a", 5)) == Balance("a", 5)
        with idempotency_key("k"):
            assert await mediator.send(Deposit("a", 5)) == Balance("a", 5)
        assert probe.calls == 2
        assert await _counts(postgres_dsn, pg_schema) == (1, 1, 1)
    finally:
        await store.close()


async def test_reset_before_commit_is_a_plain_persistence_error(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy
) -> None:
    store, idem = await _setup(postgres_dsn, pg_schema, proxy)
    try:
        probe = Probe(gate=asyncio.Event())
        mediator = _Kit(pg_schema).app(store, idem, probe)

        async def attempt() -> Balance:
            with idempotency_key("r"):
                return await mediator.send(Deposit("a", 5))

        task = asyncio.create_task(attempt())
        await asyncio.wait_for(probe.entered.wait(), 10)
        proxy.mode = Mode.RESET  # the connection dies while the handler runs
        probe.gate.set()  # type: ignore[union-attr]
        # nothing was committed and the client knows it: the documented PersistenceError
        # (retryable as such), not an unknown outcome, with the driver's error chained
        with pytest.raises(ConnectionLostError) as info:
            await asyncio.wait_for(task, 10)
        assert isinstance(info.value, PersistenceError)
        assert not isinstance(info.value, CommitOutcomeUnknownError)
        assert info.value.__cause__ is not None  # the driver's error, chained
        proxy.mode = Mode.FORWARD
        with idempotency_key("r"):
            assert await mediator.send(Deposit("a", 5)) == Balance("a", 5)
        assert await _counts(postgres_dsn, pg_schema) == (1, 1, 1)
    finally:
        await store.close()


async def test_ddl_and_purge(postgres_dsn: str, pg_schema: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(postgres_idempotency_ddl(pg_schema, "keys"))
    finally:
        await conn.close()
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema)
    try:
        async with store.pool.acquire() as c:
            await c.execute(f'CREATE TABLE "{pg_schema}".state (key text NOT NULL)')
        idem = await Idempotency.open(store, table="keys", create_tables=False)
        mediator = _Kit(pg_schema).app(store, idem, Probe())
        with idempotency_key("p"):
            await mediator.send(Deposit("a", 1))
        record = await idem.lookup("p")
        assert record is not None
        assert record.result == '{"account":"a","total":1}'
        assert await idem.purge(timedelta(hours=1)) == 0
        assert await idem.purge(timedelta(seconds=-1)) == 1
        assert await idem.lookup("p") is None
    finally:
        await store.close()


def _with_retry(kit: _Kit, store: PostgresEventStore, idem: Idempotency, probe: Probe) -> Mediator:
    plain = kit.app(store, idem, probe)
    return Mediator(
        plain.registry,
        behaviors=[RetryBehavior(attempts=3, base_delay=0.0), idem.transaction()],
        resolver=[store.resolver(), Dependencies()],
    )


async def test_retry_behavior_retries_a_lost_commit_reply_only_with_a_key(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy
) -> None:
    store, idem = await _setup(postgres_dsn, pg_schema, proxy)
    try:
        probe = Probe()
        mediator = _with_retry(_Kit(pg_schema), store, idem, probe)
        proxy.faults_left = 1
        proxy.mode = Mode.DROP_COMMIT_REPLY
        with idempotency_key("auto"):
            assert await mediator.send(Deposit("a", 5)) == Balance("a", 5)
        assert proxy.commit_faults == 1
        assert probe.calls == 1  # the retry found the committed key
        assert await _counts(postgres_dsn, pg_schema) == (1, 1, 1)

        # without a key the unknown outcome reaches the caller: no silent second effect
        proxy.faults_left = 1
        proxy.mode = Mode.DROP_COMMIT_REPLY
        with pytest.raises(CommitOutcomeUnknownError) as info:
            await mediator.send(Deposit("b", 5))
        assert info.value.retry_safe is False
        assert proxy.commit_faults == 2
        assert probe.calls == 2
        assert await _counts(postgres_dsn, pg_schema) == (2, 2, 1)
    finally:
        await store.close()


async def _waiting_on_claims(dsn: str, schema: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE $1",
                f'%"{schema}"."cqrskit_idempotency_claim"%',
            )
        )
    finally:
        await conn.close()


async def test_a_duplicate_in_flight_waits_a_bounded_time_then_gets_in_progress(
    postgres_dsn: str, pg_schema: str
) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, max_size=4)
    try:
        async with store.pool.acquire() as c:
            await c.execute(f'CREATE TABLE "{pg_schema}".state (key text NOT NULL)')
        idem = await Idempotency.open(store, wait_timeout=0.3)
        probe = Probe(gate=asyncio.Event())
        mediator = _Kit(pg_schema).app(store, idem, probe)

        async def attempt() -> Receipt[Balance]:
            with idempotency_key("slow"):
                return await mediator.send_tracked(Deposit("a", 3))

        first = asyncio.create_task(attempt())
        await asyncio.wait_for(probe.entered.wait(), 10)
        # the first attempt holds the key (its handler waits on the gate): the retry waits
        # on the key's row lock for wait_timeout, then gets a typed "in progress" error
        with pytest.raises(ConcurrencyError, match="still running") as info:
            await asyncio.wait_for(attempt(), 10)
        assert info.value.hint is not None
        assert "same key" in info.value.hint
        assert await _waiting_on_claims(postgres_dsn, pg_schema) == 0  # nothing left pinned
        # the duplicate's connection went back: other commands run meanwhile
        with idempotency_key("other"):
            assert await mediator.send(Withdraw("b", 1)) == -1
        probe.gate.set()  # type: ignore[union-attr]
        done = await asyncio.wait_for(first, 10)
        again = await attempt()
        assert again.result == done.result == Balance("a", 3)
        assert again.token == done.token
        assert probe.calls == 2  # the deposit once, the withdrawal once
        assert await _counts(postgres_dsn, pg_schema) == (2, 1, 2)
    finally:
        await store.close()
