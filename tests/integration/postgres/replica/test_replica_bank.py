"""The example bank's HTTP API with its history read on streaming replicas (an option of the
example: ``--postgres DSN --replica DSN --serve``)."""

from __future__ import annotations

import httpx
import pytest
from examples.bank.api import create_app
from examples.bank.app import Bank, open_postgres_bank
from tests.support.pg_replicas import PgCluster

from cqrskit.fastapi import TOKEN_HEADER
from cqrskit.postgres.replica import PostgresReplicaRouter

pytestmark = pytest.mark.postgres


def as_(name: str) -> dict[str, str]:
    return {"X-Customer": name}


async def test_history_with_a_token_is_read_on_a_replica(healthy: PgCluster, schema: str) -> None:
    opened: list[Bank] = []

    async def open_bank() -> Bank:
        bank = await open_postgres_bank(
            healthy.primary.dsn, schema, batch_size=20, replicas=[s.dsn for s in healthy.standbys]
        )
        opened.append(bank)
        return bank

    app = create_app(open_bank)
    transport = httpx.ASGITransport(app=app)
    # the app's lifespan opens the bank (with its replica router) and closes it at the end
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bank") as c,
    ):
        [bank] = opened
        router = bank.read_db
        assert isinstance(router, PostgresReplicaRouter)
        assert "replica" in bank.description
        r = await c.post(
            "/accounts", json={"owner": "ada", "account_id": "ada-1"}, headers=as_("ada")
        )
        assert r.status_code == 201, r.text
        for i in range(1, 21):
            r = await c.post("/accounts/ada-1/deposits", json={"amount": 100}, headers=as_("ada"))
            assert r.json() == {"balance": 100 * i}
            token = r.headers[TOKEN_HEADER]
            r = await c.get(
                "/accounts/ada-1/history?limit=1",
                headers={**as_("ada"), TOKEN_HEADER: token},
            )
            assert r.status_code == 200, r.text
            [newest] = r.json()
            assert (newest["position"], newest["balance_after"]) == (int(token), 100 * i)
        served = {s.name: s.queries for s in router.status().replicas}
        assert sum(served.values()) >= 20  # every history read went to a replica
        assert router.status().primary_queries == 0
