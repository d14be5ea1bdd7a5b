"""``cqrskit consume run|status`` and ``cqrskit projections run --partitions`` as processes,
locations and the broker URL from the environment (nothing secret on the command line)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import require_service
from tests.integration.messaging.test_relay_cli import ROOT, cli_env
from tests.support.bank import Deposited
from tests.support.sqlite_log import SqliteTestLog

from cqrskit.errors import ConfigurationError
from cqrskit.messaging import Relay
from cqrskit.sqlite import SqliteReadDatabase


def cqrskit(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cqrskit", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def until_caught_up(name: str, env: dict[str, str], proc: Any, err: Path) -> list[Any]:
    deadline = time.monotonic() + 60
    while True:
        out = cqrskit("consume", "status", name, "--json", env=env)
        if out.returncode == 0:
            rows = json.loads(out.stdout)
            if rows and all(r["lag_events"] == 0 for r in rows):
                return list(rows)
        assert proc.poll() is None, err.read_text()[-3000:]
        assert time.monotonic() < deadline, out.stdout + out.stderr
        time.sleep(0.2)


async def test_consume_cli_applies_a_projection_from_redis(tmp_path: Path) -> None:
    require_service("redis")
    from cqrskit.redis import RedisTransport

    path = str(tmp_path / "app.db")
    read = str(tmp_path / "read.db")
    log = SqliteTestLog(path)
    for i in range(30):
        await log.append(f"acct-{i % 5}", Deposited(f"acct-{i % 5}", i))
    prefix = f"cqrskit_t:{uuid.uuid4().hex[:10]}"
    transport = RedisTransport("redis://127.0.0.1:6379/0", key_prefix=prefix)
    state = SqliteReadDatabase(path)
    async with Relay(log, state, transport, partitions=4) as relay:
        assert await relay.wait_published(await log.head(), 30)
    await transport.close()
    await state.close()
    log.close()
    env = cli_env(
        CQRSKIT_STORE=f"sqlite:///{path}",
        CQRSKIT_READ=f"sqlite:///{read}",
        APP_BROKER="redis://127.0.0.1:6379/0",
    )
    err = tmp_path / "consume.err"
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cqrskit", "consume", "run", "--broker", "env:APP_BROKER",
             "--destination", prefix, "--projection", "tests.support.bank:balances",
             "--decoder", "tests.support.bank:serializer", "--partitions", "4",
             "--lease-ttl", "1"],
            cwd=ROOT, env=env, stderr=stderr,
        )  # fmt: skip
    try:
        rows = until_caught_up("balances", env, proc, err)
        assert [r["partition"] for r in rows] == [0, 1, 2, 3]
        assert sum(r["sequence"] for r in rows) == 30
        assert all(r["owner"] and r["gap_sequence"] is None for r in rows)
        text = cqrskit("projections", "status", env=env)
        assert text.returncode == 0, text.stderr
        assert "consumer" in text.stdout
        # one row per partition in the table under the projection: "0/4", "1/4", ...
        cells = [line.split()[0] for line in text.stdout.splitlines() if line.split()]
        assert [c for c in cells if c.endswith("/4")] == ["0/4", "1/4", "2/4", "3/4"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, err.read_text()[-3000:]
    import redis.asyncio as aioredis

    client = aioredis.from_url("redis://127.0.0.1:6379/0")
    await client.delete(*[f"{prefix}:{p}" for p in range(4)])
    await client.aclose()


async def test_projections_run_with_partitions(tmp_path: Path) -> None:
    path = str(tmp_path / "app.db")
    read = str(tmp_path / "read.db")
    log = SqliteTestLog(path)
    for i in range(25):
        await log.append(f"acct-{i % 5}", Deposited(f"acct-{i % 5}", i))
    log.close()
    env = cli_env(CQRSKIT_STORE=f"sqlite:///{path}", CQRSKIT_READ=f"sqlite:///{read}")
    err = tmp_path / "run.err"
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cqrskit", "projections", "run", "--projection",
             "tests.support.bank:balances", "--decoder", "tests.support.bank:serializer",
             "--partitions", "3", "--lease-ttl", "1"],
            cwd=ROOT, env=env, stderr=stderr,
        )  # fmt: skip
    try:
        rows = until_caught_up("balances", env, proc, err)
        assert len(rows) == 3
        out = cqrskit("projections", "status", "--json", env=env)
        [status] = json.loads(out.stdout)
        assert status["mode"] == "partitioned"
        assert status["checkpoint"] == status["head"]
        assert len(status["partitions"]) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, err.read_text()[-3000:]


def test_consume_cli_refuses_a_missing_broker_without_echoing_urls(tmp_path: Path) -> None:
    from cqrskit.cli.consume import open_source

    with pytest.raises(ConfigurationError) as info:
        open_source("http://user:secret@host/")
    assert "secret" not in str(info.value)
    env = cli_env(CQRSKIT_READ=f"sqlite:///{tmp_path}/a.db")
    env.pop("CQRSKIT_BROKER", None)
    out = cqrskit(
        "consume", "run", "--projection", "tests.support.bank:balances",
        "--decoder", "tests.support.bank:serializer", "--partitions", "2", env=env,
    )  # fmt: skip
    assert out.returncode == 2
    assert "CQRSKIT_BROKER" in out.stderr
