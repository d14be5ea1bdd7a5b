"""Opening a SqliteEventStore while another process recovers the WAL of a crashed one.

A process writes a large WAL and is SIGKILLed; then several processes open the store at the
same moment. The first one to open rebuilds the WAL index (recovery) and holds the
database's locks meanwhile; the others must wait for it and succeed, not fail with
``database is locked`` (the store's write connection has a busy timeout of 0, so before
the fix its set-up PRAGMAs failed at once).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
OPENERS = 8

FILL = """
import sqlite3, sys, time
from cqrskit.sqlite import SqliteEventStore
SqliteEventStore(sys.argv[1]).close()
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA journal_mode = WAL")
c.execute("PRAGMA wal_autocheckpoint = 0")
c.execute("CREATE TABLE filler (x TEXT)")
c.execute("BEGIN")
c.executemany("INSERT INTO filler VALUES (?)", (("x" * 200,) for _ in range(150_000)))
c.execute("COMMIT")
print("ready", flush=True)
time.sleep(120)
"""

OPEN = """
import asyncio, sys, time
from cqrskit.sqlite import SqliteEventStore
from tests.support.bank import Deposited, serializer
start = float(sys.argv[2])
while time.time() < start:  # every opener starts at the same moment (load, not sync)
    pass
try:
    store = SqliteEventStore(sys.argv[1], encoder=serializer.encode)
except Exception as exc:
    print("FAILED", type(exc).__name__, exc, flush=True)
    sys.exit(0)
async def main():
    uow = await store.begin()
    uow.record("opener-" + sys.argv[3], Deposited("opener", 1))
    await uow.commit()
asyncio.run(main())
store.close()
print("OK", flush=True)
"""


def test_every_opener_waits_for_wal_recovery_instead_of_failing(tmp_path: Path) -> None:
    path = str(tmp_path / "log.db")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    filler = subprocess.Popen(
        [sys.executable, "-c", FILL, path], cwd=ROOT, env=env, stdout=subprocess.PIPE
    )
    try:
        assert filler.stdout is not None
        assert filler.stdout.readline().strip() == b"ready"
        wal = os.path.getsize(path + "-wal")
        assert wal > 20_000_000  # recovery has to read all of it
    finally:
        filler.kill()
        filler.wait(10)
        if filler.stdout is not None:
            filler.stdout.close()
    start = time.time() + 1.0
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN, path, repr(start), str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(OPENERS)
    ]
    outcomes = [p.communicate(timeout=60) for p in openers]
    lines = [out.strip() or err.strip()[-300:] for out, err in outcomes]
    assert lines == ["OK"] * OPENERS, lines
    conn = sqlite3.connect(path)
    try:
        count = conn.execute(
            "SELECT count(*) FROM cqrskit_events WHERE stream LIKE 'opener-%'"
        ).fetchone()[0]
    finally:
        conn.close()
    assert count == OPENERS
