"""The CLI as real processes: ``python -m cqrskit`` and the console script from a project
directory; ``projections run`` saying what it does (text and ``--json``) and handing its
lease over on SIGTERM; ``rebuild --wait`` and ``dead-letters --retry --wait`` following a
projector's work with progress."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support.bank import Deposited, Poison, balances, serializer
from tests.support.sqlite_log import SqliteTestLog

from cqrskit.projections import Projector
from cqrskit.sqlite import SqliteReadDatabase

ROOT = Path(__file__).resolve().parents[3]
DEADLINE = 60.0

APP = """
from dataclasses import dataclass
from cqrskit import Command, Registry

registry = Registry()

@dataclass(frozen=True)
class Hello(Command[str]):
    name: str

@registry.handler
async def hello(cmd: Hello) -> str:
    return cmd.name
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # the library is importable; the user's project (the working directory) is not
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    env.update(extra)
    return env


def _scripts(tmp_path: Path) -> list[list[str]]:
    """Ways to run the console script: the installed one, and one written as pip writes
    it (a script file: Python puts the script's folder on the path, not the cwd)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "cqrskit"
    wrapper.write_text("import sys\nfrom cqrskit.cli import main\nsys.exit(main())\n")
    found = [[sys.executable, str(wrapper)]]
    installed = Path(sys.executable).with_name("cqrskit")
    if installed.exists():
        found.append([str(installed)])
    return found


def test_python_m_cqrskit_and_the_console_script_find_the_project(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "myapp.py").write_text(APP)
    env = _env()
    runs = [[sys.executable, "-m", "cqrskit"], *_scripts(tmp_path)]
    for command in runs:
        proc = subprocess.run(
            [*command, "routes", "myapp:registry"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        assert proc.returncode == 0, (command, proc.stderr)
        assert "Hello" in proc.stdout
        assert "myapp.hello" in proc.stdout
    # from elsewhere the module is not found, and the error says where to run from
    proc = subprocess.run(
        [sys.executable, "-m", "cqrskit", "routes", "myapp:registry"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert proc.returncode == 2
    assert "run from the project root" in proc.stderr


def _run_projector(
    tmp_path: Path, owner: str, *, json_logs: bool
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{owner}.log"
    args = [
        sys.executable, "-m", "cqrskit", "projections", "run",
        "--store", "tests.support.sqlite_log:from_env",
        "--read", f"sqlite:///{tmp_path / 'read.db'}",
        "--projection", "tests.support.bank:balances",
        "--decoder", "tests.support.bank:serializer",
        "--owner", owner, "--lease-ttl", "30",
    ]  # fmt: skip
    if json_logs:
        args.append("--json")
    env = _env(CQRSKIT_TEST_LOG=str(tmp_path / "write.db"))
    with log.open("wb") as err:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    return proc, log


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + DEADLINE
    while True:
        found = path.read_text() if path.exists() else ""
        if text in found:
            return found
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged (exit {proc.poll()}):\n{found}")
        time.sleep(0.05)  # another process writes the log: a bounded poll


async def test_run_says_what_it_does_and_hands_its_lease_over(tmp_path: Path) -> None:
    log = SqliteTestLog(tmp_path / "write.db")
    for i in range(3):
        await log.append(f"acc-{i}", Deposited(f"acc-{i}", 10))
    log.close()
    first, first_log = _run_projector(tmp_path, "first", json_logs=True)
    second = None
    try:
        _wait_for_text(first_log, '"caught-up"', first)
        second, second_log = _run_projector(tmp_path, "second", json_logs=False)
        _wait_for_text(second_log, "waiting: the lease is held by first", second)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=DEADLINE) == 0
        # the lease was released on the way out: the standby takes it well before the
        # 30 s lease_ttl would have run out
        started = time.monotonic()
        text = _wait_for_text(second_log, "balances: caught up at position 3", second)
        assert time.monotonic() - started < 25
        assert "balances: lease taken" in text
        second.send_signal(signal.SIGINT)
        assert second.wait(timeout=DEADLINE) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=DEADLINE)
    records = [json.loads(line) for line in first_log.read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events[:3] == ["started", "lease-taken", "caught-up"], events
    assert events[-1] == "stopped"
    caught = records[2]
    assert (caught["name"], caught["checkpoint"]) == ("balances", 3)
    plain = second_log.read_text().splitlines()
    assert len(plain) <= 6, plain  # quiet: one line per change, not per batch
    assert "projector second started: balances" in plain[0]


async def _child(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cqrskit",
        *args,
        cwd=ROOT,
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_rebuild_and_dead_letter_replay_show_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = tmp_path / "poison.flag"
    flag.touch()
    monkeypatch.setenv("CQRSKIT_TEST_POISON_FLAG", str(flag))
    log = SqliteTestLog(tmp_path / "write.db")
    read = f"sqlite:///{tmp_path / 'read.db'}"
    db = SqliteReadDatabase(str(tmp_path / "read.db"))
    for i in range(40):
        await log.append(f"acc-{i % 5}", Deposited(f"acc-{i % 5}", 1))
    [last] = await log.append("acc-p", Poison("acc-p"))
    try:
        async with Projector(log, db, [balances], serializer, batch_size=7) as projector:
            for _ in range(400):  # bounded: 20 s
                if projector.checkpoint("balances") >= last.position:
                    break
                await projector.signal.wait(0.05)
            assert projector.checkpoint("balances") >= last.position

            code, out, err = await _child(
                "projections", "rebuild", "--read", read,
                "--projection", "tests.support.bank:balances", "--wait",
            )  # fmt: skip
            assert code == 0, err
            assert "rebuilding into generation 2" in out
            assert "switched to generation 2" in out
            assert "rebuilding generation 2:" in err  # progress lines (not a terminal)

            code, out, _ = await _child("projections", "dead-letters", "--read", read, "balances")
            assert "bank.poison" in out
            flag.unlink()  # the bug is fixed
            code, out, err = await _child(
                "projections", "dead-letters", "--read", read, "balances", "--retry", "--wait"
            )
            assert code == 0, err
            assert "1 parked event(s) flagged for retry" in out
            assert "no dead letters left" in out
            assert "replaying dead letters:" in err
    finally:
        await db.close()
        log.close()
