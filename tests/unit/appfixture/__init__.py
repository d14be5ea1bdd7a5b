"""A tiny application used by the describe/CLI tests."""

from __future__ import annotations

from dataclasses import dataclass

from cqrskit import Command, Event, Query, Registry

registry = Registry()


@dataclass(frozen=True, slots=True)
class OpenAccount(Command[str]):
    owner: str


@dataclass(frozen=True, slots=True)
class AccountOpened(Event):
    account_id: str


@dataclass(frozen=True, slots=True)
class GetAccount(Query[str]):
    account_id: str


@registry.handler
async def open_account(cmd: OpenAccount) -> str:
    return cmd.owner


@registry.handler
async def welcome(event: AccountOpened) -> None:
    return None


@registry.handler
async def get_account(query: GetAccount) -> str:
    return query.account_id


not_a_registry = 42
