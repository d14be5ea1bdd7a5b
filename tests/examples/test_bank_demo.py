"""``python -m examples.bank``: the demo runs, checks itself, and needs only the core."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

from examples.bank.app import Bank
from examples.bank.demo import run_demo

ROOT = Path(__file__).resolve().parents[2]

# run the demo with every optional package made unimportable: the SQLite path is core-only
CORE_ONLY = """
import runpy, sys
for name in ("fastapi", "pydantic", "starlette", "httpx", "uvicorn", "asyncpg", "psycopg",
             "sqlalchemy", "msgspec", "orjson", "dishka"):
    sys.modules[name] = None
sys.argv = ["examples.bank", *sys.argv[1:]]
runpy.run_module("examples.bank", run_name="__main__")
"""


async def test_demo_checks_pass_and_counts_add_up(bank: Bank) -> None:
    out = io.StringIO()
    outcome = await run_demo(bank, operations=120, seed=3, out=out)
    assert outcome.ok, out.getvalue()
    assert set(outcome.checks) == {
        "read your own write",
        "money is conserved",
        "history agrees with balances",
        "history caught up",
    }
    assert outcome.accepted["OpenAccount"] == 8
    assert outcome.rejected["overdraft"] > 0  # the seed exercises the domain error
    sent = sum(outcome.accepted.values()) + sum(outcome.rejected.values())
    assert sent == 8 + 8 + 120 + 1  # open + first deposit per customer, operations, the RYW one
    assert await bank.store.head() == outcome.last_token
    text = out.getvalue()
    assert "Summary" in text
    assert "history projection [" in text


def test_python_m_examples_bank_runs_with_only_the_core(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-c", CORE_ONLY, "--operations", "60", "--dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "money is conserved: OK" in proc.stdout
    assert "FAILED" not in proc.stdout
    assert (tmp_path / "d" / "bank.db").exists()
    assert (tmp_path / "d" / "read.db").exists()


def test_unreachable_database_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "examples.bank",
                "--postgres",
                f"postgresql://x@127.0.0.1:{port}/x",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr
