"""A self-verifying test projection: account balances with per-stream order checks."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from cqrskit.messages import Event
from cqrskit.projections import Projection, ProjectionContext
from cqrskit.serialization import EventTypes, JsonSerializer


@dataclass(frozen=True, slots=True)
class Deposited(Event):
    account: str
    amount: int


@dataclass(frozen=True, slots=True)
class Poison(Event):
    account: str


@dataclass(frozen=True, slots=True)
class Unrelated(Event):
    note: str


event_types = EventTypes()
event_types.register(Deposited, "bank.deposited")
event_types.register(Poison, "bank.poison")
event_types.register(Unrelated, "bank.unrelated")
serializer = JsonSerializer(event_types)
decode = serializer


balances = Projection(
    "balances",
    tables={
        "accounts": (
            "CREATE TABLE {accounts} (id TEXT PRIMARY KEY, balance BIGINT NOT NULL, "
            "last_version BIGINT NOT NULL, applied BIGINT NOT NULL)",
        ),
        "order_errors": (
            "CREATE TABLE {order_errors} (id TEXT NOT NULL, expected BIGINT, got BIGINT)",
        ),
    },
)

# the poison handler fails while this file exists: "fixing the bug" = deleting it
POISON_FLAG = "CQRSKIT_TEST_POISON_FLAG"
# seconds each event's handler awaits inside the batch transaction (a slowed apply, so a
# fault can be injected while a projector holds its transaction open)
SLOW_APPLY = "CQRSKIT_TEST_SLOW_APPLY"
_slow = float(os.environ.get(SLOW_APPLY) or 0)


async def _touch(ctx: ProjectionContext, account: str, amount: int) -> None:
    stored = ctx.stored
    assert stored is not None
    if _slow:
        await asyncio.sleep(_slow)  # fault injection (a handler awaiting I/O), not a sync
    row = await ctx.fetchone(
        f"SELECT last_version FROM {ctx.table('accounts')} WHERE id = ?", account
    )
    last = int(row[0]) if row else 0
    if stored.version != last + 1:
        await ctx.execute(
            f"INSERT INTO {ctx.table('order_errors')} (id, expected, got) VALUES (?, ?, ?)",
            account,
            last + 1,
            stored.version,
        )
    await ctx.execute(
        f"INSERT INTO {ctx.table('accounts')} (id, balance, last_version, applied) "
        "VALUES (?, ?, ?, 1) ON CONFLICT (id) DO UPDATE SET "
        "balance = {t}.balance + excluded.balance, last_version = excluded.last_version, "
        "applied = {t}.applied + 1".replace("{t}", ctx.table("accounts")),
        account,
        amount,
        stored.version,
    )


@balances.on
async def deposited(e: Deposited, ctx: ProjectionContext) -> None:
    await _touch(ctx, e.account, e.amount)


@balances.on
async def poison(e: Poison, ctx: ProjectionContext) -> None:
    flag = os.environ.get(POISON_FLAG)
    if flag and os.path.exists(flag):
        raise RuntimeError(f"cannot apply poison for {e.account}")
    await _touch(ctx, e.account, 0)
