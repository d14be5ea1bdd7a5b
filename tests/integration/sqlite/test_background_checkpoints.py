"""SqliteEventStore copies its WAL into the database file on a thread of its own.

The commit that fills SQLite's WAL to 1,000 pages runs the checkpoint itself by default,
with two ``fsync`` calls on the event loop's thread. The store instead runs passive
checkpoints on a daemon thread every 256 commits, starts the WAL over at RESTART_AT pages
while the next command awaits (parked, the loop free), and lets the writer checkpoint by
itself only at WRITER_AUTOCHECKPOINT pages, which bounds the WAL.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.support.bank import Deposited, serializer
from tests.support.faults import check_invariants, send_signal

from cqrskit.sqlite import SqliteEventStore, SqliteReadDatabase, WalCheckpointer
from cqrskit.sqlite import _checkpoint as checkpoint_module
from cqrskit.sqlite._checkpoint import WRITER_AUTOCHECKPOINT

ROOT = Path(__file__).resolve().parents[3]


async def _commit(store: SqliteEventStore, count: int, prefix: str = "s") -> None:
    for i in range(count):
        uow = await store.begin()
        uow.connection.execute("INSERT INTO state VALUES (?, ?)", (f"{prefix}{i}", i))
        uow.record(f"{prefix}{i}", Deposited(f"{prefix}{i}", i), expected_version=0)
        await uow.commit()


def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.005)


def _store(path: Path, **kwargs: object) -> SqliteEventStore:
    store = SqliteEventStore(path, encoder=serializer.encode, **kwargs)  # type: ignore[arg-type]
    store._writer.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, n INTEGER)")
    return store


async def _started(path: Path) -> tuple[SqliteEventStore, WalCheckpointer]:
    """A store whose checkpoint thread runs (started by its first ``every`` commits)."""
    store = _store(path)
    checkpointer = store.checkpointer
    assert checkpointer is not None
    await _commit(store, checkpointer.every, prefix="warm")
    _until(lambda: checkpointer.running)
    return store, checkpointer


def _checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cqrskit-sqlite-checkpoint")]


async def test_the_wal_is_copied_by_a_thread_of_the_stores_own(tmp_path: Path) -> None:
    before = set(_checkpoint_threads())
    store = _store(tmp_path / "log.db")
    try:
        checkpointer = store.checkpointer
        assert checkpointer is not None
        assert store._writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == (
            WRITER_AUTOCHECKPOINT
        )
        await _commit(store, checkpointer.every - 1)
        assert not checkpointer.running  # started by the first poke only
        await _commit(store, 2 * checkpointer.every + 1, prefix="t")
        _until(lambda: checkpointer.checkpoints >= 1)
        assert checkpointer.running
        assert checkpointer.failures == 0
        assert checkpointer.last_result is not None
        _busy, frames, copied = checkpointer.last_result
        assert frames > 0, checkpointer.last_result
        assert copied > 0, checkpointer.last_result
        # nothing lost: every command is there, read through a fresh connection
        fresh = sqlite3.connect(store.path)
        try:
            assert fresh.execute("SELECT count(*) FROM cqrskit_events").fetchone()[0] == (
                3 * checkpointer.every
            )
            assert fresh.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            fresh.close()
    finally:
        store.close()
    assert not checkpointer.running
    assert set(_checkpoint_threads()) <= before


async def test_the_wal_stays_bounded_under_a_steady_stream_of_commits(tmp_path: Path) -> None:
    # a passive checkpoint cannot copy what is committed while it runs, so the WAL only
    # starts over because the thread restarts it (writers parked) or the writer still
    # checkpoints at WRITER_AUTOCHECKPOINT pages; without both these commits (~4 pages
    # each) would grow it to ~44,000 pages. The bound is soft (a reader holds the WAL).
    store = _store(tmp_path / "log.db")
    try:
        await _commit(store, 10_000)
        page = store._writer.execute("PRAGMA page_size").fetchone()[0]
        frames = (os.path.getsize(store.path + "-wal") - 32) // (page + 24)
        assert store.checkpointer is not None
        assert store.checkpointer.checkpoints >= 1
        assert frames <= 3 * WRITER_AUTOCHECKPOINT, frames
    finally:
        store.close()


async def test_background_checkpoints_false_keeps_sqlites_default(tmp_path: Path) -> None:
    before = set(_checkpoint_threads())
    store = _store(tmp_path / "log.db", background_checkpoints=False)
    try:
        assert store.checkpointer is None
        assert store._writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
        await _commit(store, 600)
        assert set(_checkpoint_threads()) <= before
    finally:
        store.close()


async def test_write_connection_blocks_count_as_commits(tmp_path: Path) -> None:
    store = _store(tmp_path / "log.db")
    try:
        checkpointer = store.checkpointer
        assert checkpointer is not None
        for i in range(checkpointer.every):
            async with store.write_connection() as conn:
                conn.execute("INSERT INTO state VALUES (?, ?)", (f"w{i}", i))
        _until(lambda: checkpointer.checkpoints >= 1)
    finally:
        store.close()


def test_a_checkpointer_that_cannot_open_the_file_says_so_and_tries_again_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "missing.db"  # opened with mode=rw: never created
    checkpointer = WalCheckpointer(missing, synchronous="NORMAL", busy_ms=100, every=1)
    with caplog.at_level(logging.WARNING, logger="cqrskit.sqlite"):
        checkpointer.poke()
        _until(lambda: checkpointer.failures == 1 and not checkpointer.running)
        checkpointer.poke()  # a new thread tries again; no second warning
        _until(lambda: checkpointer.failures == 2 and not checkpointer.running)
    assert isinstance(checkpointer.last_error, sqlite3.Error)
    assert checkpointer.checkpoints == 0
    assert not missing.exists()
    warnings = [r for r in caplog.records if "background WAL checkpoints" in r.getMessage()]
    assert len(warnings) == 1, caplog.records
    checkpointer.close()


async def test_a_thread_that_cannot_start_fails_no_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("cqrskit-sqlite-checkpoint"):
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    store = _store(tmp_path / "log.db")
    try:
        checkpointer = store.checkpointer
        assert checkpointer is not None
        await _commit(store, checkpointer.every + 1)  # the poke's failure stays inside
        assert checkpointer.failures == 1
        assert isinstance(checkpointer.last_error, RuntimeError)
        assert not store._write_lock.held
        uow = await store.begin()  # the write lock was released
        await uow.rollback()
    finally:
        store.close()


@pytest.mark.parametrize(("synchronous", "level"), [("NORMAL", 1), ("FULL", 2)])
async def test_the_checkpoint_syncs_as_the_store_does(
    tmp_path: Path, synchronous: str, level: int
) -> None:
    # the thread's checkpoint decides the fsyncs of what it copies: with OFF the WAL
    # could start over before the database file's new pages reached the disk
    store = _store(tmp_path / "log.db", synchronous=synchronous)
    try:
        checkpointer = store.checkpointer
        assert checkpointer is not None
        await _commit(store, checkpointer.every)
        _until(lambda: checkpointer.synchronous is not None)
        assert checkpointer.synchronous == level
    finally:
        store.close()


async def test_a_relative_path_stays_the_stores_file_after_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    store = _store(Path("log.db"))
    try:
        checkpointer = store.checkpointer
        assert checkpointer is not None
        monkeypatch.chdir(tmp_path / "elsewhere")
        await _commit(store, checkpointer.every)
        _until(lambda: checkpointer.checkpoints >= 1)
        assert checkpointer.last_result is not None
        assert checkpointer.last_result[1] > 0  # frames of the store's own WAL
        assert not (tmp_path / "elsewhere" / "log.db").exists()
    finally:
        store.close()


async def test_a_store_dropped_without_close_does_not_leave_its_thread(tmp_path: Path) -> None:
    store, checkpointer = await _started(tmp_path / "log.db")
    store._writer.close()
    store._reader.close()
    del store
    gc.collect()
    _until(lambda: not checkpointer.running)


def test_every_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every must be >= 1"):
        WalCheckpointer(str(tmp_path / "x.db"), synchronous="NORMAL", busy_ms=100, every=0)


WRITER = """
import asyncio, sys
from cqrskit.sqlite import SqliteEventStore, WalCheckpointer
from tests.support.bank import Deposited, serializer

real_park = WalCheckpointer.park

async def park(self):
    print("parked", flush=True)  # the thread starts the WAL over now
    await real_park(self)

WalCheckpointer.park = park

async def main():
    store = SqliteEventStore(sys.argv[1], encoder=serializer.encode)
    store.checkpointer.every = 16  # checkpoints all the time: a kill lands inside some
    store._writer.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, n INTEGER)")
    start = int(sys.argv[2])
    for i in range(start, start + 1_000_000):
        uow = await store.begin()
        uow.connection.execute("INSERT INTO state VALUES (?, ?)", (f"k{i}", i))
        uow.record(f"k{i}", Deposited(f"k{i}", i), expected_version=0)
        await uow.commit()
        print(i, flush=True)  # acknowledged: committed

asyncio.run(main())
"""


def test_sigkill_while_checkpointing_in_the_background_loses_no_commit(tmp_path: Path) -> None:
    path = str(tmp_path / "log.db")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    rng = random.Random(12)
    acknowledged: list[int] = []
    at_restart = 0
    for round_ in range(6):
        start = round_ * 1_000_000  # a commit in flight at the kill may have landed
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, path, str(start)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            # even rounds: after a random number of acknowledged commits; odd rounds: at
            # a command parked for a WAL restart (the thread's RESTART under way)
            target = rng.randrange(300, 1500)
            got = 0
            while True:
                line = proc.stdout.readline().strip()
                assert line, "the writer ended early"
                if line == b"parked":
                    if round_ % 2 and got >= 100:
                        at_restart += 1
                        break
                    continue
                acknowledged.append(int(line))
                got += 1
                if round_ % 2 == 0 and got >= target:
                    break
            assert send_signal(proc, 9)
            proc.wait(10)
            rest = proc.stdout.read()  # acknowledged before the kill landed
            acknowledged += [int(x) for x in rest.split() if x != b"parked"]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            proc.stdout.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        keys = {k for (k,) in conn.execute("SELECT key FROM state")}
        streams = [
            s for (s,) in conn.execute("SELECT stream FROM cqrskit_events ORDER BY position")
        ]
    finally:
        conn.close()
    logged = set(streams)
    lost = sum(1 for i in acknowledged if f"k{i}" not in keys or f"k{i}" not in logged)
    double = len(streams) - len(set(streams))
    order = [int(s[1:]) for s in streams]
    reordered = sum(1 for a, b in itertools.pairwise(order) if b <= a)
    result = check_invariants(
        "sqlite background checkpoints", {"lost": lost, "double": double, "reordered": reordered}
    )
    assert result == {"lost": 0, "double": 0, "reordered": 0}
    assert len(acknowledged) >= 3 * 300 + 3 * 100
    assert at_restart == 3


async def test_a_read_database_on_the_stores_file_does_not_checkpoint_at_1000_pages(
    tmp_path: Path,
) -> None:
    # the store keeps the WAL between 0 and WRITER_AUTOCHECKPOINT pages; a projector's
    # connection at SQLite's default would run a checkpoint in most of its commits
    store = _store(tmp_path / "log.db")
    db = SqliteReadDatabase(str(tmp_path / "log.db"))
    try:
        async with db.transaction() as session:
            await session.execute("CREATE TABLE IF NOT EXISTS balances (k TEXT PRIMARY KEY)")
        writer = db._writer
        assert writer is not None
        assert writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WRITER_AUTOCHECKPOINT
    finally:
        await db.close()
        store.close()


async def test_a_read_database_in_a_file_of_its_own_keeps_sqlites_default(
    tmp_path: Path,
) -> None:
    db = SqliteReadDatabase(str(tmp_path / "read.db"))
    try:
        async with db.transaction() as session:
            await session.execute("CREATE TABLE IF NOT EXISTS balances (k TEXT PRIMARY KEY)")
        writer = db._writer
        assert writer is not None
        assert writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    finally:
        await db.close()


async def test_the_thread_starts_the_wal_over_while_the_writers_wait_on_the_loop(
    tmp_path: Path,
) -> None:
    # at RESTART_AT pages the thread parks the next command (an await, not a blocked
    # loop) and runs wal_checkpoint(RESTART); the WAL then starts over from its first
    # page instead of waiting for the writer's own checkpoint at WRITER_AUTOCHECKPOINT
    store = _store(tmp_path / "log.db")
    ticks = 0
    done = False

    async def ticker() -> None:  # another task: it runs while a command is parked
        nonlocal ticks
        while not done:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.ensure_future(ticker())
    try:
        checkpointer = store.checkpointer
        assert checkpointer is not None
        await _commit(store, 3000)
        assert checkpointer.restarts >= 1, (checkpointer.restarts, checkpointer.last_result)
        assert checkpointer.late == 0
        assert checkpointer.pause is None
        assert not store._write_lock.held
    finally:
        done = True
        await task
        store.close()
    assert ticks > 0


async def test_a_parked_command_goes_on_when_the_thread_never_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint_module, "_PARK_TIMEOUT", 0.05)
    store, checkpointer = await _started(tmp_path / "log.db")
    try:
        checkpointer.pause = threading.Event()  # as if the thread asked, then hung
        await _commit(store, 1)  # parks 0.05 s, then commits
        assert checkpointer.pause.is_set()
        assert checkpointer.late == 1
        fresh = sqlite3.connect(store.path)
        try:
            count = fresh.execute("SELECT count(*) FROM cqrskit_events").fetchone()[0]
            assert count == checkpointer.every + 1
        finally:
            fresh.close()
    finally:
        store.close()


async def test_a_parked_command_cancelled_releases_the_write_lock(tmp_path: Path) -> None:
    store, checkpointer = await _started(tmp_path / "log.db")
    try:
        checkpointer.pause = threading.Event()
        parked = asyncio.ensure_future(store.begin())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert checkpointer.pause.is_set()  # it is parked
        parked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await parked
        assert not store._write_lock.held
        checkpointer.pause = None
        await _commit(store, 1)
    finally:
        store.close()


async def test_a_reader_holding_the_wal_is_not_waited_for_every_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[int] = []
    real_restart = WalCheckpointer._restart

    def counted(self: WalCheckpointer, conn: sqlite3.Connection) -> bool:
        attempts.append(1)
        return real_restart(self, conn)

    monkeypatch.setattr(WalCheckpointer, "_restart", counted)
    store = _store(tmp_path / "log.db")
    reader = sqlite3.connect(store.path, isolation_level=None)
    try:
        checkpointer = store.checkpointer
        assert checkpointer is not None
        await _commit(store, 100, prefix="a")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM cqrskit_events").fetchone()  # a snapshot
        await _commit(store, 1500, prefix="b")  # past RESTART_AT while the reader holds on
        _until(lambda: checkpointer.checkpoints >= 4)
        # the passive checkpoints cannot copy past the reader's snapshot: no restart is
        # tried (each would park a command and wait 200 ms for the reader, every turn)
        assert checkpointer.last_result is not None
        assert checkpointer.last_result[2] < checkpointer.last_result[1]
        assert attempts == []
        assert checkpointer.late == 0
        reader.execute("COMMIT")
        await _commit(store, 10, prefix="c")  # nothing stuck
        assert not store._write_lock.held
    finally:
        reader.close()
        store.close()


def test_a_store_used_from_one_event_loop_after_another_parks_on_the_right_one(
    tmp_path: Path,
) -> None:
    # the thread resolves the parked command's future on that command's own loop
    store = _store(tmp_path / "log.db")
    try:
        checkpointer = store.checkpointer
        assert checkpointer is not None
        asyncio.run(_commit(store, 600, prefix="first"))
        asyncio.run(_commit(store, 3000, prefix="second"))
        assert checkpointer.restarts >= 1
        assert checkpointer.late == 0
    finally:
        store.close()


async def test_a_command_parks_only_while_the_thread_lives(tmp_path: Path) -> None:
    # a forked child inherits a pause its parent's thread set, and no thread to lift it
    store = _store(tmp_path / "log.db")
    try:
        checkpointer = store.checkpointer
        assert checkpointer is not None
        assert not checkpointer.running
        checkpointer.pause = threading.Event()
        await _commit(store, 1)  # does not wait 5 s for nobody
        assert checkpointer.pause is None
        assert checkpointer.late == 0
    finally:
        store.close()


async def test_close_wakes_a_thread_that_waits_for_a_command_to_park(tmp_path: Path) -> None:
    store, checkpointer = await _started(tmp_path / "log.db")
    pause = checkpointer.pause = threading.Event()  # as while the thread waits (1 s)
    store.close()
    assert pause.is_set()  # its wait ends now, not after a second on the event loop
