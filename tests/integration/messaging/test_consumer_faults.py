"""The bank-transfer invariant end to end through each broker, with real processes.

Four writer processes commit transfers (two streams per command) to a SQLite log; a relay
process publishes it over 8 partitions; three consumer processes apply the ``balances``
projection from the broker into PostgreSQL, sharing the partitions by lease. Consumers are
SIGKILLed at random (>= 10 times per run) and SIGSTOPped past their lease (>= 2 times,
each time their partitions must move to the others); the broker is restarted (own NATS /
Redis instance on a free port) or, for RabbitMQ (the shared node), its connections are cut
through a TCP proxy (>= 2 times); a batch is republished as duplicates. At the end: the
sum of balances is unchanged, every account equals the replayed log, events applied ==
events in the log, per-stream order was never violated (checked on every apply), so 0
lost, 0 double-applied, 0 reordered. Each run prints one line counting its faults.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import require_service
from tests.support import faults as ledger
from tests.support.bank import Deposited
from tests.support.brokers import NatsServer, OwnServer, RedisServer, rabbit_delete
from tests.support.consumer_procs import LEASE_TTL
from tests.support.proxy import FaultProxy
from tests.support.relay_checks import need_binary
from tests.support.sqlite_log import SqliteTestLog

from cqrskit.projections import ReadDatabase
from cqrskit.projections.partitions import partition_status
from cqrskit.testing.transport import envelopes_for

ROOT = Path(__file__).resolve().parents[3]
PARTITIONS = 8
CONSUMERS = 3
WRITERS = 4
PER_WRITER = 75
ACCOUNTS = 16
SEED = 1000


OUTPUTS: dict[int, Path] = {}


def spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """A process of tests.support.consumer_procs; stderr to ``log``, stdout to a file of its
    own (read by :func:`stop_all`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    out = log.with_name(f"out-{uuid.uuid4().hex[:8]}.txt")
    with log.open("ab") as err, out.open("wb") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.consumer_procs", *args],
            cwd=ROOT, env=env, stdout=stdout, stderr=err,
        )  # fmt: skip
    OUTPUTS[proc.pid] = out
    return proc


async def seed(path: str) -> None:
    log = SqliteTestLog(path)
    try:
        for a in range(ACCOUNTS):
            await log.append(f"acct-{a}", Deposited(f"acct-{a}", SEED))
    finally:
        log.close()


def replay(path: str) -> dict[str, tuple[int, int, int]]:
    import sqlite3

    conn = sqlite3.connect(path, timeout=10)
    try:
        out: dict[str, tuple[int, int, int]] = {}
        for stream, data, version in conn.execute(
            "SELECT stream, data, version FROM cqrskit_events ORDER BY position"
        ):
            b, n, _ = out.get(stream, (0, 0, 0))
            out[stream] = (b + int(json.loads(data)["amount"]), n + 1, int(version))
        return out
    finally:
        conn.close()


async def read_model(db: ReadDatabase) -> tuple[dict[str, tuple[int, int, int]], int]:
    async with db.read_only() as s:
        rows = await s.fetchall("SELECT id, balance, applied, last_version FROM accounts")
        errors = int(await s.fetchval("SELECT count(*) FROM order_errors"))
    return {str(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows}, errors


async def owners(db: ReadDatabase, name: str = "balances") -> dict[int, tuple[str | None, int]]:
    try:
        rows = await partition_status(db, name)
    except Exception:
        return {}
    return {r.partition: (r.owner, r.epoch) for r in rows}


async def republish(broker: str, url: str, name: str, path: str) -> int:
    """Publish the first events of the log again exactly as the relay numbered them (the
    relay's at-least-once tail); NATS would drop them by msg-id, so they go around it."""
    import sqlite3

    from tests.support.relay_procs import make_transport

    conn = sqlite3.connect(path, timeout=10)
    try:
        log = SqliteTestLog(path)
        events = await log.read_after(0, 200)
        log.close()
    finally:
        conn.close()
    envs = envelopes_for(events, PARTITIONS)
    if broker == "nats":
        import nats
        import nats.errors

        for attempt in range(50):  # a restarted server may still be recovering its streams
            nc = await nats.connect(url, connect_timeout=5)
            try:
                js = nc.jetstream()
                for env in envs:
                    subject = f"{name}.{env.partition}"
                    await js.publish(subject, env.payload, headers=env.headers())
                return len(envs)
            except nats.errors.Error:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.2)
            finally:
                await nc.close()
    transport = make_transport(broker, url, name)
    try:
        assert await transport.publish(envs) == [None] * len(envs)
    finally:
        await transport.close()
    return len(envs)


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["nats", "redis", "rabbitmq", "log"])
async def test_bank_transfers_through_a_broker_survive_consumer_and_broker_faults(
    broker: str, tmp_path: Path, pg_read: tuple[str, ReadDatabase]
) -> None:
    """``log``: the same run with PartitionedProjector workers reading the log (no relay,
    no broker; the broker faults are skipped)."""
    read_spec, db = pg_read
    server: OwnServer | None = None
    if broker == "log":
        await bank_run_on_the_log(tmp_path, read_spec, db)
        return
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
    tail = "/0" if broker == "redis" else "/"
    url = f"{scheme}127.0.0.1:{proxy.port}{tail}"
    direct = f"{scheme}127.0.0.1:{target}{tail}"
    name = f"cqrskit_c{uuid.uuid4().hex[:10]}"
    path = str(tmp_path / "log.db")
    await seed(path)
    rng = random.Random(os.environ.get("CQRSKIT_FAULT_SEED", "consumer-faults"))
    faults = {"SIGKILL": 0, "SIGSTOP": 0, "broker restarts": 0, "connection cuts": 0}
    logs = tmp_path / "procs.log"
    incarnation = [0] * CONSUMERS

    def start_consumer(i: int) -> subprocess.Popen[bytes]:
        incarnation[i] += 1
        owner = f"c{i}-{incarnation[i]}"
        return spawn("consumer", broker, url, name, str(PARTITIONS), read_spec, owner, log=logs)

    relay = spawn("relay", path, broker, url, name, str(PARTITIONS), log=logs)
    consumers = [start_consumer(i) for i in range(CONSUMERS)]
    writers = [
        spawn("writer", path, str(w), str(PER_WRITER), str(ACCOUNTS), log=logs)
        for w in range(1, WRITERS + 1)
    ]
    takeovers: list[float] = []
    duplicates = 0
    try:
        for step in range(40):  # bounded: stops once every fault quota is met
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            if step % 5 == 3 and faults["SIGSTOP"] < 2:
                taken = await stop_past_lease(consumers, incarnation, db)
                if taken is not None:
                    takeovers.append(taken)
                    faults["SIGSTOP"] += 1
            if step in (5, 12):
                if server is not None:
                    await asyncio.to_thread(server.restart)
                    faults["broker restarts"] += 1
                else:
                    proxy.reset_all()
                    faults["connection cuts"] += 1
            if step == 7:
                duplicates = await republish(broker, direct, name, path)
            i = rng.randrange(CONSUMERS)
            ledger.send_signal(consumers[i], signal.SIGKILL)
            consumers[i].wait(10)
            faults["SIGKILL"] += 1
            consumers[i] = start_consumer(i)
            done = all(w.poll() is not None for w in writers)
            quotas = faults["SIGKILL"] >= 10 and faults["SIGSTOP"] >= 2 and step >= 13
            if done and quotas:
                break
        for w in writers:
            assert w.wait(120) == 0, f"a writer failed: see {logs}"
        want = replay(path)
        store = SqliteTestLog(path)
        try:
            deadline = time.monotonic() + 120
            while True:
                rows = await partition_status(db, "balances", store)
                if rows and all(r.lag_events == 0 for r in rows):
                    break
                assert relay.poll() is None, logs.read_text()[-3000:]
                assert time.monotonic() < deadline, f"consumers stuck: {rows}"
                await asyncio.sleep(0.1)
        finally:
            store.close()
        got, order_errors = await read_model(db)
        counts = await stop_all([relay, *consumers])
        total_events = sum(n for _b, n, _v in want.values())
        applied = sum(n for _b, n, _v in got.values())
        lost = sum(max(0, w[1] - got.get(s, (0, 0, 0))[1]) for s, w in want.items())
        double = sum(max(0, g[1] - want.get(s, (0, 0, 0))[1]) for s, g in got.items())
        print(
            f"\nconsumer faults [{broker}]: "
            + ", ".join(f"{v} {k}" for k, v in faults.items())
            + f", {duplicates} messages republished; {total_events} events, {applied} applied,"
            f" {lost} lost, {double} double, {order_errors} reordered; takeovers after "
            f"SIGSTOP in {', '.join(f'{t:.2f}' for t in takeovers)} s; final consumers "
            f"counted {sum(c.get('duplicates', 0) for c in counts)} duplicates, "
            f"{sum(c.get('gaps', 0) for c in counts)} gaps"
        )
        ledger.check_invariants(
            f"consumer {broker}", {"lost": lost, "double": double, "reordered": order_errors}
        )
        assert got == want
        assert sum(b for b, _n, _v in got.values()) == SEED * ACCOUNTS
        assert applied == total_events == ACCOUNTS + 2 * WRITERS * PER_WRITER
        assert (lost, double, order_errors) == (0, 0, 0)
        assert faults["SIGKILL"] >= 10
        assert faults["SIGSTOP"] >= 2
        assert faults["broker restarts" if server else "connection cuts"] >= 2
        assert duplicates > 0
    finally:
        for p in [relay, *consumers, *writers]:
            if p.poll() is None:
                if p.returncode is None:
                    p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait(10)
        await proxy.close()
        if server is not None:
            server.close()
        if broker == "rabbitmq":  # the shared node: leave nothing behind
            await rabbit_delete(direct, name, PARTITIONS)


async def stop_past_lease(
    consumers: list[subprocess.Popen[bytes]], incarnation: list[int], db: ReadDatabase
) -> float | None:
    """SIGSTOP a consumer holding partitions until the others took them (bounded), keep it
    stopped past twice its lease, SIGCONT it; return how long the takeover took."""
    deadline = time.monotonic() + 20
    while True:  # wait (bounded) until a running consumer holds partitions
        held = await owners(db)
        holders = [
            (sum(1 for o, _e in held.values() if o == f"c{i}-{incarnation[i]}"), i)
            for i in range(len(consumers))
        ]
        count, i = max(holders)
        if count:
            break
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.05)
    proc = consumers[i]
    owner = f"c{i}-{incarnation[i]}"
    mine = {p for p, (o, _e) in held.items() if o == owner}
    ledger.send_signal(proc, signal.SIGSTOP)
    start = time.monotonic()
    try:
        while True:
            now = await owners(db)
            if all(now[p][0] not in (owner, None) for p in mine):
                taken = time.monotonic() - start
                break
            assert time.monotonic() - start < 10 * LEASE_TTL + 10, (
                f"partitions {sorted(mine)} of a stopped consumer did not move: {now}"
            )
            await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, 2.5 * LEASE_TTL - (time.monotonic() - start)))
    finally:
        proc.send_signal(signal.SIGCONT)
    return taken


async def stop_all(procs: list[subprocess.Popen[bytes]]) -> list[dict[str, Any]]:
    """SIGTERM ``procs``, wait, and return the counters each printed."""
    counts = []
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        await asyncio.to_thread(p.wait, 30)
        text = OUTPUTS[p.pid].read_text()
        lines = [x for x in text.splitlines() if x.startswith("{")]
        counts.append(json.loads(lines[-1]) if lines else {})
    return counts


async def bank_run_on_the_log(tmp_path: Path, read_spec: str, db: ReadDatabase) -> None:
    """The bank run with partitioned log projectors: SIGKILL and SIGSTOP faults."""
    path = str(tmp_path / "log.db")
    await seed(path)
    rng = random.Random(os.environ.get("CQRSKIT_FAULT_SEED", "projector-faults"))
    faults = {"SIGKILL": 0, "SIGSTOP": 0}
    logs = tmp_path / "procs.log"
    incarnation = [0] * CONSUMERS

    def start_worker(i: int) -> subprocess.Popen[bytes]:
        incarnation[i] += 1
        return spawn("projector", path, str(PARTITIONS), read_spec, f"c{i}-{incarnation[i]}",
                     log=logs)  # fmt: skip

    workers = [start_worker(i) for i in range(CONSUMERS)]
    writers = [
        spawn("writer", path, str(w), str(PER_WRITER), str(ACCOUNTS), log=logs)
        for w in range(1, WRITERS + 1)
    ]
    takeovers: list[float] = []
    try:
        for step in range(40):  # bounded: stops once every fault quota is met
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            if step % 5 == 3 and faults["SIGSTOP"] < 2:
                taken = await stop_past_lease(workers, incarnation, db)
                if taken is not None:
                    takeovers.append(taken)
                    faults["SIGSTOP"] += 1
            i = rng.randrange(CONSUMERS)
            ledger.send_signal(workers[i], signal.SIGKILL)
            workers[i].wait(10)
            faults["SIGKILL"] += 1
            workers[i] = start_worker(i)
            done = all(w.poll() is not None for w in writers)
            if done and faults["SIGKILL"] >= 10 and faults["SIGSTOP"] >= 2 and step >= 13:
                break
        for w in writers:
            assert w.wait(120) == 0, f"a writer failed: see {logs}"
        want = replay(path)
        store = SqliteTestLog(path)
        try:
            deadline = time.monotonic() + 120
            while True:
                rows = await partition_status(db, "balances", store)
                if rows and all(r.lag_events == 0 for r in rows):
                    break
                assert time.monotonic() < deadline, f"projectors stuck: {rows}"
                await asyncio.sleep(0.1)
        finally:
            store.close()
        got, order_errors = await read_model(db)
        await stop_all(workers)
        applied = sum(n for _b, n, _v in got.values())
        total = sum(n for _b, n, _v in want.values())
        print(
            f"\nprojector faults [log]: {faults['SIGKILL']} SIGKILL, {faults['SIGSTOP']} "
            f"SIGSTOP; {total} events, {applied} applied, {order_errors} reordered; "
            f"takeovers after SIGSTOP in {', '.join(f'{t:.2f}' for t in takeovers)} s"
        )
        lost = sum(max(0, w[1] - got.get(s, (0, 0, 0))[1]) for s, w in want.items())
        double = sum(max(0, g[1] - want.get(s, (0, 0, 0))[1]) for s, g in got.items())
        ledger.check_invariants(
            "partitioned projector", {"lost": lost, "double": double, "reordered": order_errors}
        )
        assert got == want
        assert sum(b for b, _n, _v in got.values()) == SEED * ACCOUNTS
        assert applied == total == ACCOUNTS + 2 * WRITERS * PER_WRITER
        assert order_errors == 0
        assert faults["SIGKILL"] >= 10
        assert faults["SIGSTOP"] >= 2
    finally:
        for p in [*workers, *writers]:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait(10)
