"""A partitioned rebuild into another number of partitions with real processes: two writer
processes commit transfers to a SQLite log, two worker processes with N=2 serve the
``balances`` projection in PostgreSQL; ``cqrskit projections rebuild --partitions 3`` (a
process) asks for the change, two workers with N=3 build it (one is SIGKILLed and
restarted meanwhile) and switch over; the N=2 workers then exit with the error naming both
numbers. At the end the read model equals the replayed log: 0 lost, 0 double-applied,
0 reordered, the sum of balances unchanged."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.messaging.test_consumer_faults import (
    ACCOUNTS,
    ROOT,
    SEED,
    read_model,
    replay,
    seed,
    spawn,
    stop_all,
)
from tests.support import faults as ledger
from tests.support.sqlite_log import SqliteTestLog

from cqrskit.projections import ReadDatabase, partition_status, projection_status

WRITERS = 2
PER_WRITER = 500


async def wait_for(check: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(100_000):  # bounded by the deadline too
        value = check()  # type: ignore[operator]
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        await asyncio.sleep(0.1)  # other processes do the work: poll the database


async def generation(db: ReadDatabase, store: SqliteTestLog) -> tuple[int, int | None]:
    try:
        [st] = await projection_status(db, store, ["balances"])
    except Exception:
        return 0, None
    return st.generation, st.rebuilding


async def test_rebuild_into_more_partitions_with_worker_processes(
    tmp_path: Path, pg_read: tuple[str, ReadDatabase]
) -> None:
    spec, db = pg_read
    dsn, _, schema = spec.partition("#")
    path = str(tmp_path / "log.db")
    await seed(path)
    logs = tmp_path / "procs.log"
    store = SqliteTestLog(path)
    old = [spawn("projector", path, "2", spec, f"old{i}", log=logs) for i in range(2)]
    writers = [
        spawn("writer", path, str(w), str(PER_WRITER), str(ACCOUNTS), "0.02", log=logs)
        for w in range(1, WRITERS + 1)
    ]
    new: list[subprocess.Popen[bytes]] = []
    try:

        async def serving() -> bool:
            rows = await partition_status(db, "balances")
            return len(rows) == 2 and all(r.owner for r in rows)

        await wait_for(serving, "the N=2 workers serving")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "cqrskit", "projections", "rebuild", "--read", dsn,
             "--schema", schema, "--projection", "tests.support.bank:balances",
             "--partitions", "3"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert "rebuilding into generation 2 (3 partitions)" in cli.stdout
        assert "start workers with --partitions 3" in cli.stdout
        new = [spawn("projector", path, "3", spec, f"new{i}", log=logs) for i in range(2)]

        async def building() -> bool:
            rows = await partition_status(db, "balances", generation=2)
            return len(rows) == 3 and all(r.owner for r in rows) and rows[0].position > 0

        await wait_for(building, "the N=3 workers building")
        writing = sum(w.poll() is None for w in writers)
        ledger.send_signal(new[0], signal.SIGKILL)  # a builder dies mid-rebuild
        new[0].wait(10)
        new[0] = spawn("projector", path, "3", spec, "new0-again", log=logs)
        for w in writers:
            assert await asyncio.to_thread(w.wait, 120) == 0, f"a writer failed: see {logs}"

        async def switched() -> bool:
            return await generation(db, store) == (2, None)

        await wait_for(switched, "the switch to generation 2")
        assert writing > 0, "the writers were done before the rebuild: not under writes"
        for p in old:  # the N=2 workers stop by themselves, saying why
            assert await asyncio.to_thread(p.wait, 60) != 0
        errors = logs.read_text()
        assert "split into 3 partitions" in errors
        assert "started with 2" in errors
        want = replay(path)

        async def caught_up() -> bool:
            rows = await partition_status(db, "balances", store)
            return len(rows) == 3 and all(r.lag_events == 0 for r in rows)

        await wait_for(caught_up, "the new generation caught up")
        got, order_errors = await read_model(db)
        rows = await partition_status(db, "balances", store)
        await stop_all(new)
    finally:
        for p in [*old, *new, *writers]:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        store.close()
    assert [(r.partitions, r.generation) for r in rows] == [(3, 2)] * 3
    lost = sum(max(0, w[1] - got.get(s, (0, 0, 0))[1]) for s, w in want.items())
    double = sum(max(0, g[1] - want.get(s, (0, 0, 0))[1]) for s, g in got.items())
    print(f"\npartitioned rebuild with processes: {lost} lost, {double} double, {order_errors} "
          "reordered")  # fmt: skip
    assert (lost, double, order_errors) == (0, 0, 0)
    assert got == want
    assert sum(b for b, _n, _v in got.values()) == SEED * ACCOUNTS
