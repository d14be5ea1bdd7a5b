"""The example bank on PostgreSQL under a real uvicorn server: when the server stops, the
lifespan's shutdown releases the ``history`` lease and closes every pool — checked while
the process still runs, so it is the shutdown that closed them, not the process exit."""

from __future__ import annotations

import asyncio
import socket
import uuid

import asyncpg
import httpx
import uvicorn
from examples.bank.api import create_app
from examples.bank.app import open_postgres_bank


async def _connections(dsn: str, name: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name
            )
        )
    finally:
        await conn.close()


async def _lease(dsn: str, schema: str) -> tuple[str | None, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            f'SELECT p.lease_owner, c.position FROM "{schema}".cqrskit_projections p '
            f'JOIN "{schema}".cqrskit_checkpoints c ON c.projection = p.name '
            "AND c.generation = p.active_generation WHERE p.name = 'history'"
        )
    finally:
        await conn.close()
    return (None, 0) if row is None else (row[0], int(row[1]))


async def test_the_bank_on_postgresql_releases_its_lease_and_closes_its_pools(
    postgres_dsn: str, pg_schema: str
) -> None:
    name = f"cqrskit-bank-{uuid.uuid4().hex[:12]}"
    # asyncpg passes unknown DSN parameters on as server settings: every connection of the
    # bank's pools carries this application_name
    dsn = f"{postgres_dsn}{'&' if '?' in postgres_dsn else '?'}application_name={name}"
    app = create_app(lambda: open_postgres_bank(dsn, pg_schema))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(400):  # bounded readiness poll on a condition: the server started
            if server.started or serving.done():
                break
            await asyncio.wait({serving}, timeout=0.05)
        assert server.started
        headers = {"X-Customer": "teller"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            r = await c.post(
                "/accounts", json={"owner": "ada", "account_id": "a1"}, headers=headers
            )
            assert r.status_code == 201, r.text
            r = await c.post("/accounts/a1/deposits", json={"amount": 5}, headers=headers)
            assert r.status_code == 200, r.text
        for _ in range(400):  # bounded poll: the in-process projector applies both events
            owner, position = await _lease(postgres_dsn, pg_schema)
            if owner and position >= 2:
                break
            await asyncio.sleep(0.05)
        assert owner
        assert position >= 2
        assert await _connections(postgres_dsn, name) > 0
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 30)
        sock.close()
    assert serving.exception() is None
    owner, _ = await _lease(postgres_dsn, pg_schema)
    assert owner is None  # released by the shutdown, not left for lease_ttl
    for _ in range(200):  # a closed connection's backend leaves pg_stat_activity promptly
        left = await _connections(postgres_dsn, name)
        if left == 0:
            break
        await asyncio.sleep(0.05)
    assert left == 0, f"{left} connection(s) of the bank still open after shutdown"
