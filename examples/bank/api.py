"""The bank's HTTP API (FastAPI): endpoints translate HTTP to messages and nothing more.

``cqrskit.fastapi.install`` gives every request its correlation id and scope, returns the
consistency token of each command in ``CQRS-Consistency-Token`` and makes a later request
that sends it back read its own writes from the async ``history``; errors become problem
details (overdraft → 409, someone else's account → 403, bad amount → 422 ...).

The bank opens in the application's lifespan (``install(app, services)``): the server
starts it — store, read databases, the async ``history`` projector — before the first
request and stops it on SIGTERM or Ctrl-C, the projector finishing its batch and releasing
its lease. Serve it with any ASGI server::

    BANK_DIR=data uvicorn --factory examples.bank.api:app_from_env
    BANK_DIR=data gunicorn -k cqrskit.gunicorn.UvicornWorker 'examples.bank.api:app_from_env()'

Who is calling comes from the ``X-Customer`` header — a stand-in for real authentication
(a session or a verified token) that keeps the example short; ``teller`` acts for the bank.
Needs the ``fastapi`` extra (and uvicorn to serve).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header
from pydantic import BaseModel

from cqrskit import ConfigurationError, Mediator
from cqrskit.fastapi import CqrsDep, Problem, install
from examples.bank.app import Bank, open_postgres_bank, open_sqlite_bank
from examples.bank.domain import (
    Customer,
    Deposit,
    GetBalance,
    GetHistory,
    InsufficientFunds,
    ListAccounts,
    OpenAccount,
    Transfer,
    Withdraw,
    current_customer,
)


class OpenBody(BaseModel):
    owner: str
    account_id: str | None = None


class AmountBody(BaseModel):
    amount: int


class TransferBody(BaseModel):
    from_account: str
    to_account: str
    amount: int


async def customer(x_customer: Annotated[str | None, Header()] = None) -> Customer | None:
    """Dependency: the caller, from ``X-Customer``; it becomes the principal of every
    message this request dispatches."""
    who = None
    if x_customer:
        who = Customer(x_customer, teller=x_customer == "teller")
    current_customer.set(who)
    return who


Caller = Annotated[Customer | None, Depends(customer)]


OpenBank = Callable[[], Bank | Awaitable[Bank]]


def create_app(open_bank: OpenBank) -> FastAPI:
    """The HTTP API; ``open_bank()`` makes the bank (not yet started) at server startup."""

    @asynccontextmanager
    async def services(app: FastAPI) -> AsyncIterator[Mediator]:
        made = open_bank()
        bank = await made if inspect.isawaitable(made) else made
        async with bank:  # starts the projector; on shutdown stops it and closes the stores
            app.state.bank = bank
            yield bank.mediator

    app = FastAPI(title="cqrskit example bank")
    install(
        app,
        services,
        problems={InsufficientFunds: Problem(409, "insufficient-funds", "Insufficient funds")},
    )

    @app.post("/accounts", status_code=201)
    async def open_account(body: OpenBody, cqrs: CqrsDep, who: Caller) -> dict[str, str]:
        return {"account_id": await cqrs.send(OpenAccount(body.owner, body.account_id))}

    @app.post("/accounts/{account_id}/deposits")
    async def deposit(
        account_id: str, body: AmountBody, cqrs: CqrsDep, who: Caller
    ) -> dict[str, int]:
        return {"balance": await cqrs.send(Deposit(account_id, body.amount))}

    @app.post("/accounts/{account_id}/withdrawals")
    async def withdraw(
        account_id: str, body: AmountBody, cqrs: CqrsDep, who: Caller
    ) -> dict[str, int]:
        return {"balance": await cqrs.send(Withdraw(account_id, body.amount))}

    @app.post("/transfers", status_code=204)
    async def transfer(body: TransferBody, cqrs: CqrsDep, who: Caller) -> None:
        await cqrs.send(Transfer(body.from_account, body.to_account, body.amount))

    @app.get("/accounts")
    async def list_accounts(cqrs: CqrsDep, who: Caller) -> list[dict[str, Any]]:
        return [asdict(a) for a in await cqrs.ask(ListAccounts())]

    @app.get("/accounts/{account_id}")
    async def get_balance(account_id: str, cqrs: CqrsDep, who: Caller) -> dict[str, Any]:
        return asdict(await cqrs.ask(GetBalance(account_id)))

    @app.get("/accounts/{account_id}/history")
    async def get_history(
        account_id: str, cqrs: CqrsDep, who: Caller, limit: int = 20
    ) -> list[dict[str, Any]]:
        limit = max(1, min(limit, 200))
        return [asdict(e) for e in await cqrs.ask(GetHistory(account_id, limit))]

    return app


def app_from_env() -> FastAPI:
    """The app for an ASGI server's ``--factory``: SQLite files in ``$BANK_DIR``, or
    PostgreSQL at ``$BANK_POSTGRES`` in schema ``$BANK_SCHEMA`` (default ``bank``)."""
    dsn = os.environ.get("BANK_POSTGRES")
    if dsn:
        schema = os.environ.get("BANK_SCHEMA", "bank")
        return create_app(lambda: open_postgres_bank(dsn, schema))
    directory = os.environ.get("BANK_DIR")
    if not directory:
        raise ConfigurationError(
            "app_from_env() needs BANK_DIR (a directory for the SQLite files) or "
            "BANK_POSTGRES (a DSN).",
            hint="for example: BANK_DIR=data uvicorn --factory examples.bank.api:app_from_env",
        )
    return create_app(lambda: open_sqlite_bank(Path(directory)))


async def serve(open_bank: OpenBank, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the API with uvicorn until SIGTERM or Ctrl-C (the lifespan opens the bank)."""
    import uvicorn

    config = uvicorn.Config(create_app(open_bank), host=host, port=port, lifespan="on")
    print(f"serving the bank on http://{host}:{port} (docs at /docs); Ctrl-C stops")
    await uvicorn.Server(config).serve()
