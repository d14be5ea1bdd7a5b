"""The example bank under real ASGI servers, stopped by a real signal.

The bank opens in the application's lifespan (``install(app, services)``); a signal to the
server must stop the in-process ``history`` projector (its batch committed or abandoned),
release its lease at once — not after ``lease_ttl`` — and close the stores, and the server
must exit cleanly. uvicorn gets SIGTERM and SIGINT. gunicorn's master passes SIGTERM on to
its workers as SIGTERM, and SIGINT and SIGQUIT (its quick shutdown) as SIGQUIT, which the
stock ``uvicorn_worker.UvicornWorker`` ignores until the master kills it; with
``cqrskit.gunicorn.UvicornWorker`` all three stop the application gracefully.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0


def _env(directory: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    env["BANK_DIR"] = str(directory)
    return env


def _listening_socket() -> socket.socket:
    # bound and listening before the server starts: the port is ours (no free-port race)
    # and early connections wait in the backlog
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def _request(port: int, method: str, path: str, body: object = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"X-Customer": "teller", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _until(check: object, what: str, proc: subprocess.Popen[bytes], log: Path) -> object:
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            found = check()  # type: ignore[operator]
        except (OSError, sqlite3.OperationalError):
            found = None
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {DEADLINE}s:\n{log.read_text()}")
        time.sleep(0.05)  # polling another process's state: a bounded poll, not a sync


def _lease(read_db: Path) -> tuple[str | None, int, int]:
    conn = sqlite3.connect(read_db, timeout=10)
    try:
        row = conn.execute(
            "SELECT p.lease_owner, p.lease_epoch, c.position FROM cqrskit_projections p "
            "JOIN cqrskit_checkpoints c ON c.projection = p.name "
            "AND c.generation = p.active_generation WHERE p.name = 'history'"
        ).fetchone()
    finally:
        conn.close()
    assert row is not None
    return row[0], int(row[1]), int(row[2])


def _exercise_and_stop(
    proc: subprocess.Popen[bytes], port: int, directory: Path, log: Path, sig: int
) -> None:
    try:
        _until(lambda: _request(port, "GET", "/accounts")[0] == 200, "startup", proc, log)
        status, _ = _request(port, "POST", "/accounts", {"owner": "ada", "account_id": "a1"})
        assert status == 201
        for amount in (500, 700, 900):
            status, _ = _request(port, "POST", "/accounts/a1/deposits", {"amount": amount})
            assert status == 200
        read_db = directory / "read.db"
        # the projector holds the lease and has applied the 4 events
        owner, epoch, _ = _until(
            lambda: (s := _lease(read_db))[0] and s[2] >= 4 and s, "catch-up", proc, log
        )  # type: ignore[misc]
        assert owner
        assert epoch >= 1
        proc.send_signal(sig)
        code = proc.wait(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=DEADLINE)
    text = log.read_text()
    # a clean exit: 0, or (uvicorn >= 0.29) the signal raised again after the graceful
    # shutdown so that a supervisor sees why the process ended
    assert code in (0, -sig), text
    after_owner, after_epoch, checkpoint = _lease(read_db)
    assert after_owner is None, f"lease still held by {after_owner}:\n{text}"
    assert after_epoch == epoch
    assert checkpoint >= 4
    assert "Application shutdown complete" in text or "Shutting down" in text, text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_uvicorn_stops_on_a_signal_and_releases_the_lease(tmp_path: Path, sig: int) -> None:
    sock = _listening_socket()
    port = sock.getsockname()[1]
    log = tmp_path / "server.log"
    directory = tmp_path / "bank"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "examples.bank.api:app_from_env",
                "--fd",
                str(sock.fileno()),
                "--log-level",
                "info",
                "--no-access-log",
            ],
            cwd=ROOT,
            env=_env(directory),
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=[sock.fileno()],
        )
    sock.close()
    _exercise_and_stop(proc, port, directory, log, sig)


def _no_control_socket() -> list[str]:
    # gunicorn >= 24 opens a control socket in the home directory by default: not ours to
    # create, and shared between concurrent test runs
    from gunicorn.config import Config

    return ["--no-control-socket"] if "control_socket_disable" in Config().settings else []


@pytest.mark.parametrize(
    ("worker", "sig"),
    [
        ("uvicorn_worker.UvicornWorker", signal.SIGTERM),
        ("cqrskit.gunicorn.UvicornWorker", signal.SIGTERM),
        ("cqrskit.gunicorn.UvicornWorker", signal.SIGINT),
        ("cqrskit.gunicorn.UvicornWorker", signal.SIGQUIT),
    ],
    ids=["stock-SIGTERM", "cqrskit-SIGTERM", "cqrskit-SIGINT", "cqrskit-SIGQUIT"],
)
def test_gunicorn_with_uvicorn_workers_stops_on_a_signal(
    tmp_path: Path, worker: str, sig: int
) -> None:
    pytest.importorskip("gunicorn", reason="gunicorn is in the dev extra")
    pytest.importorskip("uvicorn_worker", reason="uvicorn-worker is in the dev extra")
    sock = _listening_socket()
    port = sock.getsockname()[1]
    log = tmp_path / "server.log"
    directory = tmp_path / "bank"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-k",
                worker,
                "--workers",
                "1",
                "--bind",
                f"fd://{sock.fileno()}",
                "--graceful-timeout",
                "30",
                *_no_control_socket(),
                "examples.bank.api:app_from_env()",
            ],
            cwd=ROOT,
            env=_env(directory),
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=[sock.fileno()],
        )
    sock.close()
    _exercise_and_stop(proc, port, directory, log, sig)
