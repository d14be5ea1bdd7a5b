"""What ``python -m examples.bank`` runs: a day at the bank, then a summary.

Customers open accounts, deposit, withdraw and transfer (some try to overdraw, some try to
touch accounts that are not theirs); the inline ``balances`` read model is always current,
the async ``history`` read model catches up behind it, and a final check proves both agree
with what the commands did. Only the core library is needed.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO

from cqrskit import ConcurrencyError, NotAuthorizedError, Receipt, ValidationError
from cqrskit.projections import ProjectionStatus, ask_consistent, projection_status
from examples.bank.app import Bank
from examples.bank.domain import (
    Customer,
    Deposit,
    GetHistory,
    InsufficientFunds,
    ListAccounts,
    OpenAccount,
    Transfer,
    Withdraw,
    acting_as,
    format_money,
)

CUSTOMERS = ("ada", "grace", "linus", "barbara", "ken", "margaret", "alan", "edsger")
TELLER = Customer("teller", teller=True)
CATCH_UP_TIMEOUT = 60.0


@dataclass
class Outcome:
    """What the demo did, for the summary and the tests."""

    accepted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    money_in: int = 0
    money_out: int = 0
    last_token: int = 0
    accounts: dict[str, str] = field(default_factory=dict)  # account id -> owner
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every final check passed."""
        return bool(self.checks) and all(self.checks.values())


class _Progress:
    """One status line, rewritten in place on a terminal, printed sparsely otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.printed = 0.0

    def show(self, text: str, *, final: bool = False) -> None:
        if self.tty:
            self.out.write(f"\r  {text:<76}")
            if final:
                self.out.write("\n")
        elif final or time.monotonic() - self.printed >= 0.5:
            self.out.write(f"  {text}\n")
            self.printed = time.monotonic()
        self.out.flush()


async def _send(bank: Bank, outcome: Outcome, who: Customer, command: object) -> object:
    """Send ``command`` as ``who``; count the outcome; return the result or ``None``."""
    kind = type(command).__name__
    try:
        with acting_as(who):
            receipt: Receipt[object] = await bank.mediator.send_tracked(
                command  # type: ignore[arg-type]
            )
    except InsufficientFunds:
        outcome.rejected["overdraft"] += 1
    except NotAuthorizedError:
        outcome.rejected["not authorized"] += 1
    except ValidationError:
        outcome.rejected["invalid"] += 1
    except ConcurrencyError:
        outcome.rejected["concurrent update"] += 1
    else:
        outcome.accepted[kind] += 1
        if receipt.token is not None:
            outcome.last_token = max(outcome.last_token, receipt.token)
        return receipt.result
    return None


async def _day_at_the_bank(
    bank: Bank, outcome: Outcome, operations: int, rng: random.Random, out: TextIO
) -> None:
    run = uuid.uuid4().hex[:4]
    for name in CUSTOMERS:
        account_id = await _send(bank, outcome, Customer(name), OpenAccount(name, f"{name}-{run}"))
        assert isinstance(account_id, str)
        outcome.accounts[account_id] = name
        amount = rng.randrange(50_000, 200_000)
        if await _send(bank, outcome, TELLER, Deposit(account_id, amount)) is not None:
            outcome.money_in += amount
    ids = list(outcome.accounts)
    progress = _Progress(out)
    for i in range(1, operations + 1):
        account = rng.choice(ids)
        owner = Customer(outcome.accounts[account])
        roll = rng.random()
        if roll < 0.35:
            amount = rng.randrange(1_000, 30_000)
            payer = Customer(rng.choice(CUSTOMERS))
            if await _send(bank, outcome, payer, Deposit(account, amount)) is not None:
                outcome.money_in += amount
        elif roll < 0.65:
            amount = rng.randrange(1_000, 60_000)
            if await _send(bank, outcome, owner, Withdraw(account, amount)) is not None:
                outcome.money_out += amount
        elif roll < 0.94:
            target = rng.choice([a for a in ids if a != account])
            amount = rng.randrange(1_000, 80_000)
            await _send(bank, outcome, owner, Transfer(account, target, amount))
        elif roll < 0.98:
            intruder = Customer(rng.choice([c for c in CUSTOMERS if c != owner.name]))
            await _send(bank, outcome, intruder, Withdraw(account, 1_000))
        else:
            await _send(bank, outcome, owner, Deposit(account, 0))  # invalid amount
        if i % 20 == 0:
            await asyncio.sleep(0)  # a web server yields between requests; so do we
            status = await _history_status(bank)
            progress.show(
                f"commands {i}/{operations}  ·  history projection "
                f"{status.lag_events} events behind"
            )
    progress.show(f"commands {operations}/{operations} done", final=True)


async def _history_status(bank: Bank) -> ProjectionStatus:
    [status] = await projection_status(bank.read_db, bank.store, ["history"])
    return status


async def _catch_up(bank: Bank, out: TextIO) -> None:
    """Show the async read model catching up (positions may have gaps: count events)."""
    progress = _Progress(out)
    first = await _history_status(bank)
    behind = first.lag_events
    if behind == 0:
        progress.show(
            f"history projection kept pace during the day: checkpoint {first.checkpoint}, "
            "0 events behind",
            final=True,
        )
        return
    deadline = time.monotonic() + CATCH_UP_TIMEOUT
    width = 30
    while True:
        lag = (await _history_status(bank)).lag_events
        done = behind - min(lag, behind)
        filled = width if behind == 0 else width * done // behind
        bar = "#" * filled + "." * (width - filled)
        progress.show(f"history projection [{bar}] {done}/{behind} events applied")
        if lag == 0 or time.monotonic() >= deadline:
            break
        await bank.signal.wait(min(0.2, max(0.0, deadline - time.monotonic())))
    progress.show(f"history projection [{bar}] {done}/{behind} events applied", final=True)


async def _read_your_writes(bank: Bank, outcome: Outcome, out: TextIO) -> None:
    account = next(iter(outcome.accounts))
    owner = Customer(outcome.accounts[account])
    with acting_as(owner):
        receipt = await bank.mediator.send_tracked(Deposit(account, 4_200))
        outcome.money_in += 4_200
        outcome.accepted["Deposit"] += 1
        assert receipt.token is not None
        outcome.last_token = receipt.token
        started = time.monotonic()
        read = await ask_consistent(bank.mediator, GetHistory(account, limit=1), receipt.token)
        waited = (time.monotonic() - started) * 1000
    newest = read.value[0] if read.value else None
    seen = newest is not None and newest.position == receipt.token
    outcome.checks["read your own write"] = seen and not read.stale
    out.write(
        f"  {owner.name} deposits 42.00 (token {receipt.token}) and asks the async history "
        f"with that token:\n    newest entry: {newest.kind if newest else 'none'} "
        f"{format_money(newest.amount) if newest else ''} at position "
        f"{newest.position if newest else '-'} (waited {waited:.1f} ms)\n"
    )


async def _count_events(bank: Bank) -> int:
    count, position = 0, 0
    for _ in range(1_000_000):  # bounded: a million pages is far beyond any demo
        page = await bank.store.read_after(position, 1000)
        if not page:
            break
        count += len(page)
        position = page[-1].position
    return count


async def _summary(bank: Bank, outcome: Outcome, elapsed: float, out: TextIO) -> None:
    with acting_as(TELLER):
        accounts = await bank.mediator.ask(ListAccounts())
        mine = [a for a in accounts if a.account_id in outcome.accounts]
        histories = {
            a.account_id: await bank.mediator.ask(GetHistory(a.account_id, limit=1)) for a in mine
        }
    status = await _history_status(bank)
    events = await _count_events(bank)
    total = sum(a.balance for a in mine)
    outcome.checks["money is conserved"] = total == outcome.money_in - outcome.money_out
    outcome.checks["history agrees with balances"] = all(
        bool(histories[a.account_id]) and histories[a.account_id][0].balance_after == a.balance
        for a in mine
    )
    outcome.checks["history caught up"] = status.lag_events == 0 and status.dead_letters == 0
    sent = sum(outcome.accepted.values()) + sum(outcome.rejected.values())
    lines = [
        "",
        "Summary",
        f"  commands     {sent} sent: {sum(outcome.accepted.values())} accepted, "
        f"{sum(outcome.rejected.values())} rejected"
        + (
            " (" + ", ".join(f"{n} {k}" for k, n in sorted(outcome.rejected.items())) + ")"
            if outcome.rejected
            else ""
        ),
        "  accepted     " + ", ".join(f"{n} {k}" for k, n in sorted(outcome.accepted.items())),
        f"  event log    {events} events (last position {status.head})",
        "  balances     (inline projection: updated in each command's transaction)",
    ]
    for a in mine:
        lines.append(f"    {a.owner:<10} {a.account_id:<14} {format_money(a.balance):>12}")
    lines += [
        f"    {'total':<25} {format_money(total):>12}   "
        f"(in {format_money(outcome.money_in)}, out {format_money(outcome.money_out)})",
        f"  history      (async projection) checkpoint {status.checkpoint}, lag "
        f"{status.lag_events} events / {status.lag_seconds:.2f} s, "
        f"{status.dead_letters} dead letters",
        f"  time         {elapsed:.2f} s ({sent / elapsed:.0f} commands/s)"
        if elapsed > 0
        else "  time         0 s",
        "  checks       "
        + ", ".join(f"{name}: {'OK' if ok else 'FAILED'}" for name, ok in outcome.checks.items()),
    ]
    out.write("\n".join(lines) + "\n")


async def run_demo(
    bank: Bank, *, operations: int = 400, seed: int = 7, out: TextIO | None = None
) -> Outcome:
    """Run the demo on a started ``bank`` and print as it goes; return what happened."""
    out = out or sys.stdout
    rng = random.Random(seed)
    outcome = Outcome()
    started = time.monotonic()
    out.write(f"cqrskit demo bank — {bank.description}\n\n1. A day at the bank\n")
    await _day_at_the_bank(bank, outcome, operations, rng, out)
    out.write("\n2. The asynchronous read model catches up\n")
    await _catch_up(bank, out)
    out.write("\n3. Read your own writes with a consistency token\n")
    await _read_your_writes(bank, outcome, out)
    await _summary(bank, outcome, time.monotonic() - started, out)
    return outcome
