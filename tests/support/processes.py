"""Projector subprocesses for crash tests (``python -m cqrskit.projections run``, or the
same CLI with fail points armed: :mod:`tests.support.projector_proc`)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.support import faults

ROOT = Path(__file__).resolve().parents[2]


def start_projector(
    log_path: str,
    read_path: str,
    owner: str,
    *,
    lease_ttl: float = 0.3,
    batch_size: int = 7,
    failpoint: str | None = None,
    trace: Path | None = None,
    wall_clock: Path | None = None,
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
        failpoint=failpoint,
        trace=trace,
        wall_clock=wall_clock,
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` (counted in the fault ledger if it is a fault) and reap the process."""
    faults.send_signal(proc, sig)
    return proc.wait(timeout=20)


def read_trace(trace: Path) -> list[tuple[str, int, int, int]]:
    """The fail points a projector process reached: ``(point, epoch, first, last)``."""
    if not trace.exists():
        return []
    out = []
    for line in trace.read_text().splitlines():
        point, epoch, first, last = line.split()
        out.append((point, int(epoch), int(first), int(last)))
    return out


def spawn(
    connection_args: list[str],
    env_extra: dict[str, str],
    log_file: Path,
    owner: str,
    *,
    lease_ttl: float,
    batch_size: int,
    failpoint: str | None = None,
    trace: Path | None = None,
    wall_clock: Path | None = None,
) -> subprocess.Popen[bytes]:
    """``python -m cqrskit.projections run`` for the test bank projection; stderr to a file.

    With ``failpoint`` (``point:n:action``), ``trace`` or ``wall_clock`` (a file holding an
    offset in seconds) the process is started through :mod:`tests.support.projector_proc`,
    which arms the library's fail points and shifts the process's wall clock.
    """
    env = dict(os.environ) | env_extra
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    module = "cqrskit.projections"
    if failpoint or trace or wall_clock:
        module = "tests.support.projector_proc"
        env["CQRSKIT_TEST_FAILPOINT"] = failpoint or ""
        env["CQRSKIT_TEST_TRACE"] = str(trace or "")
        env["CQRSKIT_TEST_WALL_CLOCK"] = str(wall_clock or "")
    args = [
        sys.executable, "-m", module, "run", *connection_args,
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


async def until_trace(
    proc: subprocess.Popen[bytes], trace: Path, point: str, nth: int, timeout: float = 30.0
) -> tuple[str, int, int, int]:
    """Wait until the process traced ``point`` for the ``nth`` time; return that line."""
    deadline = time.monotonic() + timeout
    while True:
        hits = [t for t in read_trace(trace) if t[0] == point]
        if len(hits) >= nth:
            return hits[nth - 1]
        assert proc.poll() is None, f"projector exited ({proc.returncode}) before {point}"
        assert time.monotonic() < deadline, f"{point} #{nth} not reached in {timeout}s"
        await asyncio.sleep(0.01)


def is_stopped(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the process is stopped (SIGSTOP): state ``T`` in ``/proc/<pid>/stat``."""
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] in ("T", "t")


async def until_stopped(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Wait until the process has stopped itself (a ``stop`` fail point)."""
    deadline = time.monotonic() + timeout
    while not is_stopped(proc):
        assert proc.poll() is None, f"process exited ({proc.returncode}) instead of stopping"
        assert time.monotonic() < deadline, f"process did not stop within {timeout}s"
        await asyncio.sleep(0.01)


async def until_refused_or_committed(
    proc_log: Path, since: int, trace: Path, timeout: float = 20.0
) -> tuple[bool, list[tuple[str, int, int, int]]]:
    """After a paused leader resumed: wait until it either logged (past byte ``since`` of
    its log) that its lease was lost, i.e. its commit was refused, or traced a step of that
    commit; return (refused, the steps it traced after resuming)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = read_trace(trace)
        marks = [i for i, t in enumerate(lines) if t[0] == "resumed"]
        steps = lines[marks[-1] + 1 :] if marks else []
        with proc_log.open("rb") as f:
            f.seek(since)
            refused = marks != [] and b"lease lost" in f.read()
        if refused or steps:
            return refused, steps
        assert time.monotonic() < deadline, (
            f"resumed leader neither committed nor stood by in {timeout}s"
        )
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
