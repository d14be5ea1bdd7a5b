"""The example bank's HTTP API through a real ASGI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from examples.bank.api import create_app
from examples.bank.app import open_sqlite_bank

from cqrskit.fastapi import TOKEN_HEADER

PROBLEM = "application/problem+json"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(lambda: open_sqlite_bank(tmp_path / "bank", batch_size=20))
    transport = httpx.ASGITransport(app=app)
    # what an ASGI server does around serving: the lifespan opens and closes the bank
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bank") as c,
    ):
        yield c


def as_(name: str) -> dict[str, str]:
    return {"X-Customer": name}


async def test_a_customers_session_over_http(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/accounts", json={"owner": "ada", "account_id": "ada-1"}, headers=as_("ada")
    )
    assert r.status_code == 201, r.text
    assert r.json() == {"account_id": "ada-1"}
    r = await client.post("/accounts/ada-1/deposits", json={"amount": 5_000}, headers=as_("ada"))
    assert r.json() == {"balance": 5_000}
    r = await client.post("/accounts/ada-1/withdrawals", json={"amount": 1_200}, headers=as_("ada"))
    assert r.json() == {"balance": 3_800}
    token = r.headers[TOKEN_HEADER]
    r = await client.get("/accounts/ada-1", headers=as_("ada"))
    assert r.json() == {"account_id": "ada-1", "owner": "ada", "balance": 3_800}
    # the history is an async read model: the token makes this request see the withdrawal
    r = await client.get("/accounts/ada-1/history", headers={**as_("ada"), TOKEN_HEADER: token})
    assert r.status_code == 200, r.text
    assert [(e["kind"], e["balance_after"]) for e in r.json()] == [
        ("withdrawal", 3_800),
        ("deposit", 5_000),
        ("opened", 0),
    ]
    assert r.json()[0]["position"] == int(token)


async def test_domain_and_framework_errors_as_problems(client: httpx.AsyncClient) -> None:
    await client.post("/accounts", json={"owner": "ada", "account_id": "ada-1"}, headers=as_("ada"))
    await client.post(
        "/accounts", json={"owner": "grace", "account_id": "g-1"}, headers=as_("grace")
    )
    r = await client.post("/accounts/ada-1/withdrawals", json={"amount": 1}, headers=as_("ada"))
    assert (r.status_code, r.headers["content-type"]) == (409, PROBLEM)
    assert r.json()["type"] == "urn:cqrskit:problem:insufficient-funds"
    assert "cannot take out 0.01" in r.json()["detail"]
    r = await client.post("/accounts/ada-1/withdrawals", json={"amount": 1}, headers=as_("grace"))
    assert r.status_code == 403
    r = await client.post("/accounts/ada-1/withdrawals", json={"amount": 1})
    assert r.status_code == 403  # anonymous
    r = await client.post(
        "/transfers",
        json={"from_account": "g-1", "to_account": "g-1", "amount": 0},
        headers=as_("grace"),
    )
    assert r.status_code == 422
    assert {e["field"] for e in r.json()["errors"]} == {"to_account", "amount"}
    r = await client.get("/accounts/nobody", headers=as_("teller"))
    assert r.status_code == 404
    r = await client.post(
        "/accounts", json={"owner": "ada", "account_id": "ada-1"}, headers=as_("ada")
    )
    assert r.status_code == 409
    assert r.json()["type"] == "urn:cqrskit:problem:concurrency-conflict"
    r = await client.get("/accounts", headers=as_("teller"))
    assert {a["account_id"] for a in r.json()} == {"ada-1", "g-1"}
