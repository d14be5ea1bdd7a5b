"""Faults on real streaming replicas while commands and token queries keep flowing.

Each scenario runs a traffic loop (``send_tracked`` then the query with the token, the same
account, so every read must show exactly the commands sent so far), injects one fault into
a replica, waits (bounded) until the router took it out of rotation, lets traffic run, heals
the fault and waits until the replica is back. What must hold throughout: no read older
than its token, no query longer than its timeout plus the router's bounds, only typed errors
(each retried once, as an application's retry behavior would), and the decisions visible in
``router.status()``. The faults injected are counted in the run's last line.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import pytest
from tests.support import faults as ledger
from tests.support.pg_replicas import INJECTED, PgCluster
from tests.support.proxy import FaultProxy, Mode
from tests.support.replica_app import Deposit, GetAccount, ReplicaApp, open_replica_app

from cqrskit.errors import ReplicaUnavailableError, StaleReadError
from cqrskit.postgres.replica import ReplicaStatus
from cqrskit.projections import read_after

pytestmark = pytest.mark.postgres

TIMEOUT = 3.0  # the queries' wait for their token
SLACK = 2.5  # the router's own bounds (a check, a connect) plus a busy shared machine
FAST_PROBES = {
    "probe_interval": 0.2,
    "probe_timeout": 0.5,
    "connect_timeout": 1.0,
    "query_timeout": 2.0,
    "recover_after": 2,
}


class Traffic:
    """Commands and token queries on one account, in a loop, until stopped."""

    def __init__(self, app: ReplicaApp, account: str, *, policy: str = "wait") -> None:
        self.app = app
        self.account = account
        self.policy = policy
        self.sent = 0
        self.stale = 0
        self.slowest = 0.0
        self.sources = Counter[str]()
        self.errors = Counter[str]()
        self.recent: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 60)

    async def queries(self, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` more queries were answered (bounded)."""
        target = sum(self.sources.values()) + count
        deadline = time.monotonic() + timeout
        while sum(self.sources.values()) < target:
            assert self._task is not None
            if self._task.done():
                self._task.result()  # the loop's own failure, if any
                raise AssertionError("the traffic loop ended")
            assert time.monotonic() < deadline, f"{count} queries not answered in {timeout}s"
            await asyncio.sleep(0.01)  # polling a counter the loop raises

    async def _run(self) -> None:
        while not self._stop.is_set():
            receipt = await self.app.mediator.send_tracked(Deposit(self.account, 1))
            assert receipt.token is not None
            self.sent += 1
            for attempt in (1, 2):
                started = time.monotonic()
                try:
                    async with read_after(
                        receipt.token,
                        policy=self.policy,
                        timeout=TIMEOUT,  # type: ignore[arg-type]
                    ) as state:
                        value = await self.app.mediator.ask(GetAccount(self.account))
                except (ReplicaUnavailableError, StaleReadError) as exc:
                    self.errors[type(exc).__name__] += 1
                    if attempt == 2:
                        raise
                    continue
                finally:
                    self.slowest = max(self.slowest, time.monotonic() - started)
                if value is None or value[1] < self.sent or state.stale:
                    self.stale += 1
                source = state.source or "?"
                self.sources[source] += 1
                self.recent = [*self.recent[-49:], source]
                break


class PlainReads:
    """Queries without a token, in a loop: any replica in rotation serves them."""

    def __init__(self, app: ReplicaApp) -> None:
        self.app = app
        self.done = 0
        self.slowest = 0.0
        self.errors = Counter[str]()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 60)

    async def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await self.app.mediator.ask(GetAccount("me"))
                self.done += 1
            except ReplicaUnavailableError as exc:
                self.errors[type(exc).__name__] += 1
            finally:
                self.slowest = max(self.slowest, time.monotonic() - started)
            await asyncio.sleep(0.005)  # pacing the reader, not synchronization


async def until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.02)  # polling the router's status


def replica(app: ReplicaApp, name: str) -> ReplicaStatus:
    return next(r for r in app.router.status().replicas if r.name == name)


async def open_app(cluster: PgCluster, schema: str, **options: object) -> ReplicaApp:
    dsns = {s.name: s.dsn for s in cluster.standbys}
    return await open_replica_app(cluster.primary.dsn, dsns, schema, **{**FAST_PROBES, **options})


def check_traffic(traffic: Traffic) -> None:
    print(
        f"traffic: {traffic.sent} commands, sources {dict(traffic.sources)}, stale "
        f"{traffic.stale}, errors {dict(traffic.errors)}, slowest query {traffic.slowest:.3f}s"
    )
    assert traffic.stale == 0
    assert traffic.slowest < TIMEOUT + SLACK
    assert set(traffic.errors) <= {"ReplicaUnavailableError"}  # typed, and retried once


async def run_fault(
    cluster: PgCluster,
    schema: str,
    inject: Callable[[], None],
    heal: Callable[[], None],
    reasons: tuple[str, ...],
    **options: object,
) -> Traffic:
    """Traffic, ``inject`` on standby1, wait until it is out for one of ``reasons``, more
    traffic (all of it on standby2), ``heal``, wait until standby1 is back."""
    app = await open_app(cluster, schema, **options)
    traffic = Traffic(app, "me")
    traffic.start()
    try:
        await traffic.queries(30)
        inject()
        await until(
            lambda: (
                not replica(app, "standby1").in_rotation
                and any(r in (replica(app, "standby1").reason or "") for r in reasons)
            ),
            f"standby1 out of rotation ({reasons})",
        )
        await traffic.queries(60)
        assert traffic.recent[-30:] == ["standby2"] * 30
        heal()
        await until(lambda: replica(app, "standby1").in_rotation, "standby1 back in rotation")
        await traffic.queries(30)
        decisions = [d.split(" ", 1)[1] for d in app.router.status().decisions]
        out = max(i for i, d in enumerate(decisions) if d.startswith("standby1 out"))
        assert "standby1 back in rotation" in decisions[out:]
    finally:
        await traffic.stop()
        await app.close()
    check_traffic(traffic)
    return traffic


async def test_replay_paused_on_one_replica(healthy: PgCluster, schema: str) -> None:
    s1 = healthy.standbys[0]
    await run_fault(
        healthy,
        schema,
        lambda: healthy.pause_replay(s1),
        lambda: healthy.resume_replay(s1),
        ("replay paused",),
    )


async def test_replica_stopped_and_restarted(healthy: PgCluster, schema: str) -> None:
    s1 = healthy.standbys[0]
    await run_fault(
        healthy,
        schema,
        lambda: healthy.stop(s1),
        lambda: healthy.start_node(s1),
        ("query failed", "unreachable"),
    )


async def test_replica_sigkilled_and_restarted(healthy: PgCluster, schema: str) -> None:
    s1 = healthy.standbys[0]
    await run_fault(
        healthy,
        schema,
        lambda: healthy.kill(s1),
        lambda: healthy.start_node(s1),
        ("query failed", "unreachable"),
    )


async def test_replica_cut_off_its_primary_lags_out_of_rotation(
    healthy: PgCluster, schema: str
) -> None:
    s1 = healthy.standbys[0]
    await run_fault(
        healthy,
        schema,
        lambda: healthy.disconnect(s1),
        lambda: healthy.reconnect(s1),
        ("lagging",),
        max_lag_seconds=1.0,
    )


async def test_black_holed_replica(healthy: PgCluster, schema: str) -> None:
    """The replica's TCP traffic is swallowed: nothing answers, nothing is refused."""
    s1, s2 = healthy.standbys
    proxy = FaultProxy("127.0.0.1", s1.port)
    await proxy.start()
    app = await open_replica_app(
        healthy.primary.dsn,
        {"standby1": proxy.dsn(s1.dsn), "standby2": s2.dsn},
        schema,
        **FAST_PROBES,  # type: ignore[arg-type]
    )
    traffic = Traffic(app, "me")
    traffic.start()
    plain = PlainReads(app)
    plain.start()
    try:
        await traffic.queries(30)
        for _ in range(3):
            proxy.mode = Mode.BLACKHOLE
            INJECTED["proxy-blackhole"] += 1
            ledger.record("proxy")
            await until(
                lambda: not replica(app, "standby1").in_rotation, "standby1 out (black hole)"
            )
            assert "unreachable" in (replica(app, "standby1").reason or "")
            await traffic.queries(40)
            assert traffic.recent[-20:] == ["standby2"] * 20
            proxy.mode = Mode.FORWARD
            await until(lambda: replica(app, "standby1").in_rotation, "standby1 back")
            await traffic.queries(20)
    finally:
        await plain.stop()
        await traffic.stop()
        await app.close()
        await proxy.close()
    check_traffic(traffic)
    assert traffic.sources["standby1"] > 0
    # queries without a token: bounded by query_timeout when they hit the silent replica
    print(f"plain reads: {plain.done}, errors {dict(plain.errors)}, slowest {plain.slowest:.3f}s")
    assert plain.done > 0
    assert plain.slowest < FAST_PROBES["query_timeout"] + SLACK
    assert set(plain.errors) <= {"ReplicaUnavailableError"}


async def test_no_replica_left(healthy: PgCluster, schema: str) -> None:
    """Both replicas stopped: queries go to the primary, or fail at once, by option."""
    app = await open_app(healthy, schema)
    strict = await open_app(healthy, schema, when_no_replica="fail")
    try:
        receipt = await app.mediator.send_tracked(Deposit("a", 1))
        assert receipt.token is not None
        for s in healthy.standbys:
            healthy.stop(s, "immediate")
        await until(
            lambda: (
                not any(r.in_rotation for r in app.router.status().replicas)
                and not any(r.in_rotation for r in strict.router.status().replicas)
            ),
            "both replicas out",
        )
        async with read_after(receipt.token) as state:
            assert await app.mediator.ask(GetAccount("a")) == (1, 1)
        assert state.source == "primary"
        assert await app.mediator.ask(GetAccount("a")) == (1, 1)  # no token: primary too
        assert any("no replica in rotation" in d for d in app.router.status().decisions)
        started = time.monotonic()
        with pytest.raises(ReplicaUnavailableError):
            async with read_after(receipt.token):
                await strict.mediator.ask(GetAccount("a"))
        with pytest.raises(ReplicaUnavailableError):
            await strict.mediator.ask(GetAccount("a"))
        assert time.monotonic() - started < TIMEOUT + SLACK
    finally:
        await strict.close()
        await app.close()
        for s in healthy.standbys:
            healthy.start_node(s)


async def test_promoted_replica_leaves_the_rotation(healthy: PgCluster, schema: str) -> None:
    """Failover is the operator's job; a standby that became a primary is not read from."""
    s2 = healthy.standbys[1]
    app = await open_app(healthy, schema)
    traffic = Traffic(app, "me")
    traffic.start()
    try:
        await traffic.queries(20)
        healthy.promote(s2)
        await until(lambda: not replica(app, "standby2").in_rotation, "standby2 out")
        assert "promoted" in (replica(app, "standby2").reason or "")
        await traffic.queries(40)
        assert traffic.recent[-20:] == ["standby1"] * 20
    finally:
        await traffic.stop()
        await app.close()
        healthy.reclone(s2)
    check_traffic(traffic)
