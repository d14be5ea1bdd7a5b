"""A dead-letter retry request committed while the projector re-applies another stream's
parked events is not lost (PostgreSQL runs each statement of the holder's transaction on a
fresh snapshot, so clearing "every flag" also clears one committed meanwhile)."""

from __future__ import annotations

from collections.abc import Callable

from tests.support.bank import Deposited, Poison, decode
from tests.support.pg_log import PgTestLog
from tests.support.waiting import until

from cqrskit.postgres import PostgresReadDatabase
from cqrskit.projections import (
    Projection,
    ProjectionContext,
    Projector,
    dead_letters,
    request_retry,
)


async def test_a_retry_requested_during_another_retry_is_not_lost(
    postgres_dsn: str, log: PgTestLog, schemas: Callable[[str], str]
) -> None:
    db = PostgresReadDatabase(postgres_dsn, schema=schemas("r"))
    state = {"retrying": False, "flagged": 0}
    ledger = Projection(
        "ledger", tables={"seen": ("CREATE TABLE {seen} (id TEXT NOT NULL, n BIGINT)",)}
    )

    @ledger.on(Poison)
    async def poison(event: Poison, ctx: ProjectionContext) -> None:
        if state["retrying"] and not state["flagged"]:
            # another operator flags stream b while a's retry is under way (committed in
            # its own transaction, before the holder's transaction ends)
            state["flagged"] = await request_retry(db, "ledger", stream="b")
        raise RuntimeError(f"cannot apply {event.account}")

    @ledger.on(Deposited)
    async def deposited(event: Deposited, ctx: ProjectionContext) -> None:
        await ctx.execute(f"INSERT INTO {ctx.table('seen')} VALUES (?, ?)", event.account, 1)

    try:
        await log.append("a", Poison("a"))
        await log.append("b", Poison("b"))
        async with Projector(log, db, [ledger], decode, state_interval=0.01) as p:

            async def both_parked() -> bool:
                return {d.stream for d in await dead_letters(db, "ledger")} == {"a", "b"}

            await until(both_parked, p.signal)
            state["retrying"] = True
            assert await request_retry(db, "ledger", stream="a") == 1

            async def settled() -> bool:
                letters = {d.stream: d for d in await dead_letters(db, "ledger")}
                return state["flagged"] == 1 and not any(d.retry for d in letters.values())

            await until(settled, p.signal)
            letters = {d.stream: d for d in await dead_letters(db, "ledger")}
            assert letters["a"].attempts == 6
            assert letters["b"].attempts == 6, f"b's retry request was dropped: {letters}"
    finally:
        await db.close()
