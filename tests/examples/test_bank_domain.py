"""The example bank through its mediator: rules, errors, read models, consistency."""

from __future__ import annotations

from pathlib import Path

import pytest
from examples.bank.app import Bank, open_sqlite_bank
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
    acting_as,
)

from cqrskit import ConcurrencyError, NotAuthorizedError, NotFoundError, ValidationError
from cqrskit.projections import ask_consistent, projection_status

ADA = Customer("ada")
GRACE = Customer("grace")
TELLER = Customer("teller", teller=True)


async def open_with(bank: Bank, who: Customer, amount: int) -> str:
    with acting_as(who):
        account = await bank.mediator.send(OpenAccount(who.name, f"{who.name}-1"))
        await bank.mediator.send(Deposit(account, amount))
    return account


async def test_deposit_withdraw_transfer_update_inline_balances(bank: Bank) -> None:
    ada = await open_with(bank, ADA, 10_000)
    grace = await open_with(bank, GRACE, 500)
    with acting_as(ADA):
        assert await bank.mediator.send(Withdraw(ada, 2_500)) == 7_500
        await bank.mediator.send(Transfer(ada, grace, 1_000))
        assert (await bank.mediator.ask(GetBalance(ada))).balance == 6_500
    with acting_as(GRACE):
        assert (await bank.mediator.ask(GetBalance(grace))).balance == 1_500
    with acting_as(TELLER):
        listed = {a.account_id: a.balance for a in await bank.mediator.ask(ListAccounts())}
    assert listed == {ada: 6_500, grace: 1_500}


async def test_overdraft_is_refused_and_commits_nothing(bank: Bank) -> None:
    ada = await open_with(bank, ADA, 1_000)
    grace = await open_with(bank, GRACE, 0 + 1)
    head = await bank.store.head()
    with acting_as(ADA), pytest.raises(InsufficientFunds) as info:
        await bank.mediator.send(Withdraw(ada, 1_001))
    assert (info.value.balance, info.value.amount) == (1_000, 1_001)
    with acting_as(ADA), pytest.raises(InsufficientFunds):
        await bank.mediator.send(Transfer(ada, grace, 5_000))
    assert await bank.store.head() == head
    with acting_as(ADA):
        assert (await bank.mediator.ask(GetBalance(ada))).balance == 1_000


async def test_customers_cannot_touch_other_accounts(bank: Bank) -> None:
    ada = await open_with(bank, ADA, 1_000)
    grace = await open_with(bank, GRACE, 1_000)
    with acting_as(GRACE):
        with pytest.raises(NotAuthorizedError):
            await bank.mediator.send(Withdraw(ada, 10))
        with pytest.raises(NotAuthorizedError):
            await bank.mediator.send(Transfer(ada, grace, 10))
        with pytest.raises(NotAuthorizedError):
            await bank.mediator.ask(GetHistory(ada))
        with pytest.raises(NotAuthorizedError):
            await bank.mediator.ask(ListAccounts())
        await bank.mediator.send(Deposit(ada, 10))  # paying in is allowed
    with acting_as(None), pytest.raises(NotAuthorizedError):
        await bank.mediator.send(Deposit(ada, 10))
    with acting_as(GRACE), pytest.raises(NotAuthorizedError):
        await bank.mediator.send(OpenAccount("ada"))  # not in someone else's name
    with acting_as(TELLER):
        assert (await bank.mediator.ask(GetBalance(ada))).balance == 1_010


async def test_invalid_commands_list_every_failing_field(bank: Bank) -> None:
    ada = await open_with(bank, ADA, 1_000)
    with acting_as(ADA), pytest.raises(ValidationError) as info:
        await bank.mediator.send(Transfer(ada, ada, -5))
    assert {e.field for e in info.value.errors} == {"to_account", "amount"}
    with acting_as(TELLER), pytest.raises(ValidationError):
        await bank.mediator.send(Deposit(ada, 0))


async def test_unknown_account_is_not_found_for_the_teller(bank: Bank) -> None:
    with acting_as(TELLER):
        with pytest.raises(NotFoundError):
            await bank.mediator.send(Deposit("nobody", 10))
        with pytest.raises(NotFoundError):
            await bank.mediator.ask(GetBalance("nobody"))


async def test_opening_an_existing_account_id_conflicts(bank: Bank) -> None:
    await open_with(bank, ADA, 1)
    with acting_as(ADA), pytest.raises(ConcurrencyError):
        await bank.mediator.send(OpenAccount("ada", "ada-1"))


async def test_history_read_your_writes_with_token(bank: Bank) -> None:
    ada = await open_with(bank, ADA, 1_000)
    grace = await open_with(bank, GRACE, 1_000)
    with acting_as(ADA):
        receipt = await bank.mediator.send_tracked(Transfer(ada, grace, 300))
        assert receipt.token is not None
        read = await ask_consistent(bank.mediator, GetHistory(ada), receipt.token)
    assert not read.stale
    kinds = [(e.kind, e.amount, e.balance_after, e.counterparty) for e in read.value]
    assert kinds == [
        ("transfer out", 300, 700, grace),
        ("deposit", 1_000, 1_000, None),
        ("opened", 0, 0, None),
    ]
    [status] = await projection_status(bank.read_db, bank.store, ["history"])
    assert status.mode == "async"
    assert status.checkpoint >= receipt.token


async def test_accounts_see_commits_of_another_process(bank: Bank, tmp_path: Path) -> None:
    ada = await open_with(bank, ADA, 1_000)
    with acting_as(ADA), pytest.raises(InsufficientFunds):
        await bank.mediator.send(Withdraw(ada, 5_000))  # rolled back: learns nothing
    async with open_sqlite_bank(tmp_path / "bank") as other:  # the same files
        with acting_as(ADA):
            assert await other.mediator.send(Withdraw(ada, 600)) == 400
    with acting_as(ADA):
        with pytest.raises(InsufficientFunds) as info:
            await bank.mediator.send(Withdraw(ada, 401))
        assert info.value.balance == 400
        assert await bank.mediator.send(Withdraw(ada, 400)) == 0
