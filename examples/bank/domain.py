"""The bank's language: commands, queries, events, the domain error and who is acting.

Amounts are integers in cents. Every message is a frozen dataclass; the type parameter of a
command or query is what its handler returns.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cqrskit import Command, Event, Query
from cqrskit.projections import reads
from cqrskit.serialization import EventTypes

# -- who is acting ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Customer:
    """The principal of a request: a customer, or a teller who may act on any account."""

    name: str
    teller: bool = False


current_customer: contextvars.ContextVar[Customer | None] = contextvars.ContextVar(
    "bank_customer", default=None
)


@contextmanager
def acting_as(customer: Customer | None) -> Iterator[None]:
    """Dispatch the messages of this block on behalf of ``customer``."""
    token = current_customer.set(customer)
    try:
        yield
    finally:
        current_customer.reset(token)


# -- events (stored in the event log under stable names) -----------------------------------

event_types = EventTypes()


@event_types.register("bank.account-opened")
@dataclass(frozen=True, slots=True)
class AccountOpened(Event):
    account_id: str
    owner: str


@event_types.register("bank.deposited")
@dataclass(frozen=True, slots=True)
class Deposited(Event):
    account_id: str
    amount: int


@event_types.register("bank.withdrawn")
@dataclass(frozen=True, slots=True)
class Withdrawn(Event):
    account_id: str
    amount: int


@event_types.register("bank.transfer-sent")
@dataclass(frozen=True, slots=True)
class TransferSent(Event):
    account_id: str
    to_account: str
    amount: int


@event_types.register("bank.transfer-received")
@dataclass(frozen=True, slots=True)
class TransferReceived(Event):
    account_id: str
    from_account: str
    amount: int


# -- commands ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenAccount(Command[str]):
    """Open an account for ``owner``; returns the new account id."""

    owner: str
    account_id: str | None = None


@dataclass(frozen=True, slots=True)
class Deposit(Command[int]):
    """Put money in; returns the new balance."""

    account_id: str
    amount: int


@dataclass(frozen=True, slots=True)
class Withdraw(Command[int]):
    """Take money out (never below zero); returns the new balance."""

    account_id: str
    amount: int


@dataclass(frozen=True, slots=True)
class Transfer(Command[None]):
    """Move money between two accounts, atomically."""

    from_account: str
    to_account: str
    amount: int


# -- queries ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Balance:
    """A row of the ``balances`` read model."""

    account_id: str
    owner: str
    balance: int


@dataclass(frozen=True, slots=True)
class Entry:
    """A row of the ``history`` read model."""

    position: int
    account_id: str
    kind: str
    amount: int
    balance_after: int
    counterparty: str | None


@dataclass(frozen=True, slots=True)
class GetBalance(Query[Balance]):
    """One account's balance.

    It reads ``balances``, which is updated inline (in the command's transaction), so it is
    never behind a token and declares no ``@reads``.
    """

    account_id: str


@dataclass(frozen=True, slots=True)
class ListAccounts(Query[list[Balance]]):
    """Every account, by owner."""


@reads("history", policy="wait", timeout=5.0)
@dataclass(frozen=True, slots=True)
class GetHistory(Query[list[Entry]]):
    """An account's latest entries, newest first.

    ``history`` is updated asynchronously: ``@reads`` names it so that, given a consistency
    token, the query waits (up to 5 s) until the projection has caught up.
    """

    account_id: str
    limit: int = 20


# -- the domain error -------------------------------------------------------------------


class InsufficientFunds(Exception):
    """A withdrawal or transfer would take an account below zero."""

    def __init__(self, account_id: str, balance: int, amount: int) -> None:
        self.account_id = account_id
        self.balance = balance
        self.amount = amount
        super().__init__(
            f"account {account_id} has {format_money(balance)}; "
            f"cannot take out {format_money(amount)}"
        )


def format_money(cents: int) -> str:
    """``123456`` → ``'1,234.56'``."""
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    return f"{sign}{whole:,}.{part:02d}"
