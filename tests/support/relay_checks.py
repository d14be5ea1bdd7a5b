"""Helpers for relay fault tests: relay and writer subprocesses, what the log and the broker
hold, and the count/sum/order check of the broker's content against the log."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import IN_CI
from tests.support.brokers import nats_read, rabbit_take, redis_read
from tests.support.relay_procs import PARTITIONS

from cqrskit.messaging import Envelope

ROOT = Path(__file__).resolve().parents[2]

LogRow = tuple[int, str, int, int, str]  # position, stream, version, amount, message id


def need_binary(name: str) -> None:
    """Skip (laptop) or fail (CI=true) when a server binary is missing."""
    if shutil.which(name):
        return
    if IN_CI:
        pytest.fail(f"{name} is not installed; under CI=true that is a failure", pytrace=False)
    pytest.skip(f"{name} is not installed")


def spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """``python -m tests.support.relay_procs ARGS`` with stderr appended to ``log``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.support.relay_procs", *args],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip


def relay_checkpoint(path: str) -> int:
    """The relay's committed checkpoint in the SQLite state database (0 before set-up)."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        row = conn.execute(
            "SELECT position FROM cqrskit_checkpoints WHERE projection = 'relay'"
        ).fetchone()
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()
    return int(row[0]) if row else 0


def lease_beat(path: str) -> int:
    """The relay's lease heartbeat counter (it beats while the relay loop runs)."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        row = conn.execute(
            "SELECT lease_beat FROM cqrskit_projections WHERE name = 'relay'"
        ).fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else 0


def log_head(path: str) -> int:
    """The highest committed position of the SQLite log."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        return int(
            conn.execute("SELECT coalesce(max(position), 0) FROM cqrskit_events").fetchone()[0]
        )
    finally:
        conn.close()


def committed(path: str) -> list[LogRow]:
    """Every event of the SQLite log: (position, stream, version, amount, message id)."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        return [
            (int(p), s, int(v), int(json.loads(d)["amount"]), m)
            for p, s, v, d, m in conn.execute(
                "SELECT position, stream, version, data, message_id FROM cqrskit_events "
                "ORDER BY position"
            )
        ]
    finally:
        conn.close()


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` in KiB (``VmRSS`` in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


async def read_broker(broker: str, url: str, name: str) -> dict[int, list[Envelope]]:
    """What the broker holds per partition, decoded (RabbitMQ: drained and deleted)."""
    out: dict[int, list[Envelope]] = {}
    for p in range(PARTITIONS):
        raw: list[tuple[Mapping[str, Any], bytes]]
        if broker == "nats":
            raw = await nats_read(url, name.upper(), f"{name}.{p}")
        elif broker == "redis":
            raw = await redis_read(url, f"{name}:{p}")
        else:
            raw = await rabbit_drain(url, f"{name}.{p}")
        out[p] = [Envelope.from_wire(h, b) for h, b in raw]
    return out


async def rabbit_drain(url: str, queue_name: str) -> list[tuple[Mapping[str, Any], bytes]]:
    """Every message of a RabbitMQ queue, then the queue and its exchange deleted."""
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        # consumed, not basic.get: quorum queues with a single active consumer refuse it
        out = await rabbit_take(ch, queue_name)
        await ch.queue_delete(queue_name)
        await ch.exchange_delete(queue_name.rsplit(".", 1)[0])
        return out
    finally:
        await conn.close()


def check(held: dict[int, list[Envelope]], log: list[LogRow]) -> int:
    """Count/sum/order checks; returns how many duplicate copies the consumer drops."""
    dropped = 0
    kept: list[Envelope] = []
    for p, envs in held.items():
        first: dict[int, str] = {}
        for env in envs:
            assert env.partition == p
            if env.sequence in first:
                assert first[env.sequence] == env.message_id, "a sequence number was reused"
                dropped += 1
                continue
            assert env.sequence == len(first) + 1, f"partition {p}: gap before {env.sequence}"
            first[env.sequence] = env.message_id
            kept.append(env)
    assert len(kept) == len(log), f"broker holds {len(kept)} events, log has {len(log)}"
    by_id = {m: (pos, s, v, amount) for pos, s, v, amount, m in log}
    assert {e.message_id for e in kept} == set(by_id), "lost or unexpected events"
    assert sum(json.loads(e.payload)["amount"] for e in kept) == sum(r[3] for r in log)
    last: dict[str, int] = {}
    for env in sorted(kept, key=lambda e: (e.partition, e.sequence)):
        assert by_id[env.message_id][:3] == (env.position, env.stream, env.version)
        assert env.version == last.get(env.stream, 0) + 1, f"{env.stream} reordered"
        last[env.stream] = env.version
    return dropped
