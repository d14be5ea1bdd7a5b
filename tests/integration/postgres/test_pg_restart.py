"""A real PostgreSQL server crashed and restarted under load (not a proxy reset).

A throwaway cluster (its own port and directory) holds the event log and the read models.
Writer tasks send commands, an asynchronous projector applies them, reader tasks ask with
each command's consistency token (read-your-writes). While all of them run, the server is
stopped four times (three crashes, ``pg_ctl -m immediate``: no checkpoint, crash recovery at
the next start; one fast shutdown that terminates the sessions), kept down until writers and
readers have failed on it, and started again. The test restarts none of the clients: they
must recover by themselves. Afterwards every acknowledged command is in the log and the
read model equals the log: count, sum and per-stream order.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import pytest
from tests.support.bank import Deposited, balances, serializer
from tests.support.faults import check_invariants
from tests.support.pg_cluster import PgCluster
from tests.support.pg_log import invariants

from cqrskit import Command, Dependencies, Mediator, Query, Registry
from cqrskit.eventlog import UnitOfWork
from cqrskit.pipeline import for_queries
from cqrskit.postgres import PostgresEventStore, PostgresReadDatabase
from cqrskit.projections import ConsistencyGate, Projector, ReadSession, ask_consistent, reads

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

WRITERS = 4
READERS = 2
MODES = ("immediate", "fast", "immediate", "immediate")  # pg_ctl stop modes, in order
CLEAN = {"lost": 0, "double": 0, "reordered": 0, "wrong_sum": 0}
ACKS_BETWEEN = 40  # acknowledged commands between two crashes (and after the last one)


@dataclass(frozen=True, slots=True)
class Deposit(Command[None]):
    account: str
    amount: int


@reads("balances", policy="wait", timeout=10.0)
@dataclass(frozen=True, slots=True)
class GetAccount(Query["tuple[int, int] | None"]):
    account: str


registry = Registry()


@registry.handler
async def deposit(cmd: Deposit, uow: UnitOfWork) -> None:
    uow.record(cmd.account, Deposited(cmd.account, cmd.amount))


@registry.handler
async def get_account(q: GetAccount, db: ReadSession) -> tuple[int, int] | None:
    row = await db.fetchone("SELECT balance, applied FROM accounts WHERE id = ?", q.account)
    return None if row is None else (int(row[0]), int(row[1]))


@dataclass
class Load:
    """What the writers and readers saw; shared by the tasks."""

    acked: list[tuple[int, str, int]] = field(default_factory=list)  # (token, account, amount)
    acked_per_account: Counter[str] = field(default_factory=Counter)
    latest: tuple[int, str, int] | None = None  # the newest ack: (token, account, its count)
    new_ack: asyncio.Event = field(default_factory=asyncio.Event)
    reads_ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def __repr__(self) -> str:
        return f"acked={len(self.acked)} reads_ok={self.reads_ok} errors={dict(self.errors)}"


async def writer(mediator: Mediator, load: Load, n: int, rng: random.Random) -> None:
    accounts = [f"acc-{n}-{i}" for i in range(3)]  # one writer per account: exact counts
    while not load.stop.is_set():
        account, amount = rng.choice(accounts), rng.randrange(1, 100)
        try:
            receipt = await asyncio.wait_for(mediator.send_tracked(Deposit(account, amount)), 15)
        except Exception as exc:
            load.errors[f"write {type(exc).__name__}"] += 1
            await asyncio.sleep(0.02)  # back off while the server is down (not a sync wait)
            continue
        assert receipt.token is not None
        load.acked.append((receipt.token, account, amount))
        load.acked_per_account[account] += 1
        load.latest = (receipt.token, account, load.acked_per_account[account])
        load.new_ack.set()
        # pace the load (about 50 commands/s per writer) so that the projector, which shares
        # this event loop, can keep up: the test is about faults, not throughput
        await asyncio.sleep(rng.uniform(0.0, 0.04))


async def reader(mediator: Mediator, load: Load) -> None:
    """Read-your-writes on the newest acknowledged command (so each read may have to wait);
    while no new command is acknowledged (the server is down) it reads the last one again."""
    while not load.stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(load.new_ack.wait(), 0.1)
        load.new_ack.clear()
        if load.latest is None:
            continue
        token, account, at_least = load.latest
        try:
            read = await ask_consistent(mediator, GetAccount(account), token)
        except Exception as exc:
            load.errors[f"read {type(exc).__name__}"] += 1
            await asyncio.sleep(0.02)  # back off while the server is down (not a sync wait)
            continue
        # the row includes this write (and every earlier acknowledged one of its account)
        assert read.stale is False
        assert read.value is not None
        assert read.value[1] >= at_least, (account, read.value, at_least)
        load.reads_ok += 1


async def until(check: object, what: str, timeout: float = 60.0, info: object = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} not reached in {timeout}s ({info})"
        await asyncio.sleep(0.01)


async def acknowledged_in_log(dsn: str, acked: list[tuple[int, str, int]]) -> int:
    """How many acknowledged commands are missing from the log (same position, stream and
    amount)."""
    conn = await asyncpg.connect(dsn)
    try:
        log = {
            int(r[0]): (str(r[1]), int(r[2]))
            for r in await conn.fetch(
                "SELECT position, stream, (data::jsonb ->> 'amount')::bigint FROM w.cqrskit_events"
            )
        }
    finally:
        await conn.close()
    return sum(1 for token, account, amount in acked if log.get(token) != (account, amount))


async def test_server_crashes_under_load(pg_cluster: PgCluster) -> None:
    dsn = pg_cluster.dsn()
    rng = random.Random(41)
    store = await PostgresEventStore.open(dsn, schema="w", encoder=serializer.encode, notify=True)
    read_db = PostgresReadDatabase(dsn, schema="r")
    projector = Projector(
        store, read_db, [balances], serializer, batch_size=50, lease_ttl=2.0, poll_interval=0.2
    )
    gate = ConsistencyGate(store, read_db, signal=projector.signal)
    deps = Dependencies()
    deps.scoped(ReadSession, read_db.session)
    mediator = Mediator(
        registry,
        behaviors=[store.transaction(), for_queries(gate.behavior)],
        resolver=[store.resolver(), deps],
    )
    load = Load()
    tasks: list[asyncio.Task[None]] = []
    await projector.start()
    try:
        tasks += [asyncio.create_task(writer(mediator, load, n, rng)) for n in range(WRITERS)]
        tasks += [asyncio.create_task(reader(mediator, load)) for _ in range(READERS)]
        for mode in MODES:
            acked, read = len(load.acked), load.reads_ok
            await until(
                lambda a=acked, r=read: (
                    len(load.acked) >= a + ACKS_BETWEEN and load.reads_ok >= r + ACKS_BETWEEN // 4
                ),
                "progress before the crash",
                info=load,
            )
            # the server goes down (in a thread: clients keep running into the outage) and
            # stays down until writers and readers have both failed on it, then comes back
            errors = load.errors.copy()
            await asyncio.to_thread(pg_cluster.stop, mode)
            await until(
                lambda e=errors: (
                    any(k.startswith("write") for k in load.errors - e)
                    and any(k.startswith("read") for k in load.errors - e)
                ),
                "clients failing on the stopped server",
                info=load,
            )
            await asyncio.to_thread(pg_cluster.start)
        # recovered by themselves: new commands and read-your-writes after the last crash
        acked, read = len(load.acked), load.reads_ok
        await until(
            lambda: (
                len(load.acked) >= acked + ACKS_BETWEEN
                and load.reads_ok >= read + ACKS_BETWEEN // 4
            ),
            "progress after the last crash",
        )
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        head = await store.last_position()
        await until(lambda: projector.checkpoint("balances") >= head, "projector caught up")
    finally:
        load.stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await projector.stop()
        await read_db.close()
        await store.close()

    # no acknowledged command lost; the read model equals the log (count, sum, order)
    result = dict(await invariants(dsn, "w", "r"))
    result["lost"] += await acknowledged_in_log(dsn, load.acked)
    assert check_invariants("postgres-server-crashes", result) == CLEAN, load.errors
    assert len(load.acked) >= (len(MODES) + 1) * ACKS_BETWEEN
    # the faults happened: each start after a crash ran crash recovery (and clients failed on
    # each outage, waited for above)
    assert pg_cluster.starts == len(MODES) + 1
    recoveries = pg_cluster.log_file.read_text().count("automatic recovery in progress")
    assert recoveries == MODES.count("immediate")
    print(f"server crashes/restarts: {len(MODES)}; errors seen and recovered from: {load.errors}")
