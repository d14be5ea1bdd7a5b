"""The read models: ``balances`` (run inline) and ``history`` (run asynchronously).

Neither projection knows how it is run: :mod:`examples.bank.app` passes ``balances`` to
``InlineProjections`` (updated inside each command's transaction) and ``history`` to a
``Projector`` (tailing the event log). Swapping them is a change to two lists there.
SQL uses ``?`` placeholders, which the PostgreSQL read database rewrites.
"""

from __future__ import annotations

from cqrskit.projections import Projection, ProjectionContext
from examples.bank.domain import (
    AccountOpened,
    Deposited,
    TransferReceived,
    TransferSent,
    Withdrawn,
)

balances = Projection(
    "balances",
    tables={
        "accounts": (
            "CREATE TABLE {accounts} (id TEXT PRIMARY KEY, owner TEXT NOT NULL, "
            "balance BIGINT NOT NULL)",
        )
    },
)


async def _add(ctx: ProjectionContext, account_id: str, delta: int) -> None:
    await ctx.execute(
        f"UPDATE {ctx.table('accounts')} SET balance = balance + ? WHERE id = ?",
        delta,
        account_id,
    )


@balances.on
async def account_opened(e: AccountOpened, ctx: ProjectionContext) -> None:
    await ctx.execute(
        f"INSERT INTO {ctx.table('accounts')} (id, owner, balance) VALUES (?, ?, 0)",
        e.account_id,
        e.owner,
    )


@balances.on
async def deposited(e: Deposited, ctx: ProjectionContext) -> None:
    await _add(ctx, e.account_id, e.amount)


@balances.on
async def withdrawn(e: Withdrawn, ctx: ProjectionContext) -> None:
    await _add(ctx, e.account_id, -e.amount)


@balances.on
async def transfer_sent(e: TransferSent, ctx: ProjectionContext) -> None:
    await _add(ctx, e.account_id, -e.amount)


@balances.on
async def transfer_received(e: TransferReceived, ctx: ProjectionContext) -> None:
    await _add(ctx, e.account_id, e.amount)


history = Projection(
    "history",
    tables={
        "entries": (
            "CREATE TABLE {entries} (account_id TEXT NOT NULL, position BIGINT NOT NULL, "
            "kind TEXT NOT NULL, amount BIGINT NOT NULL, balance_after BIGINT NOT NULL, "
            "counterparty TEXT, recorded_at TEXT, PRIMARY KEY (account_id, position))",
        )
    },
)


async def _entry(
    ctx: ProjectionContext, account_id: str, kind: str, delta: int, counterparty: str | None
) -> None:
    stored = ctx.stored
    assert stored is not None
    table = ctx.table("entries")
    last = await ctx.fetchone(
        f"SELECT balance_after FROM {table} WHERE account_id = ? ORDER BY position DESC LIMIT 1",
        account_id,
    )
    before = int(last[0]) if last is not None else 0
    await ctx.execute(
        f"INSERT INTO {table} (position, account_id, kind, amount, balance_after, counterparty, "
        "recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        stored.position,
        account_id,
        kind,
        abs(delta),
        before + delta,
        counterparty,
        str(stored.metadata.get("timestamp") or ""),
    )


@history.on
async def history_opened(e: AccountOpened, ctx: ProjectionContext) -> None:
    await _entry(ctx, e.account_id, "opened", 0, None)


@history.on
async def history_deposited(e: Deposited, ctx: ProjectionContext) -> None:
    await _entry(ctx, e.account_id, "deposit", e.amount, None)


@history.on
async def history_withdrawn(e: Withdrawn, ctx: ProjectionContext) -> None:
    await _entry(ctx, e.account_id, "withdrawal", -e.amount, None)


@history.on
async def history_sent(e: TransferSent, ctx: ProjectionContext) -> None:
    await _entry(ctx, e.account_id, "transfer out", -e.amount, e.to_account)


@history.on
async def history_received(e: TransferReceived, ctx: ProjectionContext) -> None:
    await _entry(ctx, e.account_id, "transfer in", e.amount, e.from_account)
