"""The relay under faults, with real processes and real brokers.

Four writer processes commit to a SQLite log while a relay process publishes it; the relay
is SIGKILLed at random (>= 10 times per run), the broker is restarted (own NATS / Redis
instance on a free port, same data directory, >= 2 times per run), and a TCP proxy drops
the broker's replies (publish acks) while the relay has publishes in flight, until at
least 50 acks (10 RabbitMQ ack frames) were dropped, and then cuts the connection (>= 2
times per run). For RabbitMQ (the shared node; a second node takes ~8 s to start) the
proxy cuts stand in for restarts. Afterwards the broker must hold every committed event
exactly once per partition sequence, in per-stream order: count, sum and order are
checked. Each run prints one line counting its faults.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import require_service
from tests.support import faults as ledger
from tests.support.bank import Deposited
from tests.support.brokers import NatsServer, OwnServer, RedisServer
from tests.support.proxy import ACK_MARKERS, FaultProxy, Mode
from tests.support.relay_checks import (
    check,
    committed,
    need_binary,
    read_broker,
    relay_checkpoint,
    spawn,
)
from tests.support.sqlite_log import SqliteTestLog

WRITERS = 4
PER_WRITER = 250


# a lost-ack window lasts until at least this many acknowledgements were dropped (RabbitMQ
# counts Basic.Ack frames, and one frame may confirm several messages)
MIN_LOST = {"nats": 50, "redis": 50, "rabbitmq": 10}
BURST = 100  # commands the test commits itself per window, so publishes are in flight


async def lose_acks(
    proxy: FaultProxy, broker: str, path: str, step: int, relay: Any, relay_log: Path
) -> int:
    """One lost-ack window: wait until the relay publishes through the proxy, then drop the
    broker's replies while the test commits a burst (the relay has publishes in flight)
    until at least ``MIN_LOST`` acknowledgements were dropped, then cut the connection (as
    a lost ack's connection dies). Returns how many acknowledgements were dropped."""
    log = SqliteTestLog(path)
    try:
        for i in range(10):  # the relay connects (through the proxy) and publishes these
            await log.append(f"acct-{i % 8}", Deposited(f"acct-{i % 8}", step * 10_000 + i))
        head = await log.head()
        deadline = time.monotonic() + 30
        while relay_checkpoint(path) < head:
            assert relay.poll() is None, relay_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the relay did not publish before the window"
            await asyncio.sleep(0.02)
        before = proxy.dropped_acks
        proxy.mode = Mode.DROP_REPLIES  # publishes arrive, their acks are lost
        for i in range(10, BURST):
            await log.append(f"acct-{i % 8}", Deposited(f"acct-{i % 8}", step * 10_000 + i))
        deadline = time.monotonic() + 30
        while proxy.dropped_acks - before < MIN_LOST[broker]:
            assert relay.poll() is None, relay_log.read_text()[-3000:]
            assert time.monotonic() < deadline, (
                f"only {proxy.dropped_acks - before} acks dropped in the window"
            )
            await asyncio.sleep(0.02)
        proxy.mode = Mode.RESET  # then the connection dies, as a lost ack's does
        proxy.mode = Mode.FORWARD
        return proxy.dropped_acks - before
    finally:
        log.close()


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
    proxy = FaultProxy("127.0.0.1", target, protocol="raw", ack_marker=ACK_MARKERS[broker])
    await proxy.start()
    scheme = {"nats": "nats://", "redis": "redis://", "rabbitmq": "amqp://guest:guest@"}[broker]
    url = f"{scheme}127.0.0.1:{proxy.port}" + ("/0" if broker == "redis" else "/")
    direct = f"{scheme}127.0.0.1:{target}" + ("/0" if broker == "redis" else "/")
    name = f"cqrskit_f{uuid.uuid4().hex[:10]}"
    path = str(tmp_path / "log.db")
    SqliteTestLog(path).close()  # tables exist before the processes start
    rng = random.Random(os.environ.get("CQRSKIT_FAULT_SEED", "relay-faults"))
    faults = {"SIGKILL": 0, "broker restarts": 0, "lost-ack windows": 0, "connection cuts": 0}
    lost: list[int] = []  # acknowledgements dropped per lost-ack window
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
                lost.append(await lose_acks(proxy, broker, path, step, relay, relay_log))
                faults["lost-ack windows"] += 1
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
        assert len(log) == WRITERS * PER_WRITER + sum(BURST for _ in lost)
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
            + f"; acks dropped per window {lost} ({proxy.dropped_replies} reply chunks); "
            f"{len(log)} events, {dropped} duplicate copies dropped by sequence"
        )
        assert faults["SIGKILL"] >= 10
        assert faults["lost-ack windows"] >= 2
        assert faults["broker restarts" if server else "connection cuts"] >= 2
        ledger.record("sigkill", faults["SIGKILL"])
        # proxy faults are not recorded here: the ledger's proxy counts its own RESETs
    finally:
        for p in [relay, *writers]:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        await proxy.close()
        if server is not None:
            server.close()
