"""Replication tests run on clusters of their own: a primary and two streaming standbys on
free ports in a temporary directory (tests/support/pg_replicas.py), one for the session
(each test starts from it healthy again), removed at the end even when a test fails."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from tests.conftest import IN_CI
from tests.support.pg_replicas import INJECTED, PgCluster, postgres_binaries

pytestmark = pytest.mark.postgres


def require_pg_binaries() -> None:
    """Skip (laptop) or fail (CI=true) when initdb/pg_ctl are not installed."""
    if postgres_binaries() is not None:
        return
    text = "the PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) are not installed"
    if IN_CI:
        pytest.fail(f"{text}; under CI=true a missing service is a failure", pytrace=False)
    pytest.skip(text)


@pytest.fixture(scope="session")
def cluster() -> Iterator[PgCluster]:
    """One primary + two standbys for every replication test (about 1.5 s to start)."""
    require_pg_binaries()
    c = PgCluster(standbys=2).start()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def healthy(cluster: PgCluster) -> PgCluster:
    """The cluster with every server up, a standby and replaying (a fault test before may
    have stopped, paused, cut off or promoted one)."""
    cluster.ensure_healthy()
    return cluster


@pytest.fixture
async def schema(cluster: PgCluster) -> AsyncIterator[str]:
    """A fresh schema name on the cluster's primary, dropped (and so from the standbys)
    after the test."""
    name = f"cqrskit_r_{uuid.uuid4().hex[:12]}"
    yield name
    conn = await asyncpg.connect(cluster.primary.dsn, timeout=30)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE', timeout=30)
    finally:
        await conn.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line counting the faults the replication tests injected."""
    if INJECTED:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(INJECTED.items()))
        total = sum(INJECTED.values())
        terminalreporter.write_line(f"replication faults injected: {total} ({kinds})")
