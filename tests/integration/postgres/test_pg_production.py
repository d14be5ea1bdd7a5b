"""PostgreSQL under an HTTP app: hot rows with the recommended pipeline, an exhausted
pool, a connection killed mid-query and a read database never set up."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from cqrskit import (
    Command,
    ConcurrencyError,
    Dependencies,
    Event,
    Mediator,
    Query,
    Registry,
)
from cqrskit.errors import ConfigurationError, UnavailableError
from cqrskit.eventlog import UnitOfWork
from cqrskit.fastapi import CqrsDep, install
from cqrskit.pipeline import recommended
from cqrskit.postgres import PostgresEventStore, PostgresReadDatabase
from cqrskit.projections import ReadSession
from cqrskit.serialization import EventTypes, JsonSerializer

event_types = EventTypes()


@event_types.register("stock.added")
@dataclass(frozen=True)
class StockAdded(Event):
    sku: str
    count: int


@event_types.register("stock.removed")
@dataclass(frozen=True)
class StockRemoved(Event):
    sku: str


@dataclass(frozen=True)
class AddStock(Command[None]):
    sku: str
    count: int


@dataclass(frozen=True)
class RemoveStock(Command[int]):
    sku: str


@dataclass(frozen=True)
class Slow(Query[int]):
    marker: str


@dataclass(frozen=True)
class FromMissing(Query[int]):
    pass


class Stock:
    def __init__(self, store: PostgresEventStore, serializer: JsonSerializer) -> None:
        self.store = store
        self.serializer = serializer

    async def load(self, sku: str) -> tuple[int, int]:
        count, version = 0, 0
        for stored in await self.store.read_stream(sku):
            event = self.serializer.decode_stored(stored)
            count += event.count if isinstance(event, StockAdded) else -1
            version = stored.version
        return count, version


registry = Registry()


@registry.handler
async def add_stock(cmd: AddStock, uow: UnitOfWork) -> None:
    uow.record(cmd.sku, StockAdded(cmd.sku, cmd.count), expected_version=0)


@registry.handler
async def remove_stock(cmd: RemoveStock, uow: UnitOfWork, stock: Stock) -> int:
    count, version = await stock.load(cmd.sku)
    assert count > 0, "sold out"
    uow.record(cmd.sku, StockRemoved(cmd.sku), expected_version=version)
    return count - 1


@registry.handler
async def slow(q: Slow, session: ReadSession) -> int:
    return int(await session.fetchval(f"SELECT 1 FROM pg_sleep(30) /* {q.marker} */") or 1)


@registry.handler
async def from_missing(q: FromMissing, session: ReadSession) -> int:
    return int(await session.fetchval("SELECT count(*) FROM balances") or 0)


@pytest.fixture
async def store(postgres_dsn: str, pg_schema: str) -> AsyncIterator[PostgresEventStore]:
    serializer = JsonSerializer(event_types)
    s = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, encoder=serializer.encode)
    async with s:
        yield s


def _mediator(
    store: PostgresEventStore, read_db: PostgresReadDatabase, *, attempts: int | None = None
) -> Mediator:
    deps = Dependencies()
    deps.singleton(Stock, Stock(store, JsonSerializer(event_types)))
    deps.scoped(ReadSession, read_db.session)
    return Mediator(
        registry,
        behaviors=(
            recommended(store, policies=None)
            if attempts is None
            else recommended(store, policies=None, attempts=attempts)
        ),
        resolver=[store.resolver(), deps],
    )


async def test_hot_row_commands_succeed_with_the_recommended_pipeline(
    store: PostgresEventStore, postgres_dsn: str, pg_schema: str
) -> None:
    """50 concurrent RemoveStock on one stream: with the defaults every one succeeds."""
    async with PostgresReadDatabase(postgres_dsn, schema=pg_schema) as read_db:
        mediator = _mediator(store, read_db)
        await mediator.send(AddStock("sku-1", 50))
        results = await asyncio.gather(
            *(mediator.send(RemoveStock("sku-1")) for _ in range(50)), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == []
        assert sorted(results) == list(range(50))  # each stock level seen exactly once
        count, version = await Stock(store, JsonSerializer(event_types)).load("sku-1")
        assert (count, version) == (0, 51)

        # without the retry, the same load conflicts (which is what users saw as 409s)
        bare = _mediator(store, read_db, attempts=1)
        await bare.send(AddStock("sku-2", 50))
        results = await asyncio.gather(
            *(bare.send(RemoveStock("sku-2")) for _ in range(50)), return_exceptions=True
        )
        conflicts = [r for r in results if isinstance(r, ConcurrencyError)]
        assert all(isinstance(r, int | ConcurrencyError) for r in results), results
        assert conflicts  # measured: about 40 of 50


def _app(mediator: Mediator) -> httpx.AsyncClient:
    app = FastAPI()
    install(app, mediator)

    @app.get("/slow/{marker}")
    async def get_slow(marker: str, cqrs: CqrsDep) -> int:
        return await cqrs.ask(Slow(marker))

    @app.get("/missing")
    async def get_missing(cqrs: CqrsDep) -> int:
        return await cqrs.ask(FromMissing())

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30)


async def _backend_running(dsn: str, marker: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(400):  # bounded poll for the other session's query to start
            pid = await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()",
                f"%/* {marker} */%",
            )
            if pid is not None:
                return int(pid)
            await asyncio.sleep(0.025)
    finally:
        await conn.close()
    raise AssertionError("the slow query never started")


async def test_an_exhausted_pool_is_503(
    store: PostgresEventStore, postgres_dsn: str, pg_schema: str
) -> None:
    read_db = PostgresReadDatabase(postgres_dsn, schema=pg_schema, max_size=1, acquire_timeout=0.3)
    marker = uuid.uuid4().hex
    async with read_db, _app(_mediator(store, read_db, attempts=1)) as c:
        holding = asyncio.ensure_future(c.get(f"/slow/{marker}"))
        pid = await _backend_running(postgres_dsn, marker)
        try:
            r = await c.get("/missing")
            assert (r.status_code, r.json()["type"]) == (503, "urn:cqrskit:problem:unavailable")
            assert r.headers["Retry-After"] == "2"
        finally:
            admin = await asyncpg.connect(postgres_dsn)
            await admin.execute("SELECT pg_cancel_backend($1)", pid)
            await admin.close()
            await asyncio.wait_for(holding, 30)


async def test_a_connection_killed_mid_query_is_503(
    store: PostgresEventStore, postgres_dsn: str, pg_schema: str
) -> None:
    marker = uuid.uuid4().hex
    read_db = PostgresReadDatabase(postgres_dsn, schema=pg_schema)
    async with read_db, _app(_mediator(store, read_db, attempts=1)) as c:
        request = asyncio.ensure_future(c.get(f"/slow/{marker}"))
        pid = await _backend_running(postgres_dsn, marker)
        admin = await asyncpg.connect(postgres_dsn)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        r = await asyncio.wait_for(request, 30)
    assert (r.status_code, r.json()["type"]) == (503, "urn:cqrskit:problem:unavailable")
    assert r.headers["Retry-After"] == "2"


async def test_a_read_database_never_set_up_is_named(
    store: PostgresEventStore, postgres_dsn: str, pg_schema: str
) -> None:
    read_db = PostgresReadDatabase(postgres_dsn, schema=pg_schema)
    async with read_db, _app(_mediator(store, read_db, attempts=1)) as c:
        r = await c.get("/missing")
    assert (r.status_code, r.json()["type"]) == (503, "urn:cqrskit:problem:read-model-missing")


def test_the_cli_hint_for_a_missing_event_log_names_cli_options(
    postgres_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cqrskit.cli import main

    schema = f"cqrskit_t_{uuid.uuid4().hex[:16]}"  # never created: no event log there
    read = f"sqlite:///{tmp_path / 'read.db'}"
    args = ["projections", "status", "--store", postgres_dsn, "--store-schema", schema]
    assert main([*args, "--read", read]) == 2
    err = capsys.readouterr().err
    assert f"{schema}.cqrskit_events does not exist" in err
    assert "--create-tables" in err
    assert "cqrskit ddl postgres" in err
    assert "create_tables=True" not in err


async def test_an_exhausted_write_pool_is_unavailable_then_recovers(
    postgres_dsn: str, pg_schema: str
) -> None:
    """Every write connection busy: a command waits at most acquire_timeout, then fails
    with UnavailableError (503 over HTTP); nothing of it is written, and the next command
    after a release runs."""
    serializer = JsonSerializer(event_types)
    store = await PostgresEventStore.open(
        postgres_dsn, schema=pg_schema, encoder=serializer.encode, max_size=1, acquire_timeout=0.3
    )
    async with store, PostgresReadDatabase(postgres_dsn, schema=pg_schema) as read_db:
        app = FastAPI()
        install(app, _mediator(store, read_db, attempts=1))

        @app.post("/stock/{sku}")
        async def add(sku: str, cqrs: CqrsDep) -> None:
            await cqrs.send(AddStock(sku, 5))

        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        holder = await store.begin()  # the only write connection
        try:
            with pytest.raises(UnavailableError, match="pool exhausted"):
                await asyncio.wait_for(store.begin(), 10)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
                r = await c.post("/stock/blocked")
            assert (r.status_code, r.json()["type"]) == (503, "urn:cqrskit:problem:unavailable")
            assert r.headers["Retry-After"] == "2"
        finally:
            await holder.rollback()
        assert await store.stream_version("blocked") == 0
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            r = await c.post("/stock/after")
        assert r.status_code < 300, r.text
        assert await store.stream_version("after") == 1


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
async def test_a_bad_acquire_timeout_is_refused(
    postgres_dsn: str, pg_schema: str, bad: float
) -> None:
    with pytest.raises(ConfigurationError, match="acquire_timeout"):
        await PostgresEventStore.open(postgres_dsn, schema=pg_schema, acquire_timeout=bad)
