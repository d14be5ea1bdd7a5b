"""Shared fixtures: service availability (skip on a laptop, fail under CI=true), and the
fault ledger whose sums end the run (see tests/support/faults.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile

import pytest

from tests.support import faults

_LEDGER = pytest.StashKey[str]()

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

SERVICES = {
    "postgresql": ("127.0.0.1", 5432),
    "redis": ("127.0.0.1", 6379),
    "rabbitmq": ("127.0.0.1", 5672),
    "nats": ("127.0.0.1", 4222),
    "mariadb": ("127.0.0.1", 3306),
}


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str) -> None:
    """Skip (laptop) or fail (CI=true) when the named local service is not reachable."""
    host, port = SERVICES[name]
    if _reachable(host, port):
        return
    missing(f"{name} is not reachable on {host}:{port}", "start it to run this test")


def missing(text: str, fix: str) -> None:
    """Skip on a laptop, fail under CI=true: something a test needs is not there."""
    if IN_CI:
        pytest.fail(f"{text}; under CI=true a missing service is a failure", pytrace=False)
    pytest.skip(f"{text}; {fix}")


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """DSN of the local PostgreSQL test database (trust auth)."""
    require_service("postgresql")
    return os.environ.get("CQRSKIT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_configure(config: pytest.Config) -> None:
    """Create this session's fault ledger; child processes find it through the environment."""
    if os.environ.get(faults.ENV):
        return  # an outer session (or the caller) already chose one
    fd, path = tempfile.mkstemp(prefix="cqrskit-faults-", suffix=".log")
    os.close(fd)
    os.environ[faults.ENV] = path
    config.stash[_LEDGER] = path


def pytest_unconfigure(config: pytest.Config) -> None:
    path = config.stash.get(_LEDGER, None)
    if path:
        os.environ.pop(faults.ENV, None)
        with contextlib.suppress(OSError):
            os.unlink(path)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """End the run with the count of injected faults and the invariant results."""
    path = os.environ.get(faults.ENV)
    if not path:
        return
    terminalreporter.section("faults")
    for line in faults.summary_lines(faults.read_ledger(path)):
        terminalreporter.write_line(line)
