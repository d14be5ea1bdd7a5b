"""What SQLite's WAL checkpoints cost a command loop, and what moving them off it gives.

Each case runs N transactions back to back (``synchronous=NORMAL``, WAL, files in a
temporary directory on the machine's disk: ``--dir`` to choose) and times each one:

* ``raw, SQLite's checkpoints``: raw ``sqlite3``, BEGIN IMMEDIATE, the state row and an
  outbox-like row, COMMIT; the default ``wal_autocheckpoint`` (1,000 pages), so the commit
  that fills the WAL runs the checkpoint and its ``fsync`` calls;
* ``raw, checkpointed as the store does``: the same with ``wal_autocheckpoint`` at 4,000
  pages and a :class:`cqrskit.sqlite.WalCheckpointer` poked every 256 commits;
* ``store, background_checkpoints=False`` / ``=True``: ``SqliteEventStore``, a unit of work
  per command (the state row through ``uow.connection``, one event into a new stream).

Reported per case: transactions/s, the median, p99 and longest transaction (µs), and the
share of the total time spent in transactions slower than ten times the median (the
checkpoints, as nothing else on the path waits for the disk), and the WAL's peak size in
pages. For the store, another task runs on the event loop between every 8 commands (as a
web app's other requests would): the gaps of over 5 ms between its turns are the event
loop's stalls. A command parked while the WAL starts over waits without stalling the loop,
so its time can exceed the loop's longest stall.

    python benchmarks/sqlite_checkpoints.py [--n 30000] [--rounds 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from cqrskit import Event
from cqrskit.sqlite import SqliteEventStore, WalCheckpointer
from cqrskit.sqlite._checkpoint import WRITER_AUTOCHECKPOINT


@dataclass(frozen=True, slots=True)
class Deposited(Event):
    key: str
    amount: int


@dataclass
class Result:
    case: str
    rate: float
    median_us: float
    p99_us: float
    max_us: float
    slow_share: float
    wal_peak: int
    loop_stalls: int = -1  # gaps over 5 ms between the other task's turns (store cases)
    loop_longest_ms: float = -1.0

    def row(self) -> str:
        stalls = (
            "—"
            if self.loop_stalls < 0
            else f"{self.loop_stalls} (longest {self.loop_longest_ms:.1f} ms)"
        )
        return (
            f"| {self.case} | {self.rate:,.0f} | {self.median_us:.1f} | {self.p99_us:.0f} "
            f"| {self.max_us:,.0f} | {self.slow_share:.0%} | {self.wal_peak:,} | {stalls} |"
        )


def _summary(case: str, times: list[float], wall: float, wal_peak: int) -> Result:
    times = sorted(times)
    median = times[len(times) // 2]
    slow = sum(t for t in times if t > 10 * median)
    return Result(
        case,
        len(times) / wall,
        median * 1e6,
        times[int(len(times) * 0.99)] * 1e6,
        times[-1] * 1e6,
        slow / sum(times),
        wal_peak,
    )


def _wal_pages(path: str) -> int:
    try:
        return max(0, (os.path.getsize(path + "-wal") - 32) // (4096 + 24))
    except FileNotFoundError:
        return 0


def raw(directory: str, n: int, background: bool) -> Result:
    path = os.path.join(directory, f"raw-{background}.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE state (key TEXT PRIMARY KEY, amount INTEGER)")
    conn.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, type TEXT NOT NULL, payload TEXT)")
    checkpointer = None
    if background:
        conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT}")
        checkpointer = WalCheckpointer(path, synchronous="NORMAL", busy_ms=5000)
    left = 256
    times: list[float] = []
    clock = time.perf_counter
    peak = 0
    start = clock()
    for i in range(n):
        key = f"k{i}"
        t = clock()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO state VALUES (?, ?)", (key, 5))
        conn.execute(
            "INSERT INTO outbox (type, payload) VALUES (?, ?)",
            ("Deposited", json.dumps({"key": key, "amount": 5})),
        )
        conn.execute("COMMIT")
        if checkpointer is not None:
            left -= 1
            if not left:
                left = 256
                checkpointer.poke()
        times.append(clock() - t)
        if i % 500 == 0:
            peak = max(peak, _wal_pages(path))
    wall = clock() - start
    if checkpointer is not None:
        checkpointer.close()
    conn.close()
    what = "passive checkpoints on the store's thread" if background else "SQLite's checkpoints"
    return _summary(f"raw `sqlite3`, {what}", times, wall, peak)


async def store(directory: str, n: int, background: bool) -> Result:
    path = os.path.join(directory, f"store-{background}.db")
    events = SqliteEventStore(path, background_checkpoints=background)
    events._writer.execute("CREATE TABLE state (key TEXT PRIMARY KEY, amount INTEGER)")
    times: list[float] = []
    gaps: list[float] = []
    clock = time.perf_counter
    peak = 0
    done = False

    async def ticker() -> None:
        # another task on the loop, as a web app's other requests: the gaps between its
        # turns are how long the loop could run nothing else
        last = clock()
        while not done:
            await asyncio.sleep(0)
            now = clock()
            gaps.append(now - last)
            last = now

    other = asyncio.ensure_future(ticker())
    start = clock()
    for i in range(n):
        key = f"k{i}"
        t = clock()
        uow = await events.begin()
        uow.connection.execute("INSERT INTO state VALUES (?, ?)", (key, 5))
        uow.record(key, Deposited(key, 5), expected_version=0)
        await uow.commit()
        times.append(clock() - t)
        if i % 8 == 7:
            await asyncio.sleep(0)  # the other task's turn
        if i % 500 == 0:
            peak = max(peak, _wal_pages(path))
    wall = clock() - start
    done = True
    await other
    events.close()
    result = _summary(f"`SqliteEventStore`, background_checkpoints={background}", times, wall, peak)
    result.loop_stalls = sum(1 for g in gaps if g > 0.005)
    result.loop_longest_ms = max(gaps) * 1000
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the database files go (default /tmp)")
    args = parser.parse_args()
    cases: list[Callable[[str], Result]] = [
        lambda d: raw(d, args.n, False),
        lambda d: raw(d, args.n, True),
        lambda d: asyncio.run(store(d, args.n, False)),
        lambda d: asyncio.run(store(d, args.n, True)),
    ]
    print(f"\n### WAL checkpoints, {args.n:,} transactions per case, {args.rounds} rounds\n")
    print(
        "| case | transactions/s | median µs | p99 µs | longest µs "
        "| time in transactions > 10× median | WAL peak (pages) | event loop stalls > 5 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for _ in range(args.rounds):
        for case in cases:
            with tempfile.TemporaryDirectory(dir=args.dir) as directory:
                print(case(directory).row(), flush=True)


if __name__ == "__main__":
    main()
