"""Processes for consumer fault tests: ``python -m tests.support.consumer_procs KIND ...``.

writer LOG ID COUNT ACCOUNTS [PACE]
                               COUNT transfers between ACCOUNTS accounts of the SQLite log:
                               each command records ``Deposited(a, -x)`` on stream a and
                               ``Deposited(b, +x)`` on stream b in one unit of work; PACE
                               seconds between commands (a steady load; default none);
                               SIGTERM stops it after the command in hand (exit 0)
relay LOG BROKER URL NAME N    a relay (state in the log file) to nats|redis|rabbitmq
consumer BROKER URL NAME N READ OWNER
                               a Consumer of the ``balances`` projection; READ is
                               ``sqlite:///path`` or ``postgresql://...#schema``
projector LOG N READ OWNER     a PartitionedProjector of ``balances`` on the SQLite log
Each runs until SIGTERM (writers until done) and then prints one JSON line of counters.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import sys
from typing import Any

from tests.support.bank import Deposited, balances, serializer
from tests.support.relay_procs import make_transport, open_log

from cqrskit.messaging import Consumer, Relay, Source
from cqrskit.projections import ReadDatabase
from cqrskit.sqlite import SqliteReadDatabase

LEASE_TTL = 1.0


def make_source(broker: str, url: str, name: str) -> Source:
    if broker == "nats":
        from cqrskit.nats import NatsSource

        return NatsSource(url, stream=name.upper(), subject_prefix=name, ack_wait=5.0)
    if broker == "redis":
        from cqrskit.redis import RedisSource

        return RedisSource(url, key_prefix=name)
    from cqrskit.rabbitmq import RabbitMQSource

    return RabbitMQSource(url, exchange=name, heartbeat=2)


def open_read(spec: str) -> ReadDatabase:
    if spec.startswith("sqlite:///"):
        return SqliteReadDatabase(spec.removeprefix("sqlite:///"))
    from cqrskit.postgres import PostgresReadDatabase

    dsn, _, schema = spec.partition("#")
    return PostgresReadDatabase(dsn, schema=schema)


async def writer(path: str, ident: int, count: int, accounts: int, pace: float = 0.0) -> None:
    log = await open_log(path)
    rng = random.Random(ident)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    done = 0
    try:
        for _ in range(count):
            if stop.is_set():
                break
            a, b = rng.sample(range(accounts), 2)
            amount = rng.randint(1, 100)
            for attempt in range(20):
                try:
                    uow = await log.begin()
                    uow.record(f"acct-{a}", Deposited(f"acct-{a}", -amount))
                    uow.record(f"acct-{b}", Deposited(f"acct-{b}", amount))
                    await uow.commit()
                    break
                except sqlite3.OperationalError as exc:
                    # SQLITE_BUSY at connection open while another connection recovers the
                    # WAL of a SIGKILLed process: nothing was written; try again (bounded)
                    if "locked" not in str(exc) or attempt == 19:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))
            done += 1
            if pace:
                await asyncio.sleep(pace)
    finally:
        log.close()
    print(json.dumps({"done": done}), flush=True)


async def _until_term(runner: Any, stop: Any) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop)
    await runner()


async def relay(path: str, broker: str, url: str, name: str, n: str) -> None:
    log = await open_log(path)
    db = SqliteReadDatabase(path)
    transport = make_transport(broker, url, name)
    r = Relay(log, db, transport, partitions=int(n), batch_size=100, lease_ttl=1.0,
              poll_interval=0.05, max_backoff=0.3)  # fmt: skip
    try:
        await _until_term(r.run, r.request_stop)
    finally:
        await transport.close()
        await db.close()
        log.close()


async def consumer(broker: str, url: str, name: str, n: str, read: str, owner: str) -> None:
    source = make_source(broker, url, name)
    db = open_read(read)
    c = Consumer(source, db, [balances], serializer, partitions=int(n), batch_size=100,
                 lease_ttl=LEASE_TTL, poll_interval=0.2, max_backoff=0.5, owner=owner)  # fmt: skip
    try:
        await _until_term(c.run, c.request_stop)
    finally:
        await source.close()
        await db.close()
    print(json.dumps(c.counts), flush=True)


async def projector(path: str, n: str, read: str, owner: str) -> None:
    from cqrskit.projections.partitioned import PartitionedProjector

    log = await open_log(path)
    db = open_read(read)
    p = PartitionedProjector(log, db, [balances], serializer, partitions=int(n), batch_size=100,
                             lease_ttl=LEASE_TTL, poll_interval=0.1, owner=owner)  # fmt: skip
    try:
        await _until_term(p.run, p.request_stop)
    finally:
        await db.close()
        log.close()
    print(json.dumps(p.counts), flush=True)


def main(argv: list[str]) -> None:
    kind, *rest = argv
    if kind == "writer":
        pace = float(rest[4]) if len(rest) > 4 else 0.0
        coro: Any = writer(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), pace)
    else:
        coro = {"relay": relay, "consumer": consumer, "projector": projector}[kind](*rest)
    asyncio.run(coro)


if __name__ == "__main__":
    main(sys.argv[1:])
