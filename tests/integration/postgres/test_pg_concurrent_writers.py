"""8 writer processes x 200 commands while a reader tails the log by position.

Checks: every acknowledged command's event is in the log exactly once and nothing else is;
per-stream versions are 1..n without holes; state rows match; and the reader that tailed the
log *during* the writes saw exactly the final log, in order (no event skipped).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import asyncpg
import pytest

from cqrskit.eventlog import StoredEvent
from cqrskit.postgres import PostgresEventStore

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PROCS = 8
COMMANDS = 200
WRITER = Path(__file__).with_name("pg_writer_proc.py")


async def test_eight_processes_exactly_once_contiguous(postgres_dsn: str, pg_schema: str) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f'CREATE TABLE "{pg_schema}".state (key text PRIMARY KEY)')
        src = str(Path(__file__).resolve().parents[3] / "src")
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(WRITER),
                postgres_dsn,
                pg_schema,
                str(p),
                str(COMMANDS),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
            )
            for p in range(PROCS)
        ]
        tail: list[StoredEvent] = []
        done = asyncio.ensure_future(
            asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 240)
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 240
        # tail while the writers run, and until the tail has something (bounded)
        while (not done.done() or not tail) and loop.time() < deadline:
            tail.extend(await store.read_after(tail[-1].position if tail else 0, 500))
            await store.wait_for(tail[-1].position if tail else 0, 0.05)
        outputs = await done
        for p, (_out, err) in zip(procs, outputs, strict=True):
            assert p.returncode == 0, err.decode()[-2000:]
        acked = [line for out, _ in outputs for line in out.decode().split()]
        assert len(acked) == PROCS * COMMANDS
        full: list[StoredEvent] = []
        for _ in range(100):
            batch = await store.read_after(full[-1].position if full else 0, 1000)
            if not batch:
                break
            full.extend(batch)
        # the reader may still be held back by another open transaction: wait it out
        last = await conn.fetchval(f'SELECT max(position) FROM "{pg_schema}".cqrskit_events')
        for _ in range(200):
            if full and full[-1].position == last:
                break
            await store.wait_for(full[-1].position if full else 0, 0.05)
            full.extend(await store.read_after(full[-1].position if full else 0, 1000))
        ids = Counter(json.loads(e.data)["cmd_id"] for e in full)
        assert set(ids) == set(acked)
        assert max(ids.values()) == 1
        positions = [e.position for e in full]
        assert positions == sorted(positions)
        assert len(set(positions)) == len(positions)
        versions: dict[str, list[int]] = defaultdict(list)
        for e in full:
            versions[e.stream].append(e.version)
        for stream, vs in versions.items():
            assert vs == list(range(1, len(vs) + 1)), stream
        assert len(versions) == PROCS + 4
        state = {r[0] for r in await conn.fetch(f'SELECT key FROM "{pg_schema}".state')}
        assert state == set(acked)
        # the tail read concurrently with the writers is a prefix of the final log
        assert [e.position for e in tail] == positions[: len(tail)]
        assert len(tail) > 0
    finally:
        await conn.close()
        await store.close()
