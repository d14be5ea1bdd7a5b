"""Rebalancing under load, with real processes: start 1 worker, add 2, remove 1.

Four writer processes commit transfers at a steady pace the whole time (until the last
move is over, then they are stopped). One worker takes
all 8 partitions; two more join and each takes its share from the running one (3/3/2);
one leaves gracefully (SIGTERM) and the other two split its partitions (4/4). Every move
raises the partition's epoch. At the end the read model equals the replayed log, the sum
of balances is unchanged and per-stream order was never violated. Run for consumers of
each broker — NATS and Redis (own server on a free port), RabbitMQ (the shared node, queues
of the run's own, deleted at the end) — and for the partitioned log projector.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import require_service
from tests.integration.messaging.test_consumer_faults import (
    ACCOUNTS,
    PARTITIONS,
    SEED,
    owners,
    read_model,
    replay,
    seed,
    spawn,
    stop_all,
)
from tests.support import faults as ledger
from tests.support.brokers import NatsServer, OwnServer, RedisServer, rabbit_delete
from tests.support.relay_checks import need_binary
from tests.support.sqlite_log import SqliteTestLog

from cqrskit.projections import ReadDatabase, partition_status

WRITERS = 4
MOST_PER_WRITER = 5000  # an upper bound: the writers are stopped after the rebalancing
PACE = "0.03"


async def shares(
    db: ReadDatabase, live: list[str], want: list[int], timeout: float = 30
) -> dict[int, tuple[str | None, int]]:
    """Wait (bounded) until the live owners hold ``want`` partitions each (sorted)."""
    deadline = time.monotonic() + timeout
    while True:
        held = await owners(db)
        counts = sorted(sum(1 for o, _e in held.values() if o == w) for w in live)
        if counts == sorted(want) and all(o in live for o, _e in held.values()):
            return held
        assert time.monotonic() < deadline, f"shares {counts} != {want}: {held}"
        await asyncio.sleep(0.05)


async def advanced(db: ReadDatabase, parts: list[int], timeout: float = 30) -> None:
    """Wait (bounded) until each of ``parts`` applied events past where it stands now:
    the partitions that moved are consumed by their new owners, under load."""
    start = {r.partition: r.position for r in await partition_status(db, "balances")}
    deadline = time.monotonic() + timeout
    while True:
        now = {r.partition: r.position for r in await partition_status(db, "balances")}
        behind = [p for p in parts if now[p] <= start[p]]
        if not behind:
            return
        assert time.monotonic() < deadline, f"partitions {behind} made no progress after moving"
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nats", "redis", "rabbitmq", "log"])
async def test_rebalancing_under_load(
    kind: str, tmp_path: Path, pg_read: tuple[str, ReadDatabase]
) -> None:
    read_spec, db = pg_read
    path = str(tmp_path / "log.db")
    await seed(path)
    logs = tmp_path / "procs.log"
    server: OwnServer | None = None
    relay: Any = None
    url = ""
    name = f"cqrskit_r{uuid.uuid4().hex[:10]}"
    if kind == "rabbitmq":
        require_service("rabbitmq")
        url = "amqp://guest:guest@127.0.0.1:5672/"
    elif kind in ("nats", "redis"):
        need_binary(f"{kind}-server")
        own: NatsServer | RedisServer = NatsServer() if kind == "nats" else RedisServer()
        own.start()
        server, url = own, own.url
    if kind != "log":
        relay = spawn("relay", path, kind, url, name, str(PARTITIONS), log=logs)

    def start(owner: str) -> Any:
        if kind != "log":
            return spawn("consumer", kind, url, name, str(PARTITIONS), read_spec, owner,
                         log=logs)  # fmt: skip
        return spawn("projector", path, str(PARTITIONS), read_spec, owner, log=logs)

    writers = [
        spawn("writer", path, str(w), str(MOST_PER_WRITER), str(ACCOUNTS), PACE, log=logs)
        for w in range(1, WRITERS + 1)
    ]
    workers = {"w0": start("w0")}
    try:
        first = await shares(db, ["w0"], [PARTITIONS])
        workers["w1"] = start("w1")
        workers["w2"] = start("w2")
        second = await shares(db, ["w0", "w1", "w2"], [3, 3, 2])
        moved = [p for p in second if second[p][0] != "w0"]
        # 5 move; on a starved machine a 1 s lease may also lapse and move back and forth
        assert len(moved) >= 5, second
        assert all(second[p][1] > first[p][1] for p in moved)
        await advanced(db, moved)
        await stop_all([workers.pop("w1")])
        third = await shares(db, ["w0", "w2"], [4, 4])
        from_w1 = [p for p in third if second[p][0] == "w1"]
        assert from_w1, second
        assert all(third[p][1] > second[p][1] for p in from_w1)
        await advanced(db, from_w1)
        assert all(w.poll() is None for w in writers), f"a writer ended early: see {logs}"
        written = await stop_all(writers)  # under load until here
        assert [w.returncode for w in writers] == [0] * WRITERS, f"see {logs}"
        assert all(c.get("done", 0) > 0 for c in written), written
        want = replay(path)
        store = SqliteTestLog(path)
        try:
            deadline = time.monotonic() + 60
            while True:
                rows = await partition_status(db, "balances", store)
                if rows and all(r.lag_events == 0 for r in rows):
                    break
                assert time.monotonic() < deadline, f"stuck: {rows}"
                await asyncio.sleep(0.1)
        finally:
            store.close()
        got, order_errors = await read_model(db)
        lost = sum(max(0, w[1] - got.get(k, (0, 0, 0))[1]) for k, w in want.items())
        double = sum(max(0, g[1] - want.get(k, (0, 0, 0))[1]) for k, g in got.items())
        ledger.check_invariants(
            f"rebalancing {kind}", {"lost": lost, "double": double, "reordered": order_errors}
        )
        assert got == want
        assert sum(b for b, _n, _v in got.values()) == SEED * ACCOUNTS
        assert order_errors == 0
        print(
            f"\nrebalancing [{kind}]: 1 -> 3 -> 2 workers under {WRITERS} writers; "
            f"{sum(n for _b, n, _v in got.values())} events applied, 0 reordered"
        )
    finally:
        procs = [*workers.values(), *writers] + ([relay] if relay is not None else [])
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except Exception:
                p.kill()
                p.wait(10)
        if server is not None:
            server.close()
        if kind == "rabbitmq":
            await rabbit_delete(url, name, PARTITIONS)
