"""The replica router on a real primary with two streaming standbys: queries on replicas,
read-your-writes by token, the same query code as in modes 1–3."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import asyncpg
import pytest
from tests.support.bank import Deposited
from tests.support.pg_replicas import PgCluster
from tests.support.replica_app import Deposit, GetAccount, ReplicaApp, open_replica_app

from cqrskit.errors import ConfigurationError, StaleReadError, TokenFromFutureError
from cqrskit.postgres import PostgresEventStore, PostgresReadDatabase
from cqrskit.postgres.replica import PostgresReplicaRouter
from cqrskit.projections import ask_consistent, read_after

pytestmark = pytest.mark.postgres


def replicas(cluster: PgCluster) -> list[str]:
    return [s.dsn for s in cluster.standbys]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def test_read_your_writes_1000_times_on_replicas_under_load(
    healthy: PgCluster, schema: str
) -> None:
    app = await open_replica_app(healthy.primary.dsn, replicas(healthy), schema)
    stop = asyncio.Event()
    background = Counter[str]()

    async def writer(k: int) -> None:
        # other accounts, as fast as the primary takes them: concurrent transactions
        # (lower and higher xids committing in any order) around every checked command
        n = 0
        while not stop.is_set():
            await app.mediator.send(Deposit(f"bg{k}-{n % 32}", 1))
            background["commands"] += 1
            n += 1
            await asyncio.sleep(0)

    writers = [asyncio.ensure_future(writer(k)) for k in range(2)]
    stale = 0
    sources = Counter[str]()
    waits: list[float] = []
    try:
        for i in range(1, 1001):
            receipt = await app.mediator.send_tracked(Deposit("me", 1))
            assert receipt.token is not None
            started = time.perf_counter()
            async with read_after(receipt.token) as state:
                value = await app.mediator.ask(GetAccount("me"))
            waits.append(time.perf_counter() - started)
            sources[state.source or "?"] += 1
            if value != (i, i) or state.stale:
                stale += 1
    finally:
        stop.set()
        await asyncio.gather(*writers)
        await app.close()
    print(
        f"read-your-writes on replicas: {dict(sources)}, background commands "
        f"{background['commands']}, query p50 {pct(waits, 0.5) * 1e3:.2f} ms, "
        f"p99 {pct(waits, 0.99) * 1e3:.2f} ms"
    )
    assert stale == 0
    assert set(sources) == {"replica1", "replica2"}  # never the primary, both replicas used
    assert min(sources.values()) > 100
    assert background["commands"] > 200


async def test_read_your_writes_from_an_async_projection_on_replicas(
    healthy: PgCluster, schema: str
) -> None:
    app = await open_replica_app(healthy.primary.dsn, replicas(healthy), schema, mode="async")
    sources = Counter[str]()
    try:
        for i in range(1, 41):
            receipt = await app.mediator.send_tracked(Deposit("me", 2))
            assert receipt.token is not None
            async with read_after(receipt.token) as state:
                value = await app.mediator.ask(GetAccount("me"))
            assert value == (2 * i, i)
            assert state.positions["balances"] >= receipt.token
            sources[state.source or "?"] += 1
    finally:
        await app.close()
    assert set(sources) <= {"replica1", "replica2"}


async def test_queries_without_a_token_spread_over_the_replicas(
    healthy: PgCluster, schema: str
) -> None:
    app = await open_replica_app(healthy.primary.dsn, replicas(healthy), schema)
    try:
        await app.mediator.send(Deposit("a", 5))
        for _ in range(40):
            await app.mediator.ask(GetAccount("a"))  # may be stale: no token
        status = app.router.status()
        served = {r.name: r.queries for r in status.replicas}
        assert sum(served.values()) == 40
        assert min(served.values()) >= 10
        assert status.primary_queries == 0
        json.dumps(status.as_dict())  # JSON-ready for a status endpoint
        assert all(r.in_rotation and r.reachable for r in status.replicas)
        # sessions are read-only, as on the primary
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            async with app.router.read_only() as s:
                await s.execute("INSERT INTO accounts VALUES ('x', 1, 1, 1)")
        # a read-write transaction goes to the primary
        async with app.router.transaction() as s:
            assert await s.fetchval("SELECT pg_is_in_recovery()") is False
    finally:
        await app.close()


async def test_sessions_are_read_only_on_the_primary_too(healthy: PgCluster, schema: str) -> None:
    """With no replica the router's sessions run on the primary, still read-only; a
    savepoint opens a read-only transaction block that ends with the session."""
    app = await open_replica_app(healthy.primary.dsn, [], schema)
    try:
        await app.mediator.send(Deposit("a", 3))
        async with read_after(None) as state:
            assert await app.mediator.ask(GetAccount("a")) == (3, 1)
        assert state.source == "primary"
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            async with app.router.read_only() as s:
                await s.execute("UPDATE accounts SET balance = 0")
        async with app.router.read_only() as s:
            assert s.connection.is_in_transaction() is False  # one statement, one transaction
            in_block = []

            async def write_in_a_savepoint() -> None:
                async with s.savepoint():
                    in_block.append(s.connection.is_in_transaction())
                    await s.execute("UPDATE accounts SET balance = 0")

            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await write_in_a_savepoint()
            assert in_block == [True]
            assert await s.fetchval("SELECT balance FROM accounts WHERE id = 'a'") == 3
        assert app.router.primary_fallbacks >= 3
    finally:
        await app.close()


async def test_the_sequence_gap_trap_on_a_replica(healthy: PgCluster, schema: str) -> None:
    """A transaction with a lower xid commits after one with a higher xid. On a replica that
    replayed only the higher one, the inline checkpoint (GREATEST of both) is already past
    the lower one's token while its rows are not there: a checkpoint check would read stale
    data. The router checks the event row itself, so it refuses, waits or goes to the
    primary, by policy."""
    primary, replica = healthy.primary, healthy.standbys[0]
    app = await open_replica_app(
        primary.dsn, {"r1": replica.dsn}, schema, probe_interval=60.0
    )  # no probe during the test: the paused replica stays in rotation
    try:
        await app.mediator.send(Deposit("low", 1))
        low = await app.store.begin()
        await low.connection.execute("SELECT pg_current_xact_id()")  # takes the lower xid
        high = await app.mediator.send_tracked(Deposit("high", 1))
        assert high.token is not None
        got = await ask_consistent(app.mediator, GetAccount("high"), high.token)
        assert got.value == (1, 1)
        healthy.pause_replay(replica)
        low.record("acct-low", Deposited("low", 1))
        token = await low.commit()
        assert token is not None
        assert token < high.token
        # what a checkpoint check would see on the replica: past the token, rows missing
        conn = await asyncpg.connect(replica.dsn)
        try:
            checkpoint = await conn.fetchval(
                f'SELECT position FROM "{schema}".cqrskit_checkpoints '
                "WHERE projection = 'balances'"
            )
            visible = await conn.fetchval(
                f'SELECT applied FROM "{schema}".accounts WHERE id = $1', "low"
            )
        finally:
            await conn.close()
        assert checkpoint >= token  # the trap is set: the checkpoint says "there" ...
        assert visible == 1  # ... while the transaction's rows are not
        started = time.monotonic()
        with pytest.raises(StaleReadError):
            await ask_consistent(app.mediator, GetAccount("low"), token, policy="fail")
        with pytest.raises(StaleReadError):
            await ask_consistent(app.mediator, GetAccount("low"), token, timeout=0.3)
        assert time.monotonic() - started < 5.0
        anyway = await ask_consistent(
            app.mediator, GetAccount("low"), token, policy="stale", timeout=0.0
        )
        assert (anyway.value, anyway.stale) == ((1, 1), True)
        async with read_after(token, policy="primary") as state:
            value = await app.mediator.ask(GetAccount("low"))
        assert (value, state.source, state.stale) == ((2, 2), "primary", False)
        healthy.resume_replay(replica)
        async with read_after(token) as state:
            value = await app.mediator.ask(GetAccount("low"))
        assert (value, state.source) == ((2, 2), "r1")
    finally:
        await app.close()


async def test_a_waiting_query_holds_no_lock_that_replay_needs(
    healthy: PgCluster, schema: str
) -> None:
    """Replay of an ACCESS EXCLUSIVE lock waits for standby queries holding a conflicting
    lock (up to max_standby_streaming_delay, 30 s). A query waiting for its token inside a
    transaction block would hold one from its first check and stall the very replay it
    waits for; the router checks outside any block, so replay goes on."""
    replica = healthy.standbys[0]
    app = await open_replica_app(
        healthy.primary.dsn, {"r1": replica.dsn}, schema, probe_interval=60.0
    )
    conn = await asyncpg.connect(replica.dsn)
    try:
        await app.mediator.send(Deposit("a", 1))
        await ask_consistent(
            app.mediator, GetAccount("a"), (await app.mediator.send_tracked(Deposit("a", 1))).token
        )
        healthy.pause_replay(replica)
        primary = await asyncpg.connect(healthy.primary.dsn)
        try:
            async with primary.transaction():
                await primary.execute(
                    f'LOCK TABLE "{schema}".cqrskit_checkpoints IN ACCESS EXCLUSIVE MODE'
                )
        finally:
            await primary.close()
        receipt = await app.mediator.send_tracked(Deposit("a", 1))
        assert receipt.token is not None
        waiting = asyncio.ensure_future(
            ask_consistent(app.mediator, GetAccount("a"), receipt.token, timeout=10.0)
        )
        deadline = time.monotonic() + 10
        while not await conn.fetchval(  # the query has checked the replica at least once
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%cqrskit_checkpoints%' "
            "AND pid <> pg_backend_pid()"
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        started = time.monotonic()
        healthy.resume_replay(replica)
        got = await asyncio.wait_for(waiting, 15)
        assert got.value == (3, 3)
        assert time.monotonic() - started < 5.0  # not the 30 s of a replay conflict
    finally:
        await conn.close()
        await app.close()


async def test_a_replica_that_has_not_replayed_the_tables_yet(
    healthy: PgCluster, schema: str
) -> None:
    """The checks fail there with an SQL error (no such table): not reached, the connection
    kept (a wait of many rounds must not use up the pool), the error named at the end."""
    replica = healthy.standbys[0]
    healthy.disconnect(replica)  # no WAL arrives; replay is not paused, so it stays in rotation
    app = await open_replica_app(
        healthy.primary.dsn,
        {"r1": replica.dsn},
        schema,
        probe_interval=60.0,
        max_lag_seconds=60.0,
        pool_size=2,
    )
    try:
        receipt = await app.mediator.send_tracked(Deposit("a", 1))
        assert receipt.token is not None
        with pytest.raises(StaleReadError, match="UndefinedTable"):
            await ask_consistent(app.mediator, GetAccount("a"), receipt.token, timeout=1.0)
        assert app.router.status().replicas[0].in_rotation
        healthy.reconnect(replica)
        got = await ask_consistent(app.mediator, GetAccount("a"), receipt.token)
        assert got.value == (1, 1)
    finally:
        await app.close()


async def test_a_token_from_the_future_fails_at_once(healthy: PgCluster, schema: str) -> None:
    app = await open_replica_app(healthy.primary.dsn, replicas(healthy), schema)
    try:
        receipt = await app.mediator.send_tracked(Deposit("a", 1))
        assert receipt.token is not None
        started = time.monotonic()
        with pytest.raises(TokenFromFutureError):
            await ask_consistent(app.mediator, GetAccount("a"), receipt.token + (1 << 40))
        assert time.monotonic() - started < 2.0
    finally:
        await app.close()


async def test_inline_projections_on_replicas_need_the_event_log(
    healthy: PgCluster, schema: str
) -> None:
    app = await open_replica_app(healthy.primary.dsn, replicas(healthy), schema, store_check=False)
    try:
        receipt = await app.mediator.send_tracked(Deposit("a", 1))
        assert receipt.token is not None
        with pytest.raises(ConfigurationError, match="store="):
            await ask_consistent(app.mediator, GetAccount("a"), receipt.token)
    finally:
        await app.close()


async def test_an_event_log_outside_the_primary_is_refused(
    healthy: PgCluster, schema: str, postgres_dsn: str
) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=schema)  # another server
    router = PostgresReplicaRouter(
        PostgresReadDatabase(healthy.primary.dsn, schema=schema),
        replicas(healthy),
        store=store,
    )
    try:
        with pytest.raises(ConfigurationError, match="not in the primary read database"):
            await router.start()
    finally:
        await router.close()
        await store.close()
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def test_status_names_no_dsn(healthy: PgCluster, schema: str) -> None:
    app: ReplicaApp = await open_replica_app(
        healthy.primary.dsn, {"east": healthy.standbys[0].dsn}, schema
    )
    try:
        await app.mediator.ask(GetAccount("nobody"))
        text = json.dumps(app.router.status().as_dict()) + repr(app.router)
        assert "east" in text
        assert str(healthy.standbys[0].port) not in text
        assert str(healthy.primary.port) not in text
    finally:
        await app.close()


async def test_a_separate_read_database_with_replicas(healthy: PgCluster, schema: str) -> None:
    """Mode 2 + 4: the projector writes a read database of its own (replicated with the
    cluster); the router, built without store=, proves tokens by the checkpoints there."""
    from tests.support.bank import balances, serializer
    from tests.support.replica_app import registry

    from cqrskit import Dependencies, Mediator
    from cqrskit.pipeline import for_queries
    from cqrskit.projections import ConsistencyGate, Projector, ReadSession

    name = f"reads_{schema[-12:]}"
    admin = await asyncpg.connect(healthy.primary.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    read_dsn = healthy.primary.dsn.rsplit("/", 1)[0] + f"/{name}"
    replica_dsns = [s.dsn.rsplit("/", 1)[0] + f"/{name}" for s in healthy.standbys]
    for dsn in replica_dsns:  # the standbys replay CREATE DATABASE (bounded wait)
        deadline = time.monotonic() + 10
        while True:
            try:
                await (await asyncpg.connect(dsn)).close()
                break
            except asyncpg.InvalidCatalogNameError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
    store = await PostgresEventStore.open(
        healthy.primary.dsn, schema=schema, encoder=serializer.encode
    )
    router = PostgresReplicaRouter(PostgresReadDatabase(read_dsn, schema="views"), replica_dsns)
    projector = Projector(store, router, [balances], serializer, batch_size=100)
    try:
        await projector.start()
        deps = Dependencies()
        deps.scoped(ReadSession, router.session)
        gate = ConsistencyGate(store, router, signal=projector.signal)
        mediator = Mediator(
            registry,
            behaviors=[store.transaction(), for_queries(gate.behavior)],
            resolver=[store.resolver(), deps],
        )
        sources = Counter[str]()
        for i in range(1, 16):
            receipt = await mediator.send_tracked(Deposit("me", 1))
            assert receipt.token is not None
            async with read_after(receipt.token) as state:
                assert await mediator.ask(GetAccount("me")) == (i, i)
            sources[state.source or "?"] += 1
        assert set(sources) <= {"replica1", "replica2"}
    finally:
        await projector.stop()
        await router.close()
        await store.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
