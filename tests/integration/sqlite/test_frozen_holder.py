"""Which lease holder a standby may end on SQLite (SqliteReadDatabase.end_frozen_writer):
only the very process that took the lease, only while the kernel shows it stopped, only
while it holds the file's write lock, and never with ``end_stopped_holder=False``."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.faults import send_signal

from cqrskit.projections import schema
from cqrskit.sqlite import SqliteReadDatabase
from cqrskit.sqlite.readdb import _write_lock_holder

pytestmark = pytest.mark.skipif(
    not Path("/proc/locks").exists(), reason="the frozen-holder check reads /proc/locks (Linux)"
)

# takes projection "p"'s lease (recording itself as the holder), then holds the write lock
_HOLDER = """
import asyncio, sys
from cqrskit.projections import schema
from cqrskit.sqlite import SqliteReadDatabase

async def main() -> None:
    db = SqliteReadDatabase(sys.argv[1])
    async with db.transaction() as s:
        await schema.install(s)
        await s.execute(
            "INSERT INTO cqrskit_projections (name, active_generation, mode) "
            "VALUES ('p', 1, 'async')"
        )
        row = await schema.load(s, "p")
        assert row is not None and await schema.take_lease(s, "p", "holder", row) == 1
    async with db.transaction():
        print("holding", flush=True)
        sys.stdin.readline()

asyncio.run(main())
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    path = str(tmp_path / "read.db")
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"holding\n"
        assert _write_lock_holder(path) == proc.pid
        yield path, proc
    finally:
        send_signal(proc, signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


async def _recorded(path: str) -> schema.LeaseHolder:
    db = SqliteReadDatabase(path)
    try:
        async with db.read_only() as s:
            found = await schema.lease_holder(s, "p")
    finally:
        await db.close()
    assert found is not None
    return found


def _stop(proc: subprocess.Popen[bytes]) -> None:
    assert send_signal(proc, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while (schema.process_state(proc.pid) or ("?",))[0] != "T":
        assert time.monotonic() < deadline, "the holder did not stop"
        time.sleep(0.01)  # polling the kernel's view of a signal just sent (bounded)


async def test_a_running_holder_is_never_ended(holder: tuple[str, subprocess.Popen[bytes]]) -> None:
    """The holder runs (a busy application, a blocked event loop, another component's long
    write): it frees the lock by itself and its lease is fenced, so it is left alone."""
    path, proc = holder
    found = await _recorded(path)
    assert found.pid == proc.pid
    db = SqliteReadDatabase(path)
    try:
        assert await db.end_frozen_writer(found.host, found.pid) is False
        await asyncio.sleep(0)
        assert proc.poll() is None, "a running lease holder was killed"
    finally:
        await db.close()


async def test_a_stopped_holder_is_ended_only_when_it_is_the_recorded_process(
    holder: tuple[str, subprocess.Popen[bytes]],
) -> None:
    path, proc = holder
    found = await _recorded(path)
    _stop(proc)
    db = SqliteReadDatabase(path)
    off = SqliteReadDatabase(path, end_stopped_holder=False)
    try:
        # another host, or the same pid in another container or reused by a later process
        host = found.host.split()[0]
        for other in (f"{host}-2", host, found.host.replace("start=", "start=9")):
            assert await db.end_frozen_writer(other, found.pid) is False, other
        # turned off: the standby waits for the stopped holder
        assert await off.end_frozen_writer(found.host, found.pid) is False
        assert proc.poll() is None
        assert await db.end_frozen_writer(found.host, found.pid) is True
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        await db.close()
        await off.close()
