"""Result types ride on the message type: checked by mypy --strict and pyright (strict).

Nothing here runs; ``tests/unit/test_typing.py`` runs both checkers over this folder (and
checks pydantic and msgspec messages in a generated file, so that this folder needs nothing
but the standard library and cqrskit to resolve its imports).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import assert_type

from cqrskit import Command, Event, Mediator, Query, Receipt, Registry
from cqrskit.sync import SyncMediator


@dataclass(frozen=True, slots=True)
class AccountView:
    account_id: str
    owner: str


@dataclass(frozen=True, slots=True)
class OpenAccount(Command[str]):
    owner: str


@dataclass(frozen=True, slots=True)
class GetAccount(Query["AccountView | None"]):
    account_id: str


@dataclass(frozen=True, slots=True)
class ListAccounts(Query[AsyncIterator[AccountView]]):
    limit: int


@dataclass(frozen=True, slots=True)
class ListAccountsSync(Query[Iterator[AccountView]]):
    limit: int


@dataclass(frozen=True, slots=True)
class AccountOpened(Event):
    account_id: str


registry = Registry()


@registry.handler
async def open_account(cmd: OpenAccount) -> str:
    return cmd.owner


async def check_async(mediator: Mediator) -> None:
    assert_type(await mediator.send(OpenAccount("ada")), str)
    assert_type(await mediator.ask(GetAccount("a1")), AccountView | None)
    async for row in mediator.stream(ListAccounts(10)):
        assert_type(row, AccountView)
    assert_type(await mediator.send_tracked(OpenAccount("ada")), Receipt[str])
    assert_type(await mediator.publish(AccountOpened("a1")), None)


def check_sync(mediator: SyncMediator) -> None:
    assert_type(mediator.send(OpenAccount("ada")), str)
    assert_type(mediator.ask(GetAccount("a1")), AccountView | None)
    for row in mediator.stream(ListAccountsSync(10)):
        assert_type(row, AccountView)
    assert_type(mediator.send_tracked(OpenAccount("ada")), Receipt[str])
    assert_type(mediator.publish(AccountOpened("a1")), None)
