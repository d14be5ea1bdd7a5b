"""Processes for relay fault tests: ``python -m tests.support.relay_procs writer|relay ...``.

writer LOG ID COUNT      append COUNT deposits (amount = ID * 1_000_000 + i) to 8 shared
                         streams of the SQLite log, one command each; prints DONE
paced LOG ID RATE SECONDS OUT
                         commit RATE deposits per second for SECONDS (same streams and
                         amounts as writer); write {"ok", "failed", "times"} (monotonic
                         commit times) as JSON to OUT
relay LOG BROKER URL NAME  run a relay (state in the same SQLite file) to nats|redis|rabbitmq
                         until SIGTERM; NAME is the stream / key prefix / exchange
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.bank import Deposited
from tests.support.sqlite_log import SqliteTestLog

from cqrskit.messaging import Relay, Transport
from cqrskit.sqlite import SqliteReadDatabase

PARTITIONS = 4


def make_transport(broker: str, url: str, name: str) -> Transport:
    if broker == "nats":
        from cqrskit.nats import NatsTransport

        return NatsTransport(url, stream=name.upper(), subject_prefix=name, ack_timeout=2.0)
    if broker == "redis":
        from cqrskit.redis import RedisTransport

        return RedisTransport(url, key_prefix=name, ack_timeout=2.0)
    from cqrskit.rabbitmq import RabbitMQTransport

    return RabbitMQTransport(url, exchange=name, ack_timeout=2.0)


async def open_log(path: str) -> SqliteTestLog:
    """The log (the store retries SQLITE_BUSY while another process recovers the WAL)."""
    return SqliteTestLog(path)


async def writer(path: str, ident: int, count: int) -> None:
    log = await open_log(path)
    try:
        for i in range(count):
            stream = f"acct-{(ident + i) % 8}"
            await log.append(stream, Deposited(stream, ident * 1_000_000 + i))
    finally:
        log.close()
    print("DONE", flush=True)


async def paced(path: str, ident: int, rate: float, seconds: float, out: str) -> None:
    log = SqliteTestLog(path)
    times: list[float] = []
    failed: list[str] = []
    start = time.monotonic()
    try:
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the load's schedule, not synchronization
            stream = f"acct-{(ident + i) % 8}"
            try:
                await log.append(stream, Deposited(stream, ident * 1_000_000 + i))
            except Exception as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
                continue
            times.append(time.monotonic())
    finally:
        log.close()
        Path(out).write_text(json.dumps({"ok": len(times), "failed": failed, "times": times}))
    print("DONE", flush=True)


async def relay(path: str, broker: str, url: str, name: str) -> None:
    log = await open_log(path)
    db = SqliteReadDatabase(path)
    transport = make_transport(broker, url, name)
    r = Relay(log, db, transport, partitions=PARTITIONS, batch_size=50, lease_ttl=0.6,
              poll_interval=0.05, max_backoff=0.3)  # fmt: skip
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, r.request_stop)
    try:
        await r.run()
    finally:
        await transport.close()
        await db.close()
        log.close()


def main(argv: list[str]) -> None:
    kind, *rest = argv
    coro: Any
    if kind == "writer":
        coro = writer(rest[0], int(rest[1]), int(rest[2]))
    elif kind == "paced":
        coro = paced(rest[0], int(rest[1]), float(rest[2]), float(rest[3]), rest[4])
    else:
        coro = relay(*rest)
    asyncio.run(coro)


if __name__ == "__main__":
    main(sys.argv[1:])
