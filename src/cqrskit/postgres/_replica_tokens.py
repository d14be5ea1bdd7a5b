"""Routing one query with a consistency token: find a server whose own snapshot proves the
token, within the query's deadline, by its policy.

The proof runs on the connection the query then uses: the check statement first, then the
query's statements, each with a newer snapshot than the check's, so they see at least what
the check saw. A replica's replay only moves
forward while it runs, but not across its crash and restart (it reopens at its last
consistent point), so nothing is remembered between connections: the check is repeated for
every session. The checks run outside a transaction block: a connection waiting for replay
holds no lock, so it cannot hold up the very replay it waits for (the startup process waits
for the locks of standby queries before replaying, e.g., a VACUUM truncation).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from cqrskit.errors import (
    ConfigurationError,
    ReplicaUnavailableError,
    StaleReadError,
    TokenFromFutureError,
)
from cqrskit.postgres._replica_nodes import LOST as _LOST
from cqrskit.postgres._replica_nodes import UNAVAILABLE, Node

if TYPE_CHECKING:
    from collections.abc import Callable

    from cqrskit.postgres.replica import PostgresReplicaRouter
    from cqrskit.projections.consistency import ReadAfter, TokenRequest

import asyncpg  # after _replica_nodes, which names the missing extra

__all__: list[str] = []

_MIN_CHECK = 0.1  # a check or connect near the deadline still gets this long to answer


class Lease:
    """A connection to one server, while routing a query."""

    __slots__ = ("conn", "dead", "node", "positions", "released")

    def __init__(self, node: Node, conn: Any) -> None:
        self.node = node
        self.conn = conn
        self.positions: dict[str, int] = {}
        self.dead = False  # its connection failed or was interrupted mid-statement
        self.released = False

    def give_back(self, broken: bool = False) -> None:
        """Return the connection to its pool (once; a dead one is dropped)."""
        if not self.released:
            self.released = True
            self.node.pool.release(self.conn, broken=broken or self.dead)


class TokenRoute:
    """The search for a server that reached ``req.token``; :meth:`run` returns its lease."""

    def __init__(self, router: PostgresReplicaRouter, req: TokenRequest, state: ReadAfter):
        self.router = router
        self.req = req
        self.state = state
        self.held: list[Lease] = []
        self.problem: str | None = None  # the last error a server answered a check with

    async def run(self) -> Lease:
        """The lease to serve the query on; every other lease opened meanwhile is given
        back."""
        chosen: Lease | None = None
        try:
            chosen = await self._route()
            return chosen
        finally:
            for lease in self.held:
                if lease is not chosen:
                    lease.give_back()

    async def _route(self) -> Lease:
        router, req = self.router, self.req
        replicas = router._spread(router._in_rotation(), self.state.source)
        if replicas:  # the freshest replica, at once: the common case ends here
            lease = await self._lease(replicas[0])
            if lease is not None and await self._reached(lease):
                return lease
        await self._validate()
        if req.policy in ("fail", "primary"):
            for node in replicas[1:]:  # each other replica, once
                lease = await self._lease(node)
                if lease is not None and await self._reached(lease):
                    return lease
            if req.policy == "primary":
                # the primary serves it (and waits there for an async projection)
                return await self._wait(lambda: [router._primary])
            if replicas:
                raise self._stale()
            return await self._wait(self._nodes, once=True)
        return await self._wait(self._nodes)

    def _nodes(self) -> list[Node]:
        nodes = self.router._in_rotation()
        if nodes or self.router.when_no_replica == "fail":
            return nodes
        return [self.router._primary]  # no replica left: the primary, logged

    def _bound(self, limit: float) -> float:
        return min(limit, max(self.req.deadline - time.monotonic(), _MIN_CHECK))

    async def _lease(self, node: Node) -> Lease | None:
        for known in self.held:
            if known.node is node and not known.dead:
                return known
        conn = await self.router._open(node, self._bound(self.router.connect_timeout))
        if conn is None:
            return None
        lease = Lease(node, conn)
        self.held.append(lease)
        return lease

    async def _wait(self, nodes: Callable[[], list[Node]], *, once: bool = False) -> Lease:
        """Poll the servers ``nodes()`` names until one reached the token or time is up."""
        pause = 0.0005
        wanted: list[Node] = []
        while True:
            wanted = nodes()
            if not wanted:
                break  # no replica in rotation and when_no_replica="fail": at once
            sound = [n for n in wanted if not n.suspect] or wanted
            for node in sound:
                await self._lease(node)
            live = [x for x in self.held if not x.dead and x.node in wanted]
            if live:
                winner = await self._first_reached(live)
                if winner is not None:
                    if winner.node.primary:
                        self.router._primary_fallbacks += 1
                    return winner
            remaining = self.req.deadline - time.monotonic()
            if once or remaining <= 0:
                break
            await asyncio.sleep(min(pause, remaining))  # polling the servers' replay
            pause = min(pause * 2, 0.004)
        live = [x for x in self.held if not x.dead and x.node in wanted]
        if not live:
            router = self.router
            raise ReplicaUnavailableError(
                f"no server could be asked for consistency token {self.req.token} "
                f"({router._describe_rotation() or 'no replicas'}; primary: "
                f"{router._primary.reason or 'reachable'}; when_no_replica="
                f"{router.when_no_replica!r}).",
                hint="retry later; check the servers (router.status()).",
            )
        if self.req.policy == "stale":
            self.state.stale = True
            return max(live, key=lambda x: min(x.positions.values(), default=0))
        raise self._stale()

    async def _first_reached(self, live: list[Lease]) -> Lease | None:
        """Check every lease at once; the first that reached the token wins. A check still
        running then finishes in the background (bounded by its timeout) and gives its
        connection back itself: interrupting it would cost the connection."""
        if len(live) == 1:
            return live[0] if await self._reached(live[0]) else None
        tasks = {asyncio.ensure_future(self._reached(x)): x for x in live}
        pending = set(tasks)
        winner: Lease | None = None
        try:
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.result() and winner is None:
                        winner = tasks[task]
        finally:
            for task in pending:
                lease = tasks[task]
                self.held.remove(lease)
                self.router._detach(task, lease)
        return winner

    async def _reached(self, lease: Lease) -> bool:
        """Whether ``lease``'s server reached the token, proven in that very session."""
        router, req = self.router, self.req
        names = list(req.projections)
        args: tuple[Any, ...] = (names, req.token) if router.store is not None else (names,)
        try:
            rows = await lease.conn.fetch(
                router._sql_check, *args, timeout=self._bound(router.probe_timeout)
            )
        except (*UNAVAILABLE, *_LOST) as exc:
            lease.dead = True
            lease.give_back()
            router._lost(lease.node, exc)
            return False
        except asyncpg.PostgresError as exc:
            # the server answered: e.g. the tables are not replayed there yet; not reached
            self.problem = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]
            return False
        except BaseException:
            lease.dead = True
            raise
        lease.positions = {str(r[0]): int(r[2]) for r in rows}
        if len(lease.positions) < len(set(names)):
            return False  # set up on the primary but not replayed here yet
        for row in rows:
            if row[1] == "inline" and not lease.node.primary:
                if router.store is None:
                    raise ConfigurationError(
                        f"projection {row[0]!r} runs inline, so a replica proves a token by "
                        "the event log's rows, and the router was built without store=.",
                        hint="PostgresReplicaRouter(primary, replicas, store=store).",
                    )
                if not row[3]:
                    return False
            elif int(row[2]) < req.token:
                return False
        return True

    async def _validate(self) -> None:
        """When the first replica was behind: a token from the future fails at once, and
        so do projections the primary does not know. Bounded: a primary that does not
        answer skips the check (the wait then ends at the deadline)."""
        router = self.router
        try:
            await asyncio.wait_for(self._ask_primary(), self._bound(router.connect_timeout))
        except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
            router._lost(router._primary, exc)

    async def _ask_primary(self) -> None:
        router, req = self.router, self.req
        last = await req.store.last_position()
        if req.token > last:
            raise TokenFromFutureError(
                f"consistency token {req.token} is beyond the end of the event log ({last}).",
                hint="pass the token of a committed command (receipt.token), unmodified.",
            )
        key = tuple(sorted(set(req.projections)))
        if key in router._validated:
            return
        async with router.primary.read_only() as s:
            rows = await s.connection.fetch(router._sql_modes, list(key))
        missing = sorted(set(key) - {str(r[0]) for r in rows})
        if missing:
            raise ConfigurationError(
                f"projection(s) {missing} are not set up in the read database.",
                hint="start their projector (or InlineProjections.setup()) first.",
            )
        router._validated.add(key)

    def _stale(self) -> StaleReadError:
        req = self.req
        seen = {x.node.name: min(x.positions.values(), default=0) for x in self.held if x.positions}
        return StaleReadError(
            f"no server reached consistency token {req.token} within {req.timeout:g}s "
            f"(policy {req.policy!r}; checkpoints seen: {seen or 'none'}; "
            f"{self.router._describe_rotation() or 'no replicas'}"
            f"{'; last check error: ' + self.problem if self.problem else ''}).",
            hint="retry later, raise the timeout, or use policy='primary' or 'stale'.",
        )
