"""``cqrskit relay run|status`` as processes, locations and the broker URL from the
environment (nothing secret on the command line)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import require_service
from tests.support.bank import Deposited
from tests.support.brokers import redis_read
from tests.support.sqlite_log import SqliteTestLog

from cqrskit.errors import ConfigurationError
from cqrskit.messaging import Envelope

ROOT = Path(__file__).resolve().parents[3]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ) | extra
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return env


def wait_for_status(
    env: dict[str, str],
    proc: subprocess.Popen[bytes],
    errlog: Path,
    done: Callable[[dict[str, Any]], bool],
) -> dict[str, Any]:
    """Poll ``cqrskit relay status --json`` (bounded) until it answers and ``done(status)``;
    the relay process must stay up meanwhile."""
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run(
            [sys.executable, "-m", "cqrskit", "relay", "status", "--json"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0:
            status: dict[str, Any] = json.loads(out.stdout)
            if done(status):
                return status
        assert proc.poll() is None, errlog.read_text()
        assert time.monotonic() < deadline, out.stdout + out.stderr
        time.sleep(0.1)  # another process does the work: a bounded poll


async def test_relay_cli_publishes_and_reports(tmp_path: Path) -> None:
    require_service("redis")
    path = str(tmp_path / "app.db")
    log = SqliteTestLog(path)
    for i in range(20):
        await log.append(f"acct-{i % 3}", Deposited(f"acct-{i % 3}", i))
    head = await log.head()
    log.close()
    prefix = f"cqrskit_t:{uuid.uuid4().hex[:10]}"
    env = cli_env(
        CQRSKIT_STORE=f"sqlite:///{path}",
        CQRSKIT_READ=f"sqlite:///{path}",
        APP_BROKER="redis://127.0.0.1:6379/0",
    )
    errlog = tmp_path / "relay.err"
    with errlog.open("wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cqrskit",
                "relay",
                "run",
                "--broker",
                "env:APP_BROKER",
                "--destination",
                prefix,
                "--partitions",
                "2",
                "--poll-interval",
                "0.05",
            ],
            cwd=ROOT,
            env=env,
            stderr=err,
        )
    try:
        status = wait_for_status(env, proc, errlog, lambda s: s["checkpoint"] == head)
        assert (status["mode"], status["lag_events"]) == ("relay", 0)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    held = []
    for p in range(2):
        held += [
            Envelope.from_wire(h, b)
            for h, b in await redis_read("redis://127.0.0.1:6379/0", f"{prefix}:{p}")
        ]
    assert sorted(e.position for e in held) == list(range(1, head + 1))
    import redis.asyncio as aioredis

    client = aioredis.from_url("redis://127.0.0.1:6379/0")
    await client.delete(f"{prefix}:0", f"{prefix}:1")
    await client.aclose()


def test_relay_cli_refuses_a_missing_broker_without_echoing_urls(tmp_path: Path) -> None:
    from cqrskit.cli.relay import open_transport

    with pytest.raises(ConfigurationError) as info:
        open_transport("http://user:secret@host/")
    assert "secret" not in str(info.value)
    env = cli_env(
        CQRSKIT_STORE=f"sqlite:///{tmp_path}/a.db", CQRSKIT_READ=f"sqlite:///{tmp_path}/a.db"
    )
    env.pop("CQRSKIT_BROKER", None)
    out = subprocess.run(
        [sys.executable, "-m", "cqrskit", "relay", "run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "CQRSKIT_BROKER" in out.stderr


def test_relay_cli_create_tables_sets_up_a_fresh_log(tmp_path: Path) -> None:
    """``--create-tables`` is offered by ``relay run``: on a new database it creates the
    event log instead of failing with a hint to pass ``--create-tables``."""
    path = tmp_path / "fresh.db"
    env = cli_env(
        CQRSKIT_STORE=f"sqlite:///{path}",
        CQRSKIT_READ=f"sqlite:///{path}",
        # never contacted: the log stays empty, so there is nothing to publish
        CQRSKIT_BROKER="redis://127.0.0.1:9/0",
    )
    errlog = tmp_path / "relay.err"
    with errlog.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cqrskit", "relay", "run", "--create-tables"],
            cwd=ROOT,
            env=env,
            stderr=err,
        )
    try:
        status = wait_for_status(env, proc, errlog, lambda s: True)
        assert (status["mode"], status["checkpoint"], status["head"]) == ("relay", 0, 0)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, errlog.read_text()
