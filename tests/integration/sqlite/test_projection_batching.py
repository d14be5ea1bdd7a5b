"""Projection writes queued per batch and sent together: what handlers see and what the
read model ends up with are the same as when every statement is sent as it is issued.

The shared tests run on PostgreSQL too (tests/integration/postgres/read_side); the parity
property below is run there with its own database factory."""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.support.logs import AppendLog
from tests.support.mix import KINDS, Op, mix, on_op, serializer, stored_ops

from cqrskit.eventlog import StoredEvent
from cqrskit.projections import (
    ConsistencyGate,
    InlineProjections,
    Projector,
    ReadDatabase,
    dead_letters,
    schema,
)
from cqrskit.projections.apply import Applier
from cqrskit.projections.db import Row, Session
from cqrskit.sqlite import SqliteReadDatabase

Snapshot = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]


# -- helpers ---------------------------------------------------------------------------------


class Recording(Session):
    """A session that records what reaches the database through it."""

    def __init__(self, inner: Session) -> None:
        self.inner = inner
        self.dialect = inner.dialect
        self.flavor = inner.flavor
        self.calls: list[tuple[str, str, int]] = []

    @staticmethod
    def _name(sql: str) -> str:
        m = re.match(r"\s*(INSERT INTO|UPDATE|SELECT .*? FROM)\s+(\S+)", sql)
        return f"{m.group(1).split()[0]} {m.group(2).split('.')[-1]}" if m else sql

    @property
    def connection(self) -> Any:
        return self.inner.connection

    def qualify(self, name: str) -> str:
        return self.inner.qualify(name)

    async def execute(self, sql: str, *params: Any) -> int:
        self.calls.append(("execute", self._name(sql), 1))
        return await self.inner.execute(sql, *params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        self.calls.append(("executemany", self._name(sql), len(rows)))
        await self.inner.executemany(sql, rows)

    async def execute_all(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        names = "; ".join(self._name(sql) for sql, _ in statements)
        self.calls.append(("execute_all", names, len(statements)))
        await self.inner.execute_all(statements)

    async def fetchall(self, sql: str, *params: Any) -> list[Row]:
        self.calls.append(("fetch", self._name(sql), 1))
        return await self.inner.fetchall(sql, *params)

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        self.calls.append(("fetch", self._name(sql), 1))
        return await self.inner.fetchone(sql, *params)

    def savepoint(self) -> AbstractAsyncContextManager[None]:
        return self.inner.savepoint()


async def install(db: ReadDatabase) -> None:
    async with db.transaction() as s:
        await schema.ensure_projection(s, mix, "async")


async def snapshot(db: ReadDatabase) -> Snapshot:
    async with db.read_only() as s:
        sums = [tuple(r) for r in await s.fetchall("SELECT k, v FROM sums ORDER BY k")]
        logs = [
            tuple(r) for r in await s.fetchall("SELECT pos, k, seen, kind FROM logs ORDER BY pos")
        ]
    parked = [
        (d.position, d.stream, d.attempts, d.error.split(":")[0])
        for d in await dead_letters(db, "mix")
    ]
    return sums, logs, parked


async def apply_like_the_projector(
    db: ReadDatabase, applier: Applier, events: Sequence[StoredEvent]
) -> None:
    """What the projector does per batch: the fast path, else the careful path."""
    try:
        async with db.transaction() as s:
            await applier.apply_fast(s, 1, events)
        return
    except Exception:  # the careful path decides
        pass
    async with db.transaction() as s:
        await applier.load_blocked(s, 1)
        await applier.apply_careful(s, 1, events)


async def projected(log: AppendLog, db: ReadDatabase, **options: Any) -> None:
    """Run a projector over everything in ``log`` and stop it."""
    async with Projector(log, db, [mix], serializer, **options) as p:
        gate = ConsistencyGate(log, db, signal=p.signal)
        await gate.check(["mix"], await log.last_position(), "wait", 20.0)


# -- what reaches the database ---------------------------------------------------------------


async def test_statements_are_sent_together_in_order(read_db: ReadDatabase) -> None:
    await install(read_db)
    applier = Applier(mix, serializer)
    ops = [("add", "s", f"k{i % 3}", 1) for i in range(40)]
    ops += [("add", "s", "a", 2), ("read", "s", "a", 0), ("add", "s", "a", 3)]
    ops += [("own", "s", "b", 4), ("add", "s", "b", 5), ("add", "s", "c", 6)]
    async with read_db.transaction() as s:
        rec = Recording(s)
        await applier.apply_fast(rec, 1, stored_ops(ops))
    assert rec.calls == [
        # 41 upserts of finished handlers, one executemany, sent by the read
        ("executemany", 'INSERT "sums__g1"', 41),
        ("fetch", 'SELECT "sums__g1"', 1),
        # the read's log row and the next upsert are different statements: together
        ("execute_all", 'INSERT "logs__g1"; INSERT "sums__g1"', 2),
        # "own": its upsert is sent with a count before its read, then it runs unbatched
        ("execute", 'INSERT "sums__g1"', 1),
        ("fetch", 'SELECT "sums__g1"', 1),
        ("execute", 'INSERT "logs__g1"', 1),
        # the end of the batch: a run shorter than RUN goes with the other statements
        ("execute_all", 'INSERT "sums__g1"; INSERT "sums__g1"', 2),
    ]
    sums, logs, _ = await snapshot(read_db)
    assert dict(sums) == {"k0": 14, "k1": 13, "k2": 13, "a": 5, "b": 9, "c": 6}
    # the read saw the write of the event before it; "own" saw its own write
    assert [(r[1], r[2], r[3]) for r in logs] == [("a", 2, "read"), ("b", 4, "own")]


async def test_reads_see_earlier_and_own_writes(log: AppendLog, read_db: ReadDatabase) -> None:
    await log.append("s1", Op("add", "a", 5))
    await log.append("s2", Op("read", "a", 0))
    await log.append("s1", Op("own", "a", 3))
    await log.append("s2", Op("add", "a", 1))
    await log.append("s2", Op("read", "a", 0))
    await log.append("s3", Op("read", "zz", 0))
    await projected(log, read_db, batch_size=100)
    sums, logs, parked = await snapshot(read_db)
    assert dict(sums) == {"a": 9}
    assert [(r[2], r[3]) for r in logs] == [(5, "read"), (8, "own"), (9, "read"), (-1, "read")]
    assert parked == []


async def test_row_counts_and_the_connection_stay_exact(
    log: AppendLog, read_db: ReadDatabase
) -> None:
    # "count" inserts when its UPDATE changed no row; "conn" reads and writes through the
    # driver connection and must see every write queued before it
    ops = [("count", "x", 2), ("add", "x", 1), ("count", "x", 4), ("conn", "x", 0)]
    ops += [("add", "y", 7), ("conn", "y", 0), ("count", "y", 1), ("count", "z", 3)]
    ops += [("uses", "y", 0), ("uses", "none", 0), ("savepoint", "p", 5), ("savepoint", "p", 6)]
    for kind, key, amount in ops:
        await log.append(f"s-{key}", Op(kind, key, amount))
    await projected(log, read_db, batch_size=100)
    sums, logs, parked = await snapshot(read_db)
    # "savepoint" adds 2 each time; its log row (key 0) only the first time
    assert dict(sums) == {"x": 7, "y": 8, "z": 3, "p": 4}
    assert [(r[1], r[2], r[3]) for r in logs if r[0] == 0] == [("p", 5, "savepoint")]
    assert [(r[1], r[2], r[3]) for r in logs if r[0] != 0] == [
        ("x", 10, "count"),  # no row: changed == 0
        ("x", 11, "count"),
        ("x", 7, "conn"),
        ("y", 7, "conn"),
        ("y", 11, "count"),
        ("z", 10, "count"),
        ("y", 4, "uses"),  # one row changed: round 1 + floor 1 + len("1") + 1
        ("none", 1, "uses"),  # none: 0 + 0 + len("0") + 0
    ]
    assert parked == []


async def test_a_failing_statement_parks_its_own_event(
    log: AppendLog, read_db: ReadDatabase
) -> None:
    # ten upserts of one SQL text go as one executemany; the sixth breaks the CHECK
    positions = []
    for i in range(10):
        amount = -1 if i == 5 else 1
        [e] = await log.append(f"s{i}", Op("add", f"k{i}", amount))
        positions.append(e.position)
    [later] = await log.append("s5", Op("add", "k5", 1))  # behind the parked one
    await log.append("s6", Op("add", "k6", 1))
    await projected(log, read_db, batch_size=100, max_attempts=2)
    sums, _, parked = await snapshot(read_db)
    assert dict(sums) == {f"k{i}": 2 if i == 6 else 1 for i in range(10) if i != 5}
    assert [p[:3] for p in parked] == [(positions[5], "s5", 2), (later.position, "s5", 0)]
    assert parked[0][3] != ""


async def test_a_handler_that_swallows_a_send_error_still_fails_the_batch(
    read_db: ReadDatabase,
) -> None:
    await install(read_db)
    applier = Applier(mix, serializer)
    # "swallow" reads inside try/except: the read sends the queue, whose failing upsert
    # is an earlier event's
    swallow = ("swallow", "s4", "d", 0)
    events = stored_ops(
        [("add", "s1", "a", 1), ("add", "s2", "b", -5), ("add", "s3", "c", 1), swallow]
    )
    with pytest.raises(Exception, match=r"(?i)check"):
        async with read_db.transaction() as s:
            await applier.apply_fast(s, 1, events)
    await apply_like_the_projector(read_db, applier, events)
    sums, _, parked = await snapshot(read_db)
    assert dict(sums) == {"a": 1, "c": 1}
    assert [p[:2] for p in parked] == [(2, "s2")]


async def test_inline_command_with_several_events(
    log: AppendLog, open_read_db: Callable[..., ReadDatabase]
) -> None:
    read_db = open_read_db(write=True)
    inline = InlineProjections(read_db, [mix], serializer)
    await inline.setup()
    inline.attach(log)
    await log.append("a", Op("add", "a", 2), Op("read", "a", 0), Op("add", "a", 3))
    await log.append("a", Op("count", "b", 1), Op("own", "b", 1), Op("count", "b", 1))
    head = await log.last_position()
    # the second event's statement breaks the CHECK: the command fails, nothing applied
    with pytest.raises(Exception, match=r"(?i)check"):
        await log.append("c", Op("add", "c", 1), Op("add", "a", -100), Op("add", "c", 1))
    assert await log.last_position() == head
    sums, logs, _ = await snapshot(read_db)
    assert dict(sums) == {"a": 5, "b": 3}
    assert [(r[1], r[2], r[3]) for r in logs] == [
        ("a", 2, "read"),
        ("b", 10, "count"),
        ("b", 2, "own"),
        ("b", 11, "count"),
    ]
    async with read_db.read_only() as s:
        checkpoint = await schema.get_checkpoint(s, "mix", 1)
    assert checkpoint == head


# -- parity with unbatched application, on random programs ----------------------------------

programs = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.sampled_from(["s0", "s1", "s2"]),
        st.sampled_from(["k0", "k1", "k2"]),
        st.integers(min_value=-3, max_value=5),
    ),
    min_size=1,
    max_size=40,
)
PARITY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


async def run_program(
    open_db: Callable[[], AbstractAsyncContextManager[ReadDatabase]],
    ops: list[tuple[str, str, str, int]],
    batch: int,
    *,
    batched: bool,
) -> Snapshot:
    events = stored_ops(ops)
    applier = Applier(mix, serializer, max_attempts=2, batch_writes=batched)
    async with open_db() as db:
        await install(db)
        for i in range(0, len(events), batch):
            await apply_like_the_projector(db, applier, events[i : i + batch])
        return await snapshot(db)


async def check_parity(
    open_db: Callable[[], AbstractAsyncContextManager[ReadDatabase]],
    ops: list[tuple[str, str, str, int]],
    batch: int,
) -> None:
    expected = await run_program(open_db, ops, batch, batched=False)
    got = await run_program(open_db, ops, batch, batched=True)
    assert got == expected


def sqlite_dbs() -> Callable[[], AbstractAsyncContextManager[ReadDatabase]]:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def open_db() -> AsyncIterator[ReadDatabase]:
        with tempfile.TemporaryDirectory() as d:
            db = SqliteReadDatabase(str(Path(d) / "read.db"))
            try:
                yield db
            finally:
                await db.close()

    return open_db


@settings(PARITY, max_examples=300)
@given(ops=programs, batch=st.integers(min_value=1, max_value=15))
def test_batched_equals_unbatched_sqlite(ops: list[tuple[str, str, str, int]], batch: int) -> None:
    asyncio.run(check_parity(sqlite_dbs(), ops, batch))


def test_the_handler_mix_covers_every_kind() -> None:
    # the parity property is only as good as the handler it runs
    source = on_op.__code__.co_consts
    assert all(kind in source for kind in KINDS)
