"""A projection whose one handler does, per event kind, each thing a handler may do with
its context: the docs' upsert, two different statements, reads of earlier and of its own
writes, a row count that decides the next statement, executemany, the driver connection,
a failing statement and a failing handler. Used to compare batched and unbatched runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tests.support.bank import event_types, serializer

from cqrskit.eventlog import StoredEvent
from cqrskit.messages import Event
from cqrskit.projections import Projection, ProjectionContext


@dataclass(frozen=True, slots=True)
class Op(Event):
    kind: str
    key: str
    amount: int


# registered with the test logs' serializer, so their append() can write it
event_types.register(Op, "mix.op")
__all__ = ["KINDS", "Op", "mix", "on_op", "serializer", "stored_ops"]

KINDS = (
    "add",
    "add_log",
    "read",
    "own",
    "count",
    "own_count",
    "uses",
    "savepoint",
    "many",
    "conn",
    "raise",
    "dup",
    "swallow",
)

mix = Projection(
    "mix",
    tables={
        # a sum may not go below zero: a negative "add" can make its statement fail
        "sums": ("CREATE TABLE {sums} (k TEXT PRIMARY KEY, v BIGINT NOT NULL CHECK (v >= 0))",),
        "logs": (
            "CREATE TABLE {logs} (pos BIGINT PRIMARY KEY, k TEXT NOT NULL, seen BIGINT, "
            "kind TEXT NOT NULL)",
        ),
    },
)


@mix.on
async def on_op(e: Op, ctx: ProjectionContext) -> None:
    stored = ctx.stored
    assert stored is not None
    pos, kind = stored.position, e.kind
    sums, logs = ctx.table("sums"), ctx.table("logs")
    upsert = (
        f"INSERT INTO {sums} (k, v) VALUES (?, ?) "
        f"ON CONFLICT (k) DO UPDATE SET v = {sums}.v + excluded.v"
    )
    log = f"INSERT INTO {logs} (pos, k, seen, kind) VALUES (?, ?, ?, ?)"
    current = f"SELECT v FROM {sums} WHERE k = ?"
    if kind == "add":  # the docs' shape
        await ctx.execute(upsert, e.key, e.amount)
    elif kind == "add_log":  # two different statements per event
        await ctx.execute(upsert, e.key, e.amount)
        await ctx.execute(log, pos, e.key, None, kind)
    elif kind == "read":  # reads what earlier events wrote
        row = await ctx.fetchone(current, e.key)
        await ctx.execute(log, pos, e.key, row[0] if row else -1, kind)
    elif kind == "own":  # reads its own write, then writes again
        await ctx.execute(upsert, e.key, e.amount)
        row = await ctx.fetchone(current, e.key)
        assert row is not None
        await ctx.execute(log, pos, e.key, row[0], kind)
    elif kind == "count":  # a row count decides the next statement
        changed = await ctx.execute(f"UPDATE {sums} SET v = v + ? WHERE k = ?", e.amount, e.key)
        if changed == 0:
            await ctx.execute(f"INSERT INTO {sums} (k, v) VALUES (?, ?)", e.key, e.amount)
        await ctx.execute(log, pos, e.key, changed + 10, kind)
    elif kind == "own_count":  # writes, reads, then a row count decides
        await ctx.execute(upsert, e.key, e.amount)
        row = await ctx.fetchone(current, e.key)
        changed = await ctx.execute(f"UPDATE {sums} SET v = v WHERE k = ?", e.key + "x")
        if changed == 0:
            await ctx.execute(log, pos, e.key, row[0] if row else -1, kind)
    elif kind == "uses":  # a row count used as typed code uses an int
        changed = await ctx.execute(f"UPDATE {sums} SET v = v WHERE k = ?", e.key)
        assert isinstance(changed, int)
        seen = round(changed) + math.floor(changed) + len(f"{changed}") + (1 if changed else 0)
        await ctx.execute(log, pos, e.key, seen, kind)
    elif kind == "savepoint":  # catches its own statement's error around a savepoint
        await ctx.execute(upsert, e.key, 1)
        try:
            async with ctx.session.savepoint():
                await ctx.execute(log, 0, e.key, e.amount, kind)  # fails once key 0 is taken
        except Exception:
            pass
        await ctx.execute(upsert, e.key, 1)
    elif kind == "many":
        await ctx.executemany(log, [(pos, e.key, 1, kind), (-pos, e.key, 2, kind)])
    elif kind == "conn":  # the driver connection, behind the session's back
        if ctx.session.dialect == "sqlite":
            got = ctx.connection.execute(current, (e.key,)).fetchone()
            seen = got[0] if got else -1
            ctx.connection.execute(log, (pos, e.key, seen, kind))
        else:
            seen = await ctx.connection.fetchval(current.replace("?", "$1"), e.key)
            await ctx.connection.execute(
                log.replace("(?, ?, ?, ?)", "($1, $2, $3, $4)"),
                pos,
                e.key,
                -1 if seen is None else seen,
                kind,
            )
    elif kind == "raise":  # a poison event: the handler fails
        raise ValueError(f"cannot apply {e.key}")
    elif kind == "dup":  # fails from the second one on: logs' key 0 is taken
        await ctx.execute(log, 0, e.key, e.amount, kind)
    elif kind == "swallow":  # a read whose errors the handler ignores
        try:
            await ctx.fetchone(current, e.key)
        except Exception:  # what the batching must not be fooled by
            pass


def stored_ops(ops: list[tuple[str, str, str, int]], first: int = 1) -> list[StoredEvent]:
    """(kind, stream, key, amount) per event -> stored events at positions first, first+1..."""
    versions: dict[str, int] = {}
    out = []
    for i, (kind, stream, key, amount) in enumerate(ops):
        versions[stream] = versions.get(stream, 0) + 1
        enc = serializer.encode(Op(kind, key, amount))
        out.append(
            StoredEvent(
                first + i,
                stream,
                versions[stream],
                enc.type,
                enc.schema_version,
                enc.data,
                {"message_id": f"m{first + i}"},
            )
        )
    return out
