"""Projector subprocesses for crash tests (``python -m cqrskit.projections run``)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def start_projector(
    log_path: str,
    read_path: str,
    owner: str,
    *,
    lease_ttl: float = 0.3,
    batch_size: int = 7,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A projector process on the SQLite test log (``log_path``) and read file."""
    return spawn(
        ["--store", "tests.support.sqlite_log:from_env", "--read", f"sqlite:///{read_path}"],
        {"CQRSKIT_TEST_LOG": log_path, **(env or {})},
        Path(read_path).with_name(f"projector-{owner}.log"),
        owner,
        lease_ttl=lease_ttl,
        batch_size=batch_size,
    )


def spawn(
    connection_args: list[str],
    env_extra: dict[str, str],
    log_file: Path,
    owner: str,
    *,
    lease_ttl: float,
    batch_size: int,
) -> subprocess.Popen[bytes]:
    """``python -m cqrskit.projections run`` for the test bank projection; stderr to a file."""
    env = dict(os.environ) | env_extra
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    args = [
        sys.executable, "-m", "cqrskit.projections", "run", *connection_args,
        "--projection", "tests.support.bank:balances",
        "--decoder", "tests.support.bank:serializer",
        "--batch-size", str(batch_size),
        "--lease-ttl", str(lease_ttl),
        "--owner", owner,
    ]  # fmt: skip
    with log_file.open("ab") as err:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


def read_state(read_path: str) -> tuple[int, str | None, int]:
    """(checkpoint, lease owner, lease epoch) of the balances projection; zeros if not set up."""
    conn = sqlite3.connect(read_path, timeout=10)
    try:
        row = conn.execute(
            "SELECT c.position, p.lease_owner, p.lease_epoch FROM cqrskit_projections p "
            "JOIN cqrskit_checkpoints c ON c.projection = p.name "
            "AND c.generation = p.active_generation WHERE p.name = 'balances'"
        ).fetchone()
    except sqlite3.OperationalError:
        return (0, None, 0)
    finally:
        conn.close()
    return (int(row[0]), row[1], int(row[2])) if row else (0, None, 0)


async def until_state(
    read_path: str, check: object, timeout: float = 20.0
) -> tuple[int, str | None, int]:
    """Poll the read database (another process writes it) until ``check(state)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        state = read_state(read_path)
        if check(state):  # type: ignore[operator]
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"state {state} did not satisfy the condition in {timeout}s")
        await asyncio.sleep(0.01)


def invariants(log_path: str, read_path: str) -> dict[str, int]:
    """Compare the read model with the log: lost, double-applied, reordered counts."""
    log = sqlite3.connect(log_path, timeout=10)
    read = sqlite3.connect(read_path, timeout=10)
    try:
        expected = {
            stream: (int(total), int(count), int(top))
            for stream, total, count, top in log.execute(
                "SELECT stream, sum(json_extract(data, '$.amount')), count(*), max(version) "
                "FROM cqrskit_events GROUP BY stream"
            )
        }
        got = {
            r[0]: (int(r[1]), int(r[2]), int(r[3]))
            for r in read.execute("SELECT id, balance, applied, last_version FROM accounts")
        }
        order_errors = read.execute("SELECT count(*) FROM order_errors").fetchone()[0]
    finally:
        log.close()
        read.close()
    lost = sum(max(0, exp[1] - got.get(s, (0, 0, 0))[1]) for s, exp in expected.items())
    double = sum(max(0, g[1] - expected.get(s, (0, 0, 0))[1]) for s, g in got.items())
    wrong_sum = sum(1 for s, exp in expected.items() if got.get(s, (0, 0, 0))[0] != exp[0])
    return {"lost": lost, "double": double, "reordered": int(order_errors), "wrong_sum": wrong_sum}
