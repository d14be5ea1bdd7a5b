"""A read-database transaction whose statement was interrupted (a deadline: the projector's
``3/4 lease_ttl``, a query's timeout), inside a savepoint or not, or that failed otherwise,
ends within ``acquire_timeout`` even when the server stopped answering, with the caller's
own error; the next transaction works.

asyncpg makes the next statement on such a connection (the ROLLBACK) wait until the server
confirmed the cancellation — for ever when no answer comes. Here a proxy swallows every byte
after the transaction began.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from tests.support.proxy import FaultProxy, Mode

from cqrskit.errors import ConnectionLostError
from cqrskit.postgres import PostgresReadDatabase
from cqrskit.projections.apply import infrastructure_fault

pytestmark = pytest.mark.postgres

BOUND = 10.0


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", 5432)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


@pytest.mark.parametrize(
    "kind",
    ["interrupted", "interrupted in a savepoint", "timed out inside a savepoint", "failed"],
)
async def test_a_transaction_on_a_silent_server_ends_within_the_bound(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy, kind: str
) -> None:
    db = PostgresReadDatabase(proxy.dsn(postgres_dsn), schema=pg_schema, acquire_timeout=1.0)
    try:
        async with db.read_only() as s:
            assert await s.fetchval("SELECT 1") == 1

        async def silenced() -> None:
            async with db.transaction() as s:
                await s.fetchval("SELECT 1")
                if kind == "interrupted":
                    proxy.mode = Mode.BLACKHOLE
                    await asyncio.wait_for(s.fetchval("SELECT 2"), 0.3)
                if kind == "interrupted in a savepoint":
                    async with asyncio.timeout(0.3), s.savepoint():
                        proxy.mode = Mode.BLACKHOLE
                        await s.fetchval("SELECT 2")
                if kind == "timed out inside a savepoint":
                    # the block sees the TimeoutError (not a cancellation): its savepoint
                    # is rolled back, which first waits for the cancel's confirmation
                    async with s.savepoint():
                        proxy.mode = Mode.BLACKHOLE
                        await asyncio.wait_for(s.fetchval("SELECT 2"), 0.3)
                proxy.mode = Mode.BLACKHOLE
                raise ValueError("the caller's own error")

        task = asyncio.ensure_future(silenced())
        done, _ = await asyncio.wait({task}, timeout=BOUND)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert done, "the failed transaction did not end within the bound"
        error = task.exception()
        if kind.startswith("interrupted"):
            assert isinstance(error, TimeoutError)
        elif kind == "timed out inside a savepoint":
            # typed, retried like any lost connection; never the TimeoutError a handler may
            # catch and go on from in a transaction that is gone
            assert isinstance(error, ConnectionLostError), repr(error)
            assert "savepoint back within 1 s" in str(error)
            assert infrastructure_fault(error)
        else:
            assert isinstance(error, ValueError)

        proxy.mode = Mode.FORWARD
        async with db.read_only() as s:
            assert await asyncio.wait_for(s.fetchval("SELECT 3"), BOUND) == 3
    finally:
        await asyncio.wait_for(db.close(), BOUND)
