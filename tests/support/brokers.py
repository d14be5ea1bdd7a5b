"""Broker helpers for messaging tests: own server instances (free port, temp dir) that can
be killed and restarted on the same data, and readers returning what a broker holds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from tests.support import faults


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"port {port} not accepting connections after {timeout}s")


class OwnServer:
    """A broker process of this test's own: ``start``, ``kill`` (SIGKILL), ``restart``."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cqrskit-broker-")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        log = open(os.path.join(self.dir, "server.log"), "ab")  # noqa: SIM115 - closed by the child's exit
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=log, cwd=self.dir, start_new_session=True
        )
        log.close()
        _wait_port(self.port, 20.0, self.proc)

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()
        self.restarts += 1
        faults.record("broker_restart")

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class NatsServer(OwnServer):
    """``nats-server -js`` on a free port; the store dir survives restarts."""

    def command(self) -> list[str]:
        return ["nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd",
                os.path.join(self.dir, "js")]  # fmt: skip

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


class RedisServer(OwnServer):
    """``redis-server`` with an append-only file (``fsync always``) in the temp dir."""

    def command(self) -> list[str]:
        return ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir]  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


# -- readers -------------------------------------------------------------------------------


async def nats_read(
    servers: str, stream: str, subject: str
) -> list[tuple[Mapping[str, Any], bytes]]:
    """Every message JetStream holds on ``subject`` of ``stream``, in order."""
    import nats
    import nats.js.errors

    nc = await nats.connect(servers, connect_timeout=5)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream, subjects_filter=subject)
        except nats.js.errors.NotFoundError:
            return []
        expected = (info.state.subjects or {}).get(subject, 0)
        out: list[tuple[Mapping[str, Any], bytes]] = []
        if not expected:
            return out
        sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
        try:
            while len(out) < expected:
                msg = await sub.next_msg(timeout=10)
                out.append((dict(msg.headers or {}), bytes(msg.data)))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def nats_delete_stream(servers: str, stream: str) -> None:
    import nats
    import nats.js.errors

    nc = await nats.connect(servers, connect_timeout=5)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


async def redis_read(url: str, key: str) -> list[tuple[Mapping[str, Any], bytes]]:
    """Every entry of Redis stream ``key``: (fields but the body, body)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        out: list[tuple[Mapping[str, Any], bytes]] = []
        low = "-"
        while True:
            entries = await client.xrange(key, min=low, count=1000)
            if not entries:
                return out
            for _entry_id, fields in entries:
                body = fields.pop(b"body", b"")
                out.append((fields, body))
            low = "(" + entries[-1][0].decode()
    finally:
        await client.aclose()


async def wait_until(check: Any, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll an async or sync ``check()`` until true (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.05)


async def rabbit_take(
    channel: Any, queue_name: str, timeout: float = 10.0
) -> list[tuple[Mapping[str, Any], bytes]]:
    """Consume (and acknowledge) every message ``queue_name`` holds now, in order; ``[]`` if
    the queue does not exist. Consumes instead of ``basic.get``, which quorum queues with a
    single active consumer refuse."""
    import aio_pika

    try:
        queue = await channel.declare_queue(queue_name, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return []
    expected = int(queue.declaration_result.message_count or 0)
    out: list[tuple[Mapping[str, Any], bytes]] = []
    if not expected:
        return out
    got = asyncio.Event()

    async def on_message(msg: Any) -> None:
        out.append((dict(msg.headers or {}), bytes(msg.body)))
        if len(out) >= expected:
            got.set()

    tag = await queue.consume(on_message, no_ack=True)
    try:
        await asyncio.wait_for(got.wait(), timeout)
    finally:
        await queue.cancel(tag)
    return out


async def rabbit_delete(url: str, exchange: str, partitions: int) -> None:
    """Delete a run's queues ``<exchange>.<p>`` and its exchange from the shared node."""
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        for p in range(partitions):
            await ch.queue_delete(f"{exchange}.{p}")
        await ch.exchange_delete(exchange)
    finally:
        await conn.close()
