"""Signed messages end to end through the command line: ``cqrskit relay run`` with
``--signing-key-file``, ``cqrskit consume run`` with ``--verify-key-file`` /
``--verify-key-env`` (keys never on the command line)."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.conftest import require_service
from tests.integration.messaging.test_consume_cli import until_caught_up
from tests.integration.messaging.test_relay_cli import ROOT, cli_env, wait_for_status
from tests.support.bank import Deposited
from tests.support.brokers import redis_read
from tests.support.sqlite_log import SqliteTestLog

from cqrskit.messaging import Envelope
from cqrskit.projections import dead_letters
from cqrskit.sqlite import SqliteReadDatabase

REDIS = "redis://127.0.0.1:6379/0"
EVENTS = 30
PARTITIONS = 4


def key_file(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def consume(env: dict[str, str], prefix: str, *keys: str, err: Path) -> subprocess.Popen[bytes]:
    with err.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "cqrskit", "consume", "run", "--broker", "env:APP_BROKER",
             "--destination", prefix, "--projection", "tests.support.bank:balances",
             "--decoder", "tests.support.bank:serializer", "--partitions", str(PARTITIONS),
             "--lease-ttl", "1", *keys],
            cwd=ROOT, env=env, stderr=stderr,
        )  # fmt: skip


def stop(proc: subprocess.Popen[bytes], err: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, err.read_text()[-3000:]


async def parked(read: str, count: int, proc: subprocess.Popen[bytes], err: Path) -> list[str]:
    """The reasons of ``balances``' dead letters once there are ``count`` (bounded poll)."""
    deadline = time.monotonic() + 60
    while True:
        letters = []
        if Path(read).exists():
            db = SqliteReadDatabase(read)
            try:
                letters = await dead_letters(db, "balances")
            except Exception:  # the consumer may not have created its tables yet
                letters = []
            finally:
                await db.close()
            if len(letters) >= count:
                return [d.error for d in letters]
        assert proc.poll() is None, err.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{len(letters)} parked, want {count}"
        await asyncio.sleep(0.2)  # another process does the work: a bounded poll


async def test_signed_by_the_relay_cli_applied_by_the_consumer_cli_refused_with_a_wrong_key(
    tmp_path: Path,
) -> None:
    require_service("redis")
    path = str(tmp_path / "app.db")
    log = SqliteTestLog(path)
    for i in range(EVENTS):
        await log.append(f"acct-{i % 5}", Deposited(f"acct-{i % 5}", i + 1))
    head = await log.head()
    log.close()
    current, previous = secrets.token_hex(32), secrets.token_hex(32)
    relay_key = key_file(tmp_path / "relay.key", f"# the relay's active key\nk2:{current}\n")
    wrong_key = key_file(tmp_path / "wrong.key", f"k2:{secrets.token_hex(32)}\n")
    old_keys = key_file(tmp_path / "old.key", f"k1:{previous}\n")
    prefix = f"cqrskit_t:{uuid.uuid4().hex[:10]}"
    env = cli_env(
        CQRSKIT_STORE=f"sqlite:///{path}",
        CQRSKIT_READ=f"sqlite:///{path}",
        APP_BROKER=REDIS,
        APP_VERIFY_KEY=f"k2:{current}",
    )
    relay_err = tmp_path / "relay.err"
    with relay_err.open("wb") as stderr:
        relay = subprocess.Popen(
            [sys.executable, "-m", "cqrskit", "relay", "run", "--broker", "env:APP_BROKER",
             "--destination", prefix, "--partitions", str(PARTITIONS), "--poll-interval",
             "0.05", "--signing-key-file", relay_key],
            cwd=ROOT, env=env, stderr=stderr,
        )  # fmt: skip
    try:
        wait_for_status(env, relay, relay_err, lambda s: s["checkpoint"] == head)
    finally:
        stop(relay, relay_err)
    try:
        wire = [
            Envelope.from_wire(h, b)
            for p in range(PARTITIONS)
            for h, b in await redis_read(REDIS, f"{prefix}:{p}")
        ]
        assert len(wire) == EVENTS
        assert {(e.key_id, e.signature is not None) for e in wire} == {("k2", True)}

        # a consumer holding another secret under the relay's key id: every message parked
        wrong_read = str(tmp_path / "wrong.db")
        wrong_env = env | {"CQRSKIT_READ": f"sqlite:///{wrong_read}"}
        err = tmp_path / "wrong.err"
        proc = consume(wrong_env, prefix, "--verify-key-file", wrong_key, err=err)
        try:
            reasons = await parked(wrong_read, EVENTS, proc, err)
        finally:
            stop(proc, err)
        assert len(reasons) == EVENTS
        assert all(r.startswith("signature refused") and "does not match" in r for r in reasons)
        db = SqliteReadDatabase(wrong_read)
        try:
            async with db.read_only() as s:
                assert await s.fetchval("SELECT count(*) FROM accounts") == 0
        finally:
            await db.close()

        # the previous key from a file, the current one from the environment: all applied
        read = str(tmp_path / "read.db")
        good_env = env | {"CQRSKIT_READ": f"sqlite:///{read}"}
        err = tmp_path / "good.err"
        proc = consume(
            good_env, prefix, "--verify-key-file", old_keys, "--verify-key-env",
            "APP_VERIFY_KEY", err=err,
        )  # fmt: skip
        try:
            rows = until_caught_up("balances", good_env, proc, err)
        finally:
            stop(proc, err)
        assert sum(r["sequence"] for r in rows) == EVENTS
        db = SqliteReadDatabase(read)
        try:
            async with db.read_only() as s:
                got = dict(await s.fetchall("SELECT id, balance FROM accounts"))
            assert await dead_letters(db, "balances") == []
        finally:
            await db.close()
        want: dict[str, int] = {}
        for i in range(EVENTS):
            want[f"acct-{i % 5}"] = want.get(f"acct-{i % 5}", 0) + i + 1
        assert got == want
        for name in ("relay.err", "wrong.err", "good.err"):  # no secret in any output
            text = (tmp_path / name).read_text()
            assert current not in text
            assert previous not in text
    finally:
        import redis.asyncio as aioredis

        client = aioredis.from_url(REDIS)
        await client.delete(*[f"{prefix}:{p}" for p in range(PARTITIONS)])
        await client.aclose()


def cqrskit(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = cli_env(
        CQRSKIT_STORE=f"sqlite:///{tmp_path}/a.db", CQRSKIT_READ=f"sqlite:///{tmp_path}/a.db"
    )
    env["CQRSKIT_BROKER"] = "redis://127.0.0.1:9/0"  # never contacted
    return subprocess.run(
        [sys.executable, "-m", "cqrskit", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_clis_stop_at_a_bad_key_with_exit_2_before_connecting(tmp_path: Path) -> None:
    secret = secrets.token_hex(32)
    key = str(tmp_path / "open.key")
    Path(key).write_text(f"k1:{secret}\n")
    Path(key).chmod(0o644)
    out = cqrskit("relay", "run", "--signing-key-file", key, tmp_path=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "mode 0644" in out.stderr
    assert secret not in out.stderr + out.stdout
    assert not (tmp_path / "a.db").exists()  # refused before the store was opened
    out = cqrskit(
        "consume", "run", "--projection", "tests.support.bank:balances",
        "--decoder", "tests.support.bank:serializer", "--partitions", "2",
        "--verify-key-env", "CQRSKIT_TEST_UNSET_KEY", tmp_path=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "CQRSKIT_TEST_UNSET_KEY" in out.stderr
    out = cqrskit(
        "relay", "run", "--signing-key-file", key, "--signing-key-env", "X", tmp_path=tmp_path
    )
    assert out.returncode == 2
    assert "not allowed with argument" in out.stderr
