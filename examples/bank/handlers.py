"""Command and query handlers, validation rules and authorization policies.

Commands are checked against the account's *own events* (event sourcing): the handler
folds the account's stream into its current balance and version, decides, and records new
events with ``expected_version`` — so two concurrent withdrawals can never both spend the
same money (the second fails with ``ConcurrencyError``). Queries read the projections.
Handlers never touch a database driver, so the same code runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

from cqrskit import FieldError, NotFoundError, Registry
from cqrskit.eventlog import EventStore, UnitOfWork
from cqrskit.projections import ReadDatabase
from cqrskit.serialization import Serializer
from examples.bank.domain import (
    AccountOpened,
    Balance,
    Customer,
    Deposit,
    Deposited,
    Entry,
    GetBalance,
    GetHistory,
    InsufficientFunds,
    ListAccounts,
    OpenAccount,
    Transfer,
    TransferReceived,
    TransferSent,
    Withdraw,
    Withdrawn,
)

registry = Registry()

MAX_AMOUNT = 10_000_000  # cents per operation


def stream_of(account_id: str) -> str:
    """The event stream of an account."""
    return f"account-{account_id}"


# -- the write model ----------------------------------------------------------------------


@dataclass(slots=True)
class Account:
    """An account as its events say it is: ``version`` is the number of its events."""

    account_id: str
    owner: str = ""
    balance: int = 0
    version: int = 0


class Accounts:
    """Loads accounts from the event log.

    It remembers each account as of the last event it read and reads only newer events
    next time. That is safe because it learns only from committed events: a command that
    rolls back never reached the log, and another process's commits are read as usual.
    """

    MAX_CACHED = 10_000

    def __init__(self, store: EventStore, serializer: Serializer) -> None:
        self.store = store
        self.serializer = serializer
        self._known: dict[str, Account] = {}

    async def load(self, account_id: str) -> Account:
        """The account ``account_id``; raises ``NotFoundError`` if it was never opened."""
        known = self._known.get(account_id)
        account = replace(known) if known is not None else Account(account_id)
        stream = stream_of(account_id)
        for stored in await self.store.read_stream(stream, after_version=account.version):
            event = self.serializer.decode_stored(stored)
            account.version = stored.version
            if isinstance(event, AccountOpened):
                account.owner = event.owner
            elif isinstance(event, Deposited | TransferReceived):
                account.balance += event.amount
            elif isinstance(event, Withdrawn | TransferSent):
                account.balance -= event.amount
        if account.version == 0:
            raise NotFoundError(f"no account {account_id!r}", message_type=type(self))
        if len(self._known) >= self.MAX_CACHED:
            self._known.clear()
        self._known[account_id] = replace(account)
        return account


@registry.handler
async def open_account(cmd: OpenAccount, uow: UnitOfWork) -> str:
    account_id = cmd.account_id or uuid.uuid4().hex[:12]
    uow.record(stream_of(account_id), AccountOpened(account_id, cmd.owner), expected_version=0)
    return account_id


@registry.handler
async def deposit(cmd: Deposit, uow: UnitOfWork, accounts: Accounts) -> int:
    account = await accounts.load(cmd.account_id)
    uow.record(
        stream_of(account.account_id),
        Deposited(account.account_id, cmd.amount),
        expected_version=account.version,
    )
    return account.balance + cmd.amount


@registry.handler
async def withdraw(cmd: Withdraw, uow: UnitOfWork, accounts: Accounts) -> int:
    account = await accounts.load(cmd.account_id)
    if account.balance < cmd.amount:
        raise InsufficientFunds(account.account_id, account.balance, cmd.amount)
    uow.record(
        stream_of(account.account_id),
        Withdrawn(account.account_id, cmd.amount),
        expected_version=account.version,
    )
    return account.balance - cmd.amount


@registry.handler
async def transfer(cmd: Transfer, uow: UnitOfWork, accounts: Accounts) -> None:
    source = await accounts.load(cmd.from_account)
    target = await accounts.load(cmd.to_account)
    if source.balance < cmd.amount:
        raise InsufficientFunds(source.account_id, source.balance, cmd.amount)
    # both streams commit in one transaction, or neither does
    uow.record(
        stream_of(source.account_id),
        TransferSent(source.account_id, target.account_id, cmd.amount),
        expected_version=source.version,
    )
    uow.record(
        stream_of(target.account_id),
        TransferReceived(target.account_id, source.account_id, cmd.amount),
        expected_version=target.version,
    )


# -- the read side ------------------------------------------------------------------------


class BalanceReader:
    """Reads the ``balances`` read model (kept inline, in the write database)."""

    def __init__(self, db: ReadDatabase) -> None:
        self.db = db

    async def get(self, account_id: str) -> Balance | None:
        """One account, or ``None``."""
        async with self.db.read_only() as s:
            row = await s.fetchone(
                "SELECT id, owner, balance FROM accounts WHERE id = ?", account_id
            )
        return None if row is None else Balance(str(row[0]), str(row[1]), int(row[2]))

    async def all(self) -> list[Balance]:
        """Every account, by owner then id."""
        async with self.db.read_only() as s:
            rows = await s.fetchall("SELECT id, owner, balance FROM accounts ORDER BY owner, id")
        return [Balance(str(r[0]), str(r[1]), int(r[2])) for r in rows]


class HistoryReader:
    """Reads the ``history`` read model (kept by an asynchronous projector)."""

    def __init__(self, db: ReadDatabase) -> None:
        self.db = db

    async def latest(self, account_id: str, limit: int) -> list[Entry]:
        """Newest first."""
        async with self.db.read_only() as s:
            rows = await s.fetchall(
                "SELECT position, account_id, kind, amount, balance_after, counterparty "
                "FROM entries WHERE account_id = ? ORDER BY position DESC LIMIT ?",
                account_id,
                limit,
            )
        return [
            Entry(int(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4]), r[5] and str(r[5]))
            for r in rows
        ]


@registry.handler
async def get_balance(q: GetBalance, balances: BalanceReader) -> Balance:
    found = await balances.get(q.account_id)
    if found is None:
        raise NotFoundError(f"no account {q.account_id!r}", message_type=GetBalance)
    return found


@registry.handler
async def list_accounts(q: ListAccounts, balances: BalanceReader) -> list[Balance]:
    return await balances.all()


@registry.handler
async def get_history(q: GetHistory, history: HistoryReader) -> list[Entry]:
    return await history.latest(q.account_id, q.limit)


# -- validation rules (ValidationBehavior) ------------------------------------------------


def _amount(amount: int) -> list[FieldError]:
    if not isinstance(amount, int) or isinstance(amount, bool):
        return [FieldError("amount", "must be an integer number of cents")]
    if amount <= 0:
        return [FieldError("amount", "must be positive")]
    if amount > MAX_AMOUNT:
        return [FieldError("amount", f"must be at most {MAX_AMOUNT} cents")]
    return []


def _account(field: str, value: str) -> list[FieldError]:
    if not isinstance(value, str) or not 1 <= len(value) <= 64:
        return [FieldError(field, "must be an account id (1 to 64 characters)")]
    return []


def check_open(cmd: OpenAccount) -> list[FieldError]:
    errors = []
    if not cmd.owner.strip() or len(cmd.owner) > 100:
        errors.append(FieldError("owner", "must be 1 to 100 characters"))
    if cmd.account_id is not None:
        errors += _account("account_id", cmd.account_id)
    return errors


def check_deposit(cmd: Deposit | Withdraw) -> list[FieldError]:
    return _account("account_id", cmd.account_id) + _amount(cmd.amount)


def check_transfer(cmd: Transfer) -> list[FieldError]:
    errors = _account("from_account", cmd.from_account) + _account("to_account", cmd.to_account)
    if cmd.from_account == cmd.to_account:
        errors.append(FieldError("to_account", "must differ from from_account"))
    return errors + _amount(cmd.amount)


VALIDATORS = {
    OpenAccount: check_open,
    Deposit: check_deposit,
    Withdraw: check_deposit,
    Transfer: check_transfer,
}


# -- authorization policies (AuthorizationBehavior; anything but True denies) --------------


class Policies:
    """Who may do what: customers act on their own accounts, tellers on any."""

    def __init__(self, balances: BalanceReader) -> None:
        self.balances = balances

    async def _owns(self, who: Customer | None, account_id: str) -> bool:
        if who is None:
            return False
        if who.teller:
            return True
        found = await self.balances.get(account_id)
        return found is not None and found.owner == who.name

    def table(self) -> dict[type, object]:
        """The policies by message type."""

        def open_own(who: Customer | None, cmd: OpenAccount) -> bool:
            return who is not None and (who.teller or who.name == cmd.owner)

        def anyone(who: Customer | None, message: object) -> bool:
            return who is not None  # any customer may pay into any account

        def teller(who: Customer | None, message: object) -> bool:
            return who is not None and who.teller

        async def owner_of_account(who: Customer | None, m: Withdraw | GetBalance) -> bool:
            return await self._owns(who, m.account_id)

        async def owner_of_history(who: Customer | None, q: GetHistory) -> bool:
            return await self._owns(who, q.account_id)

        async def owner_of_source(who: Customer | None, cmd: Transfer) -> bool:
            return await self._owns(who, cmd.from_account)

        return {
            OpenAccount: open_own,
            Deposit: anyone,
            Withdraw: owner_of_account,
            Transfer: owner_of_source,
            GetBalance: owner_of_account,
            GetHistory: owner_of_history,
            ListAccounts: teller,
        }
