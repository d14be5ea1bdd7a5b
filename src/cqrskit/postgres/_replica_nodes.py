"""Servers behind the replica router: a small connection pool per server, the health probe,
the rotation decisions and the status records.

A replica is **in rotation** while its last probe found it reachable, still a standby, of
the same cluster as the primary, replaying, and within the lag bounds. One failed check
takes it out at once (queries must not wait on a sick server); it comes back after
``recover_after`` healthy probes in a row. Every change is logged and kept in the router's
decision list.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from cqrskit.errors import MissingExtraError

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("postgres", "asyncpg") from exc

__all__: list[str] = []

_log = logging.getLogger("cqrskit.postgres.replica")

# errors that say "this server (or the way to it) is not answering", not "the SQL is wrong"
UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
    OSError,
    TimeoutError,
)

# errors of a statement that mean the server is gone, not that the SQL is wrong. asyncpg's
# InternalClientError is among them: a connection that read the server's FATAL goodbye
# while idle (a shutdown, an idle timeout) before seeing it close refuses the next
# statement with one ("cannot switch to state ...") and ends itself
LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.InternalClientError,
    OSError,
)

_PROBE_STANDBY = (
    "SELECT pg_is_in_recovery(), "
    "(pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint, "
    "CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END"
)
_PROBE_PRIMARY = (
    "SELECT pg_is_in_recovery(), "
    "CASE WHEN NOT pg_is_in_recovery() THEN (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint END"
)
_SYSTEM_ID = "SELECT system_identifier::text FROM pg_control_system()"


def _kind(reason: str | None) -> str:
    return (reason or "").split(" ", 1)[0]


# server errors a probe or a connect can meet, in a few words each (order: subclasses first)
_SERVER_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (asyncpg.CannotConnectNowError, "not accepting connections"),
    (asyncpg.AdminShutdownError, "shutting down"),
    (asyncpg.CrashShutdownError, "crash shutdown"),
    (asyncpg.TooManyConnectionsError, "too many connections"),
    (asyncpg.InvalidAuthorizationSpecificationError, "authentication refused"),
    (asyncpg.InvalidCatalogNameError, "no such database"),
    (asyncpg.PostgresConnectionError, "connection lost"),
)


def failure_kind(exc: BaseException) -> str:
    """Why a server could not be asked, in a few fixed words (plus an errno or SQLSTATE
    code): a status or an error never carries the driver's text, which can name users,
    hosts and databases and runs to hundreds of characters. Log that text at debug."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionError):
        return "connection lost"
    if isinstance(exc, socket.gaierror):
        return "host name not resolved"
    if isinstance(exc, OSError):
        code = errno.errorcode.get(exc.errno or 0)
        return f"network error {code}" if code else "network error"
    if isinstance(exc, asyncpg.PostgresError):
        words = next((w for cls, w in _SERVER_ERRORS if isinstance(exc, cls)), "server error")
        sqlstate = getattr(exc, "sqlstate", None)
        return f"{words}, SQLSTATE {sqlstate}" if sqlstate else words
    if isinstance(exc, asyncpg.InterfaceError):
        return "connection unusable"
    return type(exc).__name__


def lsn_text(lsn: int | None) -> str | None:
    """An LSN in PostgreSQL's ``X/X`` notation."""
    return None if lsn is None else f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica as the router last saw it.

    Attributes:
        name: the replica's name (never its DSN).
        in_rotation: whether queries go to it.
        reason: why it is out of rotation (``None`` while in).
        since: wall-clock time of the last change in or out of rotation.
        reachable: whether the last probe got an answer.
        replay_lsn: the last WAL position it replayed (``X/X``).
        lag_bytes: WAL bytes it is behind the primary's last sample.
        lag_seconds: how long ago the primary had WAL it has not replayed yet (0 when it
            has replayed everything the primary had at the last sample).
        replay_paused: ``pg_is_wal_replay_paused()``.
        last_probe: wall-clock time of the last probe; ``probe_ms``: its duration.
        failures: failed probes or queries since the last good probe.
        queries: sessions it served.
    """

    name: str
    in_rotation: bool
    reason: str | None
    since: float
    reachable: bool
    replay_lsn: str | None
    lag_bytes: int | None
    lag_seconds: float | None
    replay_paused: bool | None
    last_probe: float | None
    probe_ms: float | None
    failures: int
    queries: int

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RouterStatus:
    """The router's view: the primary, each replica, and the latest decisions.

    Attributes:
        primary_reachable: whether the last probe of the primary got an answer.
        primary_lsn: the primary's WAL position at that probe.
        primary_queries: read-only sessions served by the primary.
        replicas: one :class:`ReplicaStatus` per replica, in configuration order.
        decisions: the latest rotation and fallback decisions, oldest first.
    """

    primary_reachable: bool
    primary_lsn: str | None
    primary_queries: int
    replicas: tuple[ReplicaStatus, ...]
    decisions: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class PoolBusy(Exception):
    """Every connection to a server is in use (load, not a failure of the server)."""


class Pool:
    """Connections to one server: at most ``size`` in use, idle ones reused last-in
    first-out. Every connect and every wait is bounded by the caller's timeout.

    Every connection runs with ``default_transaction_read_only`` on: a statement outside
    a transaction block is a read-only transaction of its own. Sessions end any block they
    open, so a connection needs no reset between uses (asyncpg's pool would spend a round
    trip per release on it).
    """

    def __init__(
        self, dsn: str, size: int, schema: str, command_timeout: float, connect_timeout: float
    ) -> None:
        self._dsn = dsn
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Any] = []
        self._settings = {"search_path": schema, "default_transaction_read_only": "on"}
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._closed = False

    async def acquire(self, timeout: float) -> Any:
        """A connection; :class:`PoolBusy` when none is free in time, ``TimeoutError``
        (or a connection error) when a new one cannot be opened in time."""
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout)
        except TimeoutError:
            raise PoolBusy(f"all connections busy for {timeout:.3g} s") from None
        try:
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_closed():
                    return conn
            return await asyncpg.connect(
                self._dsn,
                timeout=max(0.001, min(timeout, self._connect_timeout)),
                command_timeout=self._command_timeout,
                server_settings=self._settings,
            )
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: Any, broken: bool = False) -> None:
        """Give ``conn`` back; a broken one (or any after close) is terminated."""
        if broken or self._closed or conn.is_closed() or conn.is_in_transaction():
            conn.terminate()
        else:
            self._idle.append(conn)
        self._slots.release()

    def drop_idle(self) -> None:
        """Terminate the idle connections (their server failed; they are likely dead)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.terminate()

    async def close(self) -> None:
        """Close the idle connections (bounded), refuse to keep any returned later."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                await asyncio.wait_for(conn.close(), 1.0)
            except Exception:  # noqa: BLE001 - a server that does not answer: cut it
                conn.terminate()


class Node:
    """One server (the primary or a replica): its pool, its probe and its health."""

    def __init__(
        self,
        name: str,
        dsn: str,
        *,
        primary: bool,
        pool: Pool,
        record: Callable[[str, int], None],
    ) -> None:
        self.name = name
        self.dsn = dsn
        self.primary = primary
        self.pool = pool
        self._record = record
        self.in_rotation = primary
        self.reason: str | None = None if primary else "not probed yet"
        self.since = time.time()
        self.reachable = False
        self.in_recovery: bool | None = None
        self.replay_paused: bool | None = None
        self.lsn: int | None = None  # replay LSN (replica) or current WAL LSN (primary)
        self.system_id: str | None = None
        self.lag_bytes: int | None = None
        self.lag_seconds: float | None = None
        self.last_probe: float | None = None
        self.probe_ms: float | None = None
        self.failures = 0
        self.streak = 0  # healthy probes in a row while out of rotation
        self.suspect = False  # a query got no answer in time; the next probe decides
        self.queries = 0
        # why the last connect or statement failed, as failure_kind() words (no driver text)
        self.last_error: str | None = None
        self._probe_conn: Any = None
        self._probed_once = False

    # -- probing -------------------------------------------------------------------------

    async def probe(self, timeout: float) -> str | None:
        """Ask the server how it is; return ``None`` or why it could not be asked."""
        started = time.monotonic()
        try:
            row = await asyncio.wait_for(self._ask(timeout), timeout)
        except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
            self._drop_probe_conn()
            self.reachable = False
            self.failures += 1
            _log.debug("probe of %s failed: %s: %s", self.name, type(exc).__name__, exc)
            return f"unreachable ({failure_kind(exc)})"
        finally:
            self.last_probe = time.time()
            self.probe_ms = (time.monotonic() - started) * 1000
        self.reachable = True
        self.in_recovery = bool(row[0])
        self.lsn = None if row[1] is None else int(row[1])
        if not self.primary:
            self.replay_paused = None if row[2] is None else bool(row[2])
        return None

    async def _ask(self, timeout: float) -> Any:
        conn = self._probe_conn
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(self.dsn, timeout=timeout)
            self._probe_conn = conn
            try:
                self.system_id = await conn.fetchval(_SYSTEM_ID)
            except asyncpg.InsufficientPrivilegeError:
                self.system_id = None  # the role may not read pg_control: not compared
        return await conn.fetchrow(_PROBE_PRIMARY if self.primary else _PROBE_STANDBY)

    def _drop_probe_conn(self) -> None:
        conn, self._probe_conn = self._probe_conn, None
        if conn is not None:
            conn.terminate()

    # -- rotation ------------------------------------------------------------------------

    def judge(self, problem: str | None, recover_after: int) -> None:
        """Apply a probe's verdict (``None``: healthy) to the rotation."""
        first = not self._probed_once
        self._probed_once = True
        if problem is not None:
            self.streak = 0
            if problem.startswith("unreachable"):
                self.pool.drop_idle()  # connections to a server that does not answer
            if self.in_rotation or first or _kind(problem) != _kind(self.reason):
                self._set(False, problem)
            else:
                self.reason = problem  # same kind of problem, newer figures: not logged again
            return
        self.failures = 0
        self.suspect = False
        if self.in_rotation:
            return
        self.streak += 1
        if first or self.streak >= recover_after:
            self._set(True, None)

    def fail(self, problem: str) -> None:
        """A query on this replica failed: out of rotation now (the probe brings it back)."""
        self.failures += 1
        self.streak = 0
        self.pool.drop_idle()
        if self.in_rotation:
            self._set(False, problem)

    def _set(self, in_rotation: bool, reason: str | None) -> None:
        self.in_rotation = in_rotation
        self.reason = reason
        self.since = time.time()
        if in_rotation:
            self._record(f"{self.name} back in rotation", logging.INFO)
        else:
            self._record(f"{self.name} out of rotation: {reason}", logging.WARNING)

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            self.name,
            self.in_rotation,
            self.reason,
            self.since,
            self.reachable,
            lsn_text(self.lsn),
            self.lag_bytes,
            self.lag_seconds,
            self.replay_paused,
            self.last_probe,
            self.probe_ms,
            self.failures,
            self.queries,
        )

    async def close(self) -> None:
        self._drop_probe_conn()
        await self.pool.close()


class Lag:
    """Replication lag in seconds from samples of the primary's WAL position.

    A replica that replayed up to L lags by the age of the oldest sample of the primary
    whose position is beyond L: that WAL existed then and the replica still lacks it. It
    is 0 when the replica has replayed everything of the latest sample, and measured with
    the probe interval's granularity (never more than that too high).
    """

    def __init__(self, keep: float) -> None:
        self._keep = keep
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, lsn: int) -> None:
        now = time.monotonic()
        samples = self._samples
        if samples and samples[-1][1] == lsn:
            return  # unchanged: the older sample tells the age better
        samples.append((now, lsn))
        while len(samples) > 1 and samples[1][0] < now - self._keep:
            samples.popleft()

    def latest(self) -> int | None:
        return self._samples[-1][1] if self._samples else None

    def seconds(self, replayed: int) -> float:
        now = time.monotonic()
        for at, lsn in self._samples:
            if lsn > replayed:
                return max(0.0, now - at)
        return 0.0


def describe_problem(
    node: Node, primary: Node, lag: Lag, max_lag_seconds: float, max_lag_bytes: int
) -> str | None:
    """Why ``node`` (just probed, reachable) must not serve queries, or ``None``."""
    if not node.in_recovery:
        return "promoted: it is no longer a standby (the router does not follow failover)"
    if node.system_id and primary.system_id and node.system_id != primary.system_id:
        return f"not a standby of this primary (system identifier {node.system_id})"
    if node.replay_paused:
        return "replay paused (pg_wal_replay_pause)"
    head = lag.latest()
    if node.lsn is None or head is None:
        node.lag_bytes = node.lag_seconds = None
        return None
    node.lag_bytes = max(0, head - node.lsn)
    node.lag_seconds = round(lag.seconds(node.lsn), 3)
    if node.lag_seconds > max_lag_seconds:
        return f"lagging {node.lag_seconds:.1f} s (max_lag_seconds={max_lag_seconds:g})"
    if node.lag_bytes > max_lag_bytes:
        return f"lagging {node.lag_bytes} bytes (max_lag_bytes={max_lag_bytes})"
    return None


async def end(conn: Any, pool: Pool, ok: bool, timeout: float) -> bool:
    """End ``conn``'s transaction (COMMIT, or ROLLBACK when not ``ok``) and give it back;
    ``False`` if the server did not answer (the connection is then dropped)."""
    try:
        if not conn.is_closed() and conn.is_in_transaction():
            await conn.execute("COMMIT" if ok else "ROLLBACK", timeout=max(timeout, 0.001))
    except BaseException as exc:
        pool.release(conn, broken=True)
        if isinstance(exc, Exception):
            return False
        raise
    pool.release(conn)
    return True
