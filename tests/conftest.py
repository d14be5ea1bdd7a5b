"""Shared fixtures: service availability (skip on a laptop, fail under CI=true)."""

from __future__ import annotations

import os
import socket

import pytest

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
    text = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{text}; under CI=true a missing service is a failure", pytrace=False)
    pytest.skip(f"{text}; start it to run this test")


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """DSN of the local PostgreSQL test database (trust auth)."""
    require_service("postgresql")
    return os.environ.get("CQRSKIT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
