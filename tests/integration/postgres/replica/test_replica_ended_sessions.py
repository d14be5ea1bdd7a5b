"""A replica ends the sessions idle in the router's pool (a fast shutdown,
``pg_terminate_backend``, an idle timeout): each gets the server's ``FATAL`` goodbye, which
can reach the client before the close does. asyncpg then refuses the next statement on such
a connection before sending it. The router counts that as the replica lost, like a
connection seen closed: a query with a token goes on to another server (here the primary),
a query without one fails with the typed ``ReplicaUnavailableError`` (an application's
retry sends it elsewhere), and the connection is dropped — never the driver's raw error.

The proxy in front of the replica holds the client's side of each ended session open, so
that the window a shutdown leaves open for a moment stays open for the test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import pytest
from tests.support.pg_replicas import PgCluster
from tests.support.proxy import FaultProxy
from tests.support.replica_app import Deposit, GetAccount, open_replica_app

from cqrskit.errors import ReplicaUnavailableError
from cqrskit.projections import read_after

pytestmark = pytest.mark.postgres

BOUND = 15.0


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < deadline, f"not within {BOUND}s: {what}"
        await asyncio.sleep(0.01)


async def end_sessions(dsn: str) -> int:
    """End every client session on the server at ``dsn`` but this one; how many."""
    admin = await asyncpg.connect(dsn, timeout=BOUND)
    try:
        return int(
            await admin.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM "
                "pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await admin.close()


@pytest.mark.parametrize("with_token", [True, False], ids=["token", "plain"])
async def test_a_replica_session_ended_while_idle_counts_as_the_replica_lost(
    healthy: PgCluster, schema: str, with_token: bool
) -> None:
    s1 = healthy.standbys[0]
    proxy = FaultProxy("127.0.0.1", s1.port)
    await proxy.start()
    app = await open_replica_app(
        healthy.primary.dsn,
        {"standby1": proxy.dsn(s1.dsn)},
        schema,
        probe_interval=30.0,  # no probe round while the test runs, unless a failure asks
        pool_size=1,
    )
    try:
        receipt = await app.mediator.send_tracked(Deposit("me", 1))
        assert receipt.token is not None
        async with read_after(receipt.token, timeout=BOUND) as state:
            assert await app.mediator.ask(GetAccount("me")) == (1, 1)
        assert state.source == "standby1"  # its connection now waits in the pool

        proxy.hold_server_close = True
        ended = await end_sessions(s1.dsn)
        assert ended >= 1
        await until(lambda: proxy.held_closes >= ended, "the replica ending its sessions")
        # the FATAL goodbyes are already in the client's sockets (the proxy wrote them
        # before it saw the close): a few passes of the event loop have asyncpg read them
        for _ in range(5):
            await asyncio.sleep(0)

        if with_token:
            async with read_after(receipt.token, timeout=BOUND) as state:
                value = await asyncio.wait_for(app.mediator.ask(GetAccount("me")), BOUND)
            assert value == (1, 1)
            assert state.source == "primary"
        else:
            with pytest.raises(ReplicaUnavailableError, match="standby1"):
                async with read_after(None):
                    await asyncio.wait_for(app.mediator.ask(GetAccount("me")), BOUND)
        status = next(r for r in app.router.status().replicas if r.name == "standby1")
        assert not status.in_rotation
    finally:
        proxy.release_close.set()
        await app.close()
        await proxy.close()
