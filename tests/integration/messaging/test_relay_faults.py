"""The relay under faults, with real processes and real brokers.

Four writer processes commit to a SQLite log while a relay process publishes it; the relay
is SIGKILLed at random (>= 10 times per run), the broker is restarted (own NATS / Redis
instance on a free port, same data directory, >= 2 times per run), and a TCP proxy drops
the broker's replies (publish acks) and then cuts the connection (>= 2 times per run). For
RabbitMQ (the shared node; a second node takes ~8 s to start) the proxy cuts stand in for
restarts. Afterwards the broker must hold every committed event exactly once per partition
sequence, in per-stream order: count, sum and order are checked. Each run prints one line
counting its faults.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import IN_CI, require_service
from tests.support import faults as ledger
from tests.support.brokers import NatsServer, OwnServer, RedisServer, nats_read, redis_read
from tests.support.proxy import FaultProxy, Mode
from tests.support.sqlite_log import SqliteTestLog

from cqrskit.messaging import Envelope

ROOT = Path(__file__).resolve().parents[3]
PARTITIONS = 4
WRITERS = 4
PER_WRITER = 250


def need_binary(name: str) -> None:
    if shutil.which(name):
        return
    if IN_CI:
        pytest.fail(f"{name} is not installed; under CI=true that is a failure", pytrace=False)
    pytest.skip(f"{name} is not installed")


def spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.support.relay_procs", *args],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip


def relay_checkpoint(path: str) -> int:
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


def committed(path: str) -> list[tuple[int, str, int, int, str]]:
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


async def read_broker(broker: str, url: str, name: str) -> dict[int, list[Envelope]]:
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
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        queue = await ch.declare_queue(queue_name, passive=True)
        out: list[tuple[Mapping[str, Any], bytes]] = []
        while (msg := await queue.get(no_ack=True, fail=False)) is not None:
            out.append((dict(msg.headers or {}), bytes(msg.body)))
        await queue.delete(if_unused=False, if_empty=False)
        await ch.exchange_delete(queue_name.rsplit(".", 1)[0])
        return out
    finally:
        await conn.close()


def check(held: dict[int, list[Envelope]], log: list[tuple[int, str, int, int, str]]) -> int:
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


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["nats", "redis", "rabbitmq"])
async def test_relay_survives_kills_broker_restarts_and_lost_acks(
    broker: str, tmp_path: Path
) -> None:
    server: OwnServer | None = None
    if broker == "rabbitmq":
        require_service("rabbitmq")
        target = 5672
    else:
        need_binary("nats-server" if broker == "nats" else "redis-server")
        server = NatsServer() if broker == "nats" else RedisServer()
        server.start()
        target = server.port
    proxy = FaultProxy("127.0.0.1", target, protocol="raw")
    await proxy.start()
    scheme = {"nats": "nats://", "redis": "redis://", "rabbitmq": "amqp://guest:guest@"}[broker]
    url = f"{scheme}127.0.0.1:{proxy.port}" + ("/0" if broker == "redis" else "/")
    direct = f"{scheme}127.0.0.1:{target}" + ("/0" if broker == "redis" else "/")
    name = f"cqrskit_f{uuid.uuid4().hex[:10]}"
    path = str(tmp_path / "log.db")
    SqliteTestLog(path).close()  # tables exist before the processes start
    rng = random.Random(os.environ.get("CQRSKIT_FAULT_SEED", "relay-faults"))
    faults = {"SIGKILL": 0, "broker restarts": 0, "dropped acks": 0, "connection cuts": 0}
    relay_log = tmp_path / "relay.log"
    relay = spawn("relay", path, broker, url, name, log=relay_log)
    writers = [
        spawn("writer", path, str(w), str(PER_WRITER), log=tmp_path / f"w{w}.log")
        for w in range(1, WRITERS + 1)
    ]
    try:
        for step in range(40):  # bounded: stops once every fault quota is met
            await asyncio.sleep(rng.uniform(0.1, 0.35))  # when the next fault strikes
            if step in (1, 4):
                proxy.mode = Mode.DROP_REPLIES  # publishes arrive, their acks are lost
                await asyncio.sleep(rng.uniform(1.0, 1.5))
                proxy.mode = Mode.RESET  # then the connection dies, as a lost ack's does
                proxy.mode = Mode.FORWARD
                faults["dropped acks"] += 1
            ledger.send_signal(relay, signal.SIGKILL)
            relay.wait(10)
            faults["SIGKILL"] += 1
            if step in (3, 8):
                if server is not None:
                    await asyncio.to_thread(server.restart)
                    faults["broker restarts"] += 1
                else:
                    proxy.reset_all()
                    faults["connection cuts"] += 1
            relay = spawn("relay", path, broker, url, name, log=relay_log)
            done = all(w.poll() is not None for w in writers)
            if done and faults["SIGKILL"] >= 10 and step >= 10:
                break
        for w in writers:
            assert w.wait(120) == 0, f"a writer failed: see {tmp_path}"
        log = committed(path)
        assert len(log) == WRITERS * PER_WRITER
        head = log[-1][0]
        deadline = time.monotonic() + 90
        while relay_checkpoint(path) < head:
            assert relay.poll() is None, relay_log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"relay stuck at {relay_checkpoint(path)} < {head}"
            await asyncio.sleep(0.05)
        relay.send_signal(signal.SIGTERM)
        relay.wait(20)
        held = await read_broker(broker, direct, name)
        dropped = check(held, log)  # asserts: none lost, none unexpected, order per stream
        ledger.check_invariants(f"relay {broker}", {"lost": 0, "double": 0, "reordered": 0})
        print(
            f"\nrelay faults [{broker}]: "
            + ", ".join(f"{v} {k}" for k, v in faults.items())
            + f", proxy dropped {proxy.dropped_replies} reply chunks; {len(log)} events, "
            f"{dropped} duplicate copies dropped by sequence"
        )
        assert faults["SIGKILL"] >= 10
        assert faults["dropped acks"] >= 2
        assert faults["broker restarts" if server else "connection cuts"] >= 2
    finally:
        for p in [relay, *writers]:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        await proxy.close()
        if server is not None:
            server.close()
