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
import os
import random
import signal
import time
import uuid
from pathlib import Path

import pytest
from tests.conftest import require_service
from tests.support.brokers import NatsServer, OwnServer, RedisServer
from tests.support.proxy import FaultProxy, Mode
from tests.support.relay_checks import (
    check,
    committed,
    need_binary,
    read_broker,
    relay_checkpoint,
    spawn,
)
from tests.support.sqlite_log import SqliteTestLog

PARTITIONS = 4
WRITERS = 4
PER_WRITER = 250


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
            relay.send_signal(signal.SIGKILL)
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
        dropped = check(held, log)
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
