"""The replica router without servers: options, the gate's hand-off, lag arithmetic, and the
``primary`` policy on a database without replicas."""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cqrskit import Mediator, Query, Registry, ReplicaUnavailableError, for_queries
from cqrskit.errors import ConfigurationError, PersistenceError, StaleReadError
from cqrskit.eventlog import InMemoryEventStore
from cqrskit.projections import (
    ConsistencyGate,
    ReadDatabase,
    Session,
    TokenRequest,
    ask_consistent,
    current_read_after,
    reads,
    schema,
)
from cqrskit.sqlite import SqliteReadDatabase
from tests.support.bank import Deposited, balances
from tests.support.sqlite_log import SqliteTestLog

pytest.importorskip("asyncpg")

import asyncpg

from cqrskit.postgres import PostgresReadDatabase
from cqrskit.postgres._replica_nodes import Lag, Node, Pool, describe_problem, failure_kind
from cqrskit.postgres.replica import PostgresReplicaRouter

DSN = "postgresql://nobody@127.0.0.1:1/none"  # nothing listens there: refused at once


def router(**options: Any) -> PostgresReplicaRouter:
    replicas = options.pop("replicas", [DSN])
    return PostgresReplicaRouter(PostgresReadDatabase(DSN, schema="app"), replicas, **options)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"replicas": DSN}, "list of DSNs"),
        ({"replicas": {"primary": DSN}}, "name other than 'primary'"),
        ({"replicas": {"Bad Name": DSN}}, "replica name"),
        ({"replicas": {"r1": ""}}, "needs a DSN"),
        ({"probe_interval": 0}, "probe_interval"),
        ({"probe_timeout": float("nan")}, "probe_timeout"),
        ({"max_lag_seconds": float("inf")}, "max_lag_seconds"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"query_timeout": True}, "query_timeout"),
        ({"max_lag_bytes": -5}, "max_lag_bytes"),
        ({"recover_after": 0}, "recover_after"),
        ({"pool_size": 0}, "pool_size"),
        ({"when_no_replica": "sometimes"}, "when_no_replica"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        router(**options)


def test_the_primary_must_be_a_postgres_read_database() -> None:
    with pytest.raises(ConfigurationError, match="PostgresReadDatabase"):
        PostgresReplicaRouter(object(), [DSN])  # type: ignore[arg-type]


def test_names_and_repr_show_no_dsn() -> None:
    r = router(replicas={"east": DSN, "west": DSN})
    assert repr(r) == "PostgresReplicaRouter(schema='app', replicas=[east, west])"
    assert [s.name for s in r.status().replicas] == ["east", "west"]
    assert all(not s.in_rotation and s.reason == "not probed yet" for s in r.status().replicas)
    assert router().status().replicas[0].name == "replica1"
    assert router().routes_tokens is True


def test_lag_is_the_age_of_the_oldest_wal_the_replica_lacks() -> None:
    lag = Lag(keep=60.0)
    assert lag.seconds(0) == 0.0  # nothing sampled yet
    lag.sample(100)
    lag.sample(100)  # unchanged: the older sample is kept
    lag.sample(200)
    assert lag.latest() == 200
    assert lag.seconds(200) == 0.0  # has everything of the latest sample
    assert lag.seconds(250) == 0.0
    behind = lag.seconds(150)  # lacks the WAL sampled at 200
    assert 0.0 <= behind < 1.0
    assert lag.seconds(50) >= behind  # lacks even the first sample: older


def test_replica_unavailable_error_is_a_persistence_error_naming_the_replica() -> None:
    exc = ReplicaUnavailableError("gone", replica="east", hint="retry")
    assert isinstance(exc, PersistenceError)
    assert exc.replica == "east"
    assert str(exc) == "gone Hint: retry"


# -- the gate hands a routing database the resolved request ----------------------------------


@reads("balances", policy="stale", timeout=60.0)
@dataclass(frozen=True, slots=True)
class GetBalance(Query[int]):
    account: str


class Routing(ReadDatabase):
    """A routing read database that records what the gate handed it."""

    dialect = "postgres"
    routes_tokens = True

    def __init__(self) -> None:
        self.seen: list[TokenRequest | None] = []

    def transaction(self) -> AbstractAsyncContextManager[Session]:
        raise NotImplementedError

    def read_only(self) -> AbstractAsyncContextManager[Session]:
        return self._ro()

    @asynccontextmanager
    async def _ro(self) -> AsyncIterator[Session]:
        state = current_read_after()
        self.seen.append(state.request if state else None)
        if state is not None:
            state.source = "replica9"
        yield None  # type: ignore[misc]

    def inline(self, connection: Any) -> Session:
        raise NotImplementedError

    async def close(self) -> None:
        return None


async def test_the_gate_hands_the_request_to_a_routing_database() -> None:
    db = Routing()
    store = InMemoryEventStore()
    gate = ConsistencyGate(store, db, max_timeout=5.0)
    registry = Registry()

    @registry.handler
    async def get_balance(q: GetBalance) -> int:
        async with db.read_only():
            pass
        return 7

    mediator = Mediator(registry, behaviors=[for_queries(gate.behavior)])
    before = time.monotonic()
    got = await ask_consistent(mediator, GetBalance("a"), 123)
    assert (got.value, got.stale) == (7, False)
    request = db.seen[0]
    assert request is not None
    assert (request.token, request.projections, request.policy) == (123, ("balances",), "stale")
    assert request.timeout == 5.0  # bounded by max_timeout
    assert before + 5.0 <= request.deadline <= time.monotonic() + 5.0
    assert request.store is store
    # after the query the request is gone: reads outside it (say, an authorization check
    # of the next query) get no stale deadline
    await mediator.ask(GetBalance("a"))
    assert db.seen[1] is None


async def test_policy_primary_waits_like_wait_without_replicas(tmp_path: Path) -> None:
    """On a database that does not route, 'primary' has nowhere else to go: it waits."""
    log = SqliteTestLog(str(tmp_path / "w.db"))
    read_db = SqliteReadDatabase(str(tmp_path / "r.db"))
    try:
        async with read_db.transaction() as s:  # set up, never fed: always behind
            await schema.install(s)
            await schema.ensure_projection(s, balances, "async")
        uow = await log.begin()
        uow.record("a", Deposited("a", 1))
        token = await uow.commit()
        assert token is not None
        gate = ConsistencyGate(log, read_db)
        started = time.monotonic()
        with pytest.raises(StaleReadError):
            await gate.check(["balances"], token, "primary", 0.2)
        assert time.monotonic() - started >= 0.2
    finally:
        await read_db.close()
        log.close()


# -- rotation decisions ------------------------------------------------------------------------


def node(name: str, *, primary: bool = False) -> tuple[Node, list[tuple[str, int]]]:
    records: list[tuple[str, int]] = []
    pool = Pool(DSN, 1, "app", 1.0, 1.0)
    n = Node(name, DSN, primary=primary, pool=pool, record=lambda t, lv: records.append((t, lv)))
    return n, records


def test_a_replica_leaves_at_once_and_returns_after_healthy_probes() -> None:
    r, records = node("r1")
    r.judge(None, recover_after=2)  # first probe healthy: in at once
    assert r.in_rotation
    r.judge("unreachable (OSError: refused)", recover_after=2)
    assert (r.in_rotation, r.reason) == (False, "unreachable (OSError: refused)")
    r.judge("unreachable (TimeoutError: )", recover_after=2)  # same kind: not logged again
    r.judge(None, recover_after=2)
    assert not r.in_rotation  # one healthy probe is not enough
    r.judge(None, recover_after=2)
    assert r.in_rotation
    assert [t for t, _ in records] == [
        "r1 back in rotation",
        "r1 out of rotation: unreachable (OSError: refused)",
        "r1 back in rotation",
    ]
    assert [level for _, level in records] == [logging.INFO, logging.WARNING, logging.INFO]
    r.fail("query failed (ConnectionResetError)")
    assert not r.in_rotation
    assert r.status().failures == 1


async def test_an_unreachable_reason_is_short_and_the_driver_text_goes_to_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r, _ = node("r1")  # DSN: nothing listens on 127.0.0.1:1
    with caplog.at_level(logging.DEBUG, logger="cqrskit.postgres.replica"):
        problem = await r.probe(5.0)
    assert problem == "unreachable (connection refused)"
    assert "probe of r1 failed: ConnectionRefusedError" in caplog.text

    async def refused(timeout: float) -> Any:
        raise asyncpg.InvalidPasswordError(
            'password authentication failed for user "canary_user" of database "canary_db"'
        )

    r._ask = refused  # type: ignore[method-assign]
    assert await r.probe(5.0) == "unreachable (authentication refused, SQLSTATE 28P01)"


async def test_last_error_is_a_failure_kind_and_the_driver_text_goes_to_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed session on the primary keeps, and names in the error a fallback raises, a few
    fixed words and the SQLSTATE: never the driver's text (users, hosts, databases, data)."""
    r = router(replicas=[])
    driver_text = 'password authentication failed for user "canary_user" of "canary_db"'

    async def refused(timeout: float) -> Any:
        raise asyncpg.InvalidPasswordError(driver_text)

    r._primary.pool.acquire = refused  # type: ignore[method-assign]
    try:
        with (
            caplog.at_level(logging.DEBUG, logger="cqrskit.postgres.replica"),
            pytest.raises(PersistenceError) as caught,
        ):
            async with r.read_only():
                pass
        kind = "authentication refused, SQLSTATE 28P01"
        assert r._primary.last_error == kind
        assert f"({kind})" in str(caught.value)
        assert "canary" not in str(caught.value)
        above_debug = [rec.getMessage() for rec in caplog.records if rec.levelno > logging.DEBUG]
        assert f"a query session on the primary failed ({kind})" in above_debug
        assert not [m for m in above_debug if "canary" in m]
        assert driver_text in caplog.text  # at debug, for whoever debugs the connection
    finally:
        await r.close()


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (TimeoutError(), "timeout"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('10.0.0.7', 5432)"),
         "connection refused"),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "connection lost"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
         "host name not resolved"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "network error EHOSTUNREACH"),
        (OSError("Multiple exceptions: [Errno 111] ..., [Errno 99] ..."), "network error"),
        (asyncpg.CannotConnectNowError("the database system is starting up"),
         "not accepting connections, SQLSTATE 57P03"),
        (asyncpg.TooManyConnectionsError("sorry, too many clients already"),
         "too many connections, SQLSTATE 53300"),
        (asyncpg.InvalidCatalogNameError('database "canary_db" does not exist'),
         "no such database, SQLSTATE 3D000"),
        (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle"),
         "connection lost, SQLSTATE 08003"),
        (asyncpg.AdminShutdownError("terminating connection"), "shutting down, SQLSTATE 57P01"),
        (asyncpg.UndefinedFunctionError("function pg_last_wal_replay_lsn() does not exist"),
         "server error, SQLSTATE 42883"),
        (asyncpg.InterfaceError("cannot perform operation: connection is closed"),
         "connection unusable"),
    ],
)  # fmt: skip
def test_failures_are_classified_in_a_few_fixed_words(exc: BaseException, kind: str) -> None:
    assert failure_kind(exc) == kind


def test_lag_bounds_promotion_pause_and_cluster_are_problems() -> None:
    primary, _ = node("primary", primary=True)
    primary.system_id = "7"
    r, _ = node("r1")
    r.in_recovery, r.replay_paused, r.system_id, r.lsn = True, False, "7", 1_000
    lag = Lag(keep=60.0)
    lag.sample(1_000)
    assert describe_problem(r, primary, lag, 5.0, 100) is None
    assert (r.lag_bytes, r.lag_seconds) == (0, 0.0)
    lag.sample(5_000)
    assert "lagging 4000 bytes" in (describe_problem(r, primary, lag, 5.0, 100) or "")
    assert describe_problem(r, primary, lag, 5.0, 10_000) is None
    assert "lagging" in (describe_problem(r, primary, lag, -1.0, 10_000) or "")  # any age
    r.replay_paused = True
    assert "replay paused" in (describe_problem(r, primary, lag, 5.0, 10_000) or "")
    r.system_id = "8"
    assert "not a standby of this primary" in (describe_problem(r, primary, lag, 5.0, 1) or "")
    r.in_recovery = False
    assert "promoted" in (describe_problem(r, primary, lag, 5.0, 1) or "")
