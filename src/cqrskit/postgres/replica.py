"""Replication mode: queries on PostgreSQL streaming replicas, read-your-writes by token.

:class:`PostgresReplicaRouter` is a :class:`~cqrskit.projections.ReadDatabase`: read-write
transactions (projectors, inline projections, bookkeeping) go to the primary; read-only
sessions (queries) go to a replica in rotation. Query handlers, ``@reads``, the
:class:`~cqrskit.projections.ConsistencyGate` and the FastAPI token header work unchanged::

    primary = PostgresReadDatabase(dsn, schema="app")
    router = PostgresReplicaRouter(primary, [replica_dsn], store=store)
    gate = ConsistencyGate(store, router)
    deps.scoped(ReadSession, router.session)

**Tokens on a replica.** A token is the event-log position of a command's last event. A
replica has reached it when its own MVCC snapshot proves it, in the session the query then
uses (READ COMMITTED: later statements see at least as much):

* a projection kept *inline* commits its rows with the command's events, so the proof is
  the event row itself: ``EXISTS (SELECT 1 FROM events WHERE position = token)`` (needs
  ``store=``, the event log replicated with the read models);
* an *async* projection commits its rows with its checkpoint, so the proof is its
  checkpoint on the replica: ``position >= token``.

Neither the primary's readable horizon nor the token's WAL position is needed. Why not the
others (measured in ``docs/replication.md``): on a standby ``pg_current_snapshot()`` lists
no in-progress transactions (PostgreSQL keeps them in the snapshot's subxip array there), so
``pg_visible_in_snapshot()`` calls an open transaction visible; the snapshot's xmin is safe
but held back by any open write transaction; an LSN needs one more value from every commit.

**Policies** (from ``@reads`` or the caller): ``wait`` polls the replicas in rotation until
one reached the token; ``stale`` does so too, then serves the freshest replica flagged
stale; ``fail`` checks each replica once; ``primary`` checks each replica once, then runs on
the primary (waiting there, as ``wait``, for an async projection). A token beyond the end
of the log fails at once (``TokenFromFutureError``). When no replica is in rotation,
queries go to the primary (``when_no_replica="primary"``, logged) or fail with
:class:`~cqrskit.errors.ReplicaUnavailableError`.

**Health.** Every ``probe_interval`` the router asks each server, each answer bounded by
``probe_timeout``: a replica that does not answer, is no longer a standby (promoted), is
not of the primary's cluster, has replay paused, or lags more than ``max_lag_seconds`` /
``max_lag_bytes`` leaves the rotation at once and returns after ``recover_after`` healthy
probes; a query that loses its replica takes it out too. Decisions are logged
(``cqrskit.postgres.replica``) and kept in :meth:`PostgresReplicaRouter.status`. Every
connect, check and statement is bounded (``connect_timeout``, the request's deadline,
``query_timeout``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

from cqrskit.errors import (
    ConfigurationError,
    MissingExtraError,
    PersistenceError,
    ReplicaUnavailableError,
)
from cqrskit.postgres._replica_nodes import (
    LOST,
    UNAVAILABLE,
    Lag,
    Node,
    Pool,
    PoolBusy,
    ReplicaStatus,
    RouterStatus,
    describe_problem,
    end,
    failure_kind,
    lsn_text,
)
from cqrskit.postgres._replica_tokens import Lease, TokenRoute
from cqrskit.postgres.readdb import PostgresReadDatabase, PostgresSession
from cqrskit.projections.consistency import current_read_after
from cqrskit.projections.db import ReadDatabase, Row, Session, check_identifier

if TYPE_CHECKING:
    from cqrskit.postgres.eventlog import PostgresEventStore

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("postgres", "asyncpg") from exc

__all__ = ["PostgresReplicaRouter", "ReplicaStatus", "RouterStatus"]

_log = logging.getLogger("cqrskit.postgres.replica")

_LOST = LOST
_RECOVERY_CONFLICT = "40001"  # a standby cancelled the query to go on replaying
# how a session can end with a statement still on the wire (its connection is then dropped)
_INTERRUPTED = (asyncio.CancelledError, TimeoutError, ReplicaUnavailableError, *_LOST)


class _RoutedSession(PostgresSession):
    """A query session on a routed server. Its statements run one by one, each a read-only
    transaction of its own (``default_transaction_read_only`` is on for these connections,
    and a standby refuses writes anyway): what READ COMMITTED gives inside a transaction
    block, two round trips (BEGIN, COMMIT) cheaper. :meth:`savepoint` opens the block when a
    query needs one. Losing the server mid-query is a typed error (and takes a replica out
    of rotation)."""

    def __init__(
        self,
        conn: Any,
        schema: str,
        cache: dict[str, str],
        router: PostgresReplicaRouter,
        node: Node,
    ) -> None:
        super().__init__(conn, schema, cache, rollback_timeout=router.query_timeout)
        self._router = router
        self._node = node

    async def execute(self, sql: str, *params: Any) -> int:
        """See :meth:`Session.execute`."""
        try:
            return await super().execute(sql, *params)
        except (*_LOST, TimeoutError, asyncpg.PostgresError) as exc:
            raise self._router._translate(self._node, exc) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """See :meth:`Session.executemany`."""
        try:
            await super().executemany(sql, rows)
        except (*_LOST, TimeoutError, asyncpg.PostgresError) as exc:
            raise self._router._translate(self._node, exc) from exc

    async def fetchall(self, sql: str, *params: Any) -> list[Row]:
        """See :meth:`Session.fetchall`."""
        try:
            return await super().fetchall(sql, *params)
        except (*_LOST, TimeoutError, asyncpg.PostgresError) as exc:
            raise self._router._translate(self._node, exc) from exc

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        """See :meth:`Session.fetchone`."""
        try:
            return await super().fetchone(sql, *params)
        except (*_LOST, TimeoutError, asyncpg.PostgresError) as exc:
            raise self._router._translate(self._node, exc) from exc

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """See :meth:`Session.savepoint` (opens the session's read-only transaction block
        first; it ends with the session)."""
        if not self._conn.is_in_transaction():
            try:
                await self._conn.execute("BEGIN READ ONLY")
            except (*_LOST, TimeoutError, asyncpg.PostgresError) as exc:
                raise self._router._translate(self._node, exc) from exc
        async with super().savepoint():
            yield


def _seconds(name: str, value: float, *, positive: bool = True) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ConfigurationError(
            f"PostgresReplicaRouter: {name} must be a finite number of seconds "
            f"{'> 0' if positive else '>= 0'}, got {value!r}.",
            hint=f"e.g. {name}=1.0.",
        )
    return float(value)


class PostgresReplicaRouter(ReadDatabase):
    """Queries on streaming replicas, everything else on the primary (mode 4).

    Args:
        primary: the read database on the primary (read models, checkpoints); the router
            closes it with itself.
        replicas: the replicas' DSNs (named ``replica1``, ``replica2`` ...) or a mapping
            name → DSN. May be empty (every query on the primary). DSNs are never logged.
        store: the event log, when the replicas replicate it together with the read models
            (inline projections): tokens are then checked by its event rows. Leave it out
            for a separate read database fed by async projectors (checkpoints suffice).
        max_lag_seconds, max_lag_bytes: a replica lagging more leaves the rotation.
        probe_interval: seconds between health probes; ``probe_timeout``: bound of each.
        recover_after: healthy probes in a row before a replica returns to rotation.
        connect_timeout: bound of opening a connection (and of waiting for a free one).
        query_timeout: bound of every statement on a routed session (client side: it also
            holds when a server stops answering).
        when_no_replica: ``"primary"`` (default) runs queries on the primary while no
            replica is in rotation; ``"fail"`` raises ``ReplicaUnavailableError``.
        pool_size: connections per server for queries.

    Raises:
        ConfigurationError: a bad option (checked here) or, at :meth:`start`, an event log
            that is not in the primary's database.
    """

    dialect = "postgres"
    flavor = PostgresSession.flavor
    routes_tokens = True

    def __init__(
        self,
        primary: PostgresReadDatabase,
        replicas: Sequence[str] | Mapping[str, str],
        *,
        store: PostgresEventStore | None = None,
        max_lag_seconds: float = 5.0,
        max_lag_bytes: int = 64 * 2**20,
        probe_interval: float = 0.5,
        probe_timeout: float = 1.0,
        recover_after: int = 2,
        connect_timeout: float = 2.0,
        query_timeout: float = 30.0,
        when_no_replica: Literal["primary", "fail"] = "primary",
        pool_size: int = 4,
    ) -> None:
        if not isinstance(primary, PostgresReadDatabase):
            raise ConfigurationError(
                f"PostgresReplicaRouter needs a PostgresReadDatabase as primary, got "
                f"{type(primary).__name__}.",
                hint="PostgresReplicaRouter(PostgresReadDatabase(dsn, schema=...), [...]).",
            )
        if isinstance(replicas, str):
            raise ConfigurationError(
                "PostgresReplicaRouter: replicas must be a list of DSNs (or name → DSN), "
                "not one string.",
                hint="replicas=[dsn] for one replica.",
            )
        named = (
            dict(replicas)
            if isinstance(replicas, Mapping)
            else {f"replica{i + 1}": dsn for i, dsn in enumerate(replicas)}
        )
        for name, dsn in named.items():
            check_identifier(name, "replica name")
            if name == "primary" or not isinstance(dsn, str) or not dsn:
                raise ConfigurationError(
                    f"PostgresReplicaRouter: replica {name!r} needs a DSN string (and a "
                    "name other than 'primary').",
                    hint="replicas={'r1': 'postgresql://...'}.",
                )
        if when_no_replica not in ("primary", "fail"):
            raise ConfigurationError(
                f"PostgresReplicaRouter: when_no_replica must be 'primary' or 'fail', got "
                f"{when_no_replica!r}."
            )
        for label, count in (("recover_after", recover_after), ("pool_size", pool_size)):
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ConfigurationError(
                    f"PostgresReplicaRouter: {label} must be an integer >= 1, got {count!r}."
                )
        if not isinstance(max_lag_bytes, int) or max_lag_bytes < 0:
            raise ConfigurationError(
                f"PostgresReplicaRouter: max_lag_bytes must be an integer >= 0, got "
                f"{max_lag_bytes!r}."
            )
        self.primary = primary
        self.schema = primary.schema
        self.store = store
        self.max_lag_seconds = _seconds("max_lag_seconds", max_lag_seconds)
        self.max_lag_bytes = max_lag_bytes
        self.probe_interval = _seconds("probe_interval", probe_interval)
        self.probe_timeout = _seconds("probe_timeout", probe_timeout)
        self.connect_timeout = _seconds("connect_timeout", connect_timeout)
        self.query_timeout = _seconds("query_timeout", query_timeout)
        self.recover_after = recover_after
        self.when_no_replica = when_no_replica
        self._decisions: deque[str] = deque(maxlen=50)
        dsn = primary._dsn  # the primary read database's own connection string
        self._primary = Node(
            "primary",
            dsn,
            primary=True,
            pool=Pool(dsn, pool_size, self.schema, self.query_timeout, self.connect_timeout),
            record=self._record,
        )
        self._replicas = [
            Node(
                name,
                rdsn,
                primary=False,
                pool=Pool(rdsn, pool_size, self.schema, self.query_timeout, self.connect_timeout),
                record=self._record,
            )
            for name, rdsn in named.items()
        ]
        self._lag = Lag(keep=max(60.0, 4 * self.max_lag_seconds))
        self._cache: dict[str, str] = {}
        self._rr = 0
        self._falling_back = False
        self._primary_fallbacks = 0
        self._validated: set[tuple[str, ...]] = set()
        self._started = False
        self._closed = False
        self._start_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        s = f'"{self.schema}"'
        seen = ""
        if store is not None:
            es = check_identifier(store.schema, "schema name")
            et = check_identifier(store.table, "table name")
            self._events = f'"{es}"."{et}"'
            seen = f", EXISTS (SELECT 1 FROM {self._events} e WHERE e.position = $2)"
        self._sql_check = (
            f"SELECT p.name, p.mode, c.position{seen} FROM {s}.cqrskit_projections p "
            f"JOIN {s}.cqrskit_checkpoints c "
            "ON c.projection = p.name AND c.generation = p.active_generation "
            "WHERE p.name = ANY($1::text[])"
        )
        self._sql_modes = f"SELECT name, mode FROM {s}.cqrskit_projections WHERE name = ANY($1)"

    def __repr__(self) -> str:
        names = ", ".join(n.name for n in self._replicas)
        return f"PostgresReplicaRouter(schema={self.schema!r}, replicas=[{names}])"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Probe every server once and start probing in the background (called by the
        first session if not before).

        Raises:
            ConfigurationError: ``store``'s event log is not in the primary's database.
        """
        if self._started:
            return
        if self._closed:
            raise PersistenceError("the replica router is closed.")
        async with self._start_lock:
            if self._started:
                return
            if self.store is not None:
                await self._check_event_log()
            await self._probe_round()
            self._task = asyncio.get_running_loop().create_task(self._probe_loop())
            self._started = True

    async def _check_event_log(self) -> None:
        async with self.primary.read_only() as s:
            found = await s.fetchval("SELECT to_regclass(?) IS NOT NULL", self._events)
        if not found:
            raise ConfigurationError(
                f"the event log {self._events} is not in the primary read database, so its "
                "replicas cannot prove tokens by event rows.",
                hint="pass store= only when the replicas replicate the write database (inline "
                "projections); a separate read database fed by projectors needs no store.",
            )

    async def close(self) -> None:
        """Stop probing; close every connection, the primary read database's too."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        if self._background:  # checks left running by routed queries: bounded, let them end
            await asyncio.wait(set(self._background), timeout=self.probe_timeout)
        for node in (self._primary, *self._replicas):
            await node.close()
        await self.primary.close()

    # -- probing -------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        while not self._closed:
            try:
                await asyncio.wait_for(self._wake.wait(), self.probe_interval)
            except TimeoutError:
                pass  # the probe interval passed: time for the next round
            self._wake.clear()
            try:
                await self._probe_round()
            except Exception:  # noqa: BLE001 - a bug must not end probing silently: logged
                _log.exception("replica probe round failed")

    async def _probe_round(self) -> None:
        nodes = (self._primary, *self._replicas)
        problems = await asyncio.gather(*(n.probe(self.probe_timeout) for n in nodes))
        primary = self._primary
        was = primary.reason
        if problems[0] is not None:
            primary.reason = f"primary {problems[0]}"
        elif primary.in_recovery:
            primary.reason = "the primary DSN leads to a server in recovery (a standby)"
        else:
            primary.reason = None
            if primary.lsn is not None:
                self._lag.sample(primary.lsn)
        if primary.reason != was and (primary.reason or was):
            if primary.reason:
                self._record(primary.reason, logging.WARNING)
            else:
                self._record("primary reachable", logging.INFO)
        for node, problem in zip(self._replicas, problems[1:], strict=True):
            if problem is None:
                problem = describe_problem(
                    node, primary, self._lag, self.max_lag_seconds, self.max_lag_bytes
                )
            node.judge(problem, self.recover_after)
        self._note_fallback()

    def _record(self, text: str, level: int) -> None:
        _log.log(level, "%s", text)
        stamp = time.strftime("%H:%M:%S", time.localtime())
        self._decisions.append(f"{stamp} {text}")

    def _note_fallback(self) -> None:
        none = not any(n.in_rotation for n in self._replicas)
        if none == self._falling_back or not self._replicas:
            return
        self._falling_back = none
        if none:
            where = "the primary" if self.when_no_replica == "primary" else "nowhere (fail)"
            self._record(f"no replica in rotation: queries go to {where}", logging.WARNING)
        else:
            self._record("replicas in rotation again: queries go to replicas", logging.INFO)

    def status(self) -> RouterStatus:
        """Where the servers stand and the latest decisions (see :class:`RouterStatus`)."""
        p = self._primary
        return RouterStatus(
            p.reason is None and p.reachable,
            lsn_text(p.lsn),
            p.queries,
            tuple(n.status() for n in self._replicas),
            tuple(self._decisions),
        )

    @property
    def primary_fallbacks(self) -> int:
        """Sessions run on the primary because no replica could serve them."""
        return self._primary_fallbacks

    # -- ReadDatabase --------------------------------------------------------------------

    def transaction(
        self, *, lock_timeout: float | None = None, hold: float | None = None
    ) -> AbstractAsyncContextManager[Session]:
        """A read-write transaction on the primary (projectors, bookkeeping)."""
        return self.primary.transaction(lock_timeout=lock_timeout, hold=hold)

    def inline(self, connection: Any) -> Session:
        """See :meth:`ReadDatabase.inline` (the write connection is the primary's)."""
        return self.primary.inline(connection)

    def read_only(self) -> AbstractAsyncContextManager[Session]:
        """A read-only session on a replica: one that reached the query's token when the
        :class:`~cqrskit.projections.ConsistencyGate` passed one, any in rotation else.

        Raises:
            StaleReadError: no replica reached the token in time (policy ``wait``/``fail``).
            TokenFromFutureError: the token is beyond the end of the event log.
            ReplicaUnavailableError: no server could serve the query.
        """
        return self._read_only()

    @asynccontextmanager
    async def _read_only(self) -> AsyncIterator[Session]:
        await self.start()
        state = current_read_after()
        if state is not None and state.request is not None:
            lease = await TokenRoute(self, state.request, state).run()
            state.positions = lease.positions
        else:
            lease = await self._plain()
        node = lease.node
        if state is not None:
            state.source = node.name
        node.queries += 1
        session = _RoutedSession(lease.conn, self.schema, self._cache, self, node)
        try:
            yield session
        except BaseException as exc:
            if isinstance(exc, _INTERRUPTED):  # a statement may be in flight: drop it
                node.pool.release(lease.conn, broken=True)
            else:
                await end(lease.conn, node.pool, False, min(self.query_timeout, 1.0))
            raise
        if not await end(lease.conn, node.pool, True, self.query_timeout):
            # what the query read is valid (one snapshot); only the server is in doubt
            self._lost(node, TimeoutError("no answer to the COMMIT of a read-only session"))

    # -- routing -------------------------------------------------------------------------

    def _in_rotation(self) -> list[Node]:
        return [n for n in self._replicas if n.in_rotation]

    def _spread(self, nodes: list[Node], prefer: str | None = None) -> list[Node]:
        """Freshest first (lag in probe intervals), round-robin among equals; a server
        named by ``prefer`` (where this request read before) first."""
        if not nodes:
            return nodes
        self._rr += 1
        count = len(nodes)
        step = self.probe_interval
        order = sorted(
            range(count),
            key=lambda i: (
                nodes[i].suspect,
                nodes[i].name != prefer,
                round((nodes[i].lag_seconds or 0.0) / step),
                (i - self._rr) % count,
            ),
        )
        return [nodes[i] for i in order]

    async def _open(self, node: Node, timeout: float) -> Any | None:
        """A connection to ``node``, or ``None`` when it failed (noted: see :meth:`_lost`)
        or all its connections are busy."""
        try:
            return await node.pool.acquire(timeout)
        except PoolBusy:
            return None  # load, not a sick server: try another one
        except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
            self._lost(node, exc)
            return None

    async def _plain(self) -> Lease:
        """A session for a query without a token: any replica in rotation."""
        for node in self._spread(self._in_rotation()):
            conn = await self._open(node, self.connect_timeout)
            if conn is not None:
                return Lease(node, conn)
        return await self._fallback(self.connect_timeout, "no replica could take the query")

    async def _fallback(self, timeout: float, why: str) -> Lease:
        self._note_fallback()
        if self.when_no_replica == "fail":
            raise ReplicaUnavailableError(
                f"{why} (replicas: {self._describe_rotation()}); when_no_replica='fail'.",
                hint="retry later, or allow when_no_replica='primary'.",
            )
        conn = await self._open(self._primary, timeout)
        if conn is None:
            raise PersistenceError(
                f"{why}, and the primary did not take it either "
                f"({self._primary.last_error or 'all its connections busy'}).",
                hint="check the servers; the query can be retried.",
            )
        self._primary_fallbacks += 1
        return Lease(self._primary, conn)

    def _detach(self, task: asyncio.Future[Any], lease: Lease) -> None:
        """Let ``task`` (a check on ``lease``) finish on its own, then give its connection
        back."""
        self._background.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._background.discard(t)
            lease.give_back(broken=t.cancelled() or t.exception() is not None)

        task.add_done_callback(done)

    def _describe_rotation(self) -> str:
        return "; ".join(f"{n.name}: {n.reason or 'in rotation'}" for n in self._replicas)

    # -- failures ------------------------------------------------------------------------

    def _lost(self, node: Node, exc: BaseException) -> None:
        """A connect, BEGIN or check on ``node`` failed. What is kept and logged above
        debug is :func:`failure_kind` (a few fixed words, an errno or SQLSTATE): the
        driver's text can name users, hosts, databases and data; it is logged at debug."""
        kind = failure_kind(exc)
        node.last_error = kind
        _log.debug("a query on %s failed: %s: %s", node.name, type(exc).__name__, exc)
        if node.primary:
            _log.warning("a query session on the primary failed (%s)", kind)
            return
        if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _LOST):
            _log.warning("a query check on %s failed (%s)", node.name, kind)
            return  # the server answered: an SQL problem, not a sick server
        if isinstance(exc, TimeoutError):
            node.failures += 1
            node.suspect = True  # tried last until a probe says otherwise
            self._wake.set()  # no answer in time: let the probe decide at once
            return
        node.fail(f"query failed ({kind})")
        self._wake.set()
        self._note_fallback()

    def _translate(self, node: Node, exc: BaseException) -> BaseException:
        """An error from a routed session's statement, as the caller should see it."""
        if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _LOST):
            if getattr(exc, "sqlstate", None) != _RECOVERY_CONFLICT or node.primary:
                return exc  # type: ignore[no-any-return]  # the SQL's own error, unchanged
            return ReplicaUnavailableError(
                f"replica {node.name} cancelled the query to keep replaying (a recovery "
                f"conflict: {exc}); nothing was written.",
                replica=node.name,
                hint="retry the query; hot_standby_feedback or max_standby_streaming_delay "
                "on the replica make this rarer.",
            )
        self._lost(node, exc)
        if node.primary:
            return PersistenceError(
                f"the primary did not complete a query ({type(exc).__name__}: {exc}).",
                hint="the query can be retried.",
            )
        return ReplicaUnavailableError(
            f"replica {node.name} did not complete the query ({type(exc).__name__}: {exc}); "
            "it is out of rotation until its probes are healthy again.",
            replica=node.name,
            hint="retry the query: it goes to another server.",
        )
