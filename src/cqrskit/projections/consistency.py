"""Consistency tokens for queries: read your own writes from asynchronous read models.

A command sent with ``await mediator.send_tracked(cmd)`` returns a receipt whose ``token`` is
the log position of its last event. A query declares which projections it reads
(:func:`reads`); given a token, the :class:`ConsistencyGate` behavior makes the query wait
until those projections' checkpoints reach the token, or serves flagged-stale data, or
fails, by policy:

``"wait"``   wait up to ``timeout`` seconds, then raise :class:`~cqrskit.errors.StaleReadError`;
``"stale"``  wait up to ``timeout`` (may be 0), then run the query anyway and flag it stale;
``"fail"``   raise :class:`~cqrskit.errors.StaleReadError` at once if behind;
``"primary"`` on a replica router (:mod:`cqrskit.postgres.replica`): run on a replica that
            already reached the token, else on the primary (waiting there as ``"wait"``);
            on a database without replicas it is ``"wait"``.

A token beyond the end of the log raises :class:`~cqrskit.errors.TokenFromFutureError` at
once. The flag reaches the caller as ``ReadAfter.stale`` (from :func:`read_after`) or
``ConsistentRead.stale`` (from :func:`ask_consistent`). Queries dispatched without a token
pay one context-variable lookup.

A read database that routes sessions by token (``ReadDatabase.routes_tokens``, a replica
router) gets the resolved :class:`TokenRequest` instead: it picks, for each read-only
session, a server that reached the token, and applies the policy itself.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from cqrskit.errors import (
    ConfigurationError,
    StaleReadError,
    TokenFromFutureError,
    describe,
)
from cqrskit.eventlog import EventStore
from cqrskit.messages import Query
from cqrskit.projections.db import ReadDatabase
from cqrskit.projections.signal import Signal

__all__ = [
    "ConsistencyGate",
    "ConsistentRead",
    "Policy",
    "ReadAfter",
    "ReadSpec",
    "TokenRequest",
    "ask_consistent",
    "current_read_after",
    "read_after",
    "read_spec",
    "reads",
]

Policy = Literal["wait", "stale", "fail", "primary"]
R = TypeVar("R")
Q = TypeVar("Q", bound=type)
_POLICIES = ("wait", "stale", "fail", "primary")


@dataclass(frozen=True, slots=True)
class ReadSpec:
    """What a query type reads and its default consistency policy."""

    projections: tuple[str, ...]
    policy: Policy = "wait"
    timeout: float = 2.0


def reads(*projections: str, policy: Policy = "wait", timeout: float = 2.0) -> Callable[[Q], Q]:
    """Class decorator declaring the projections a query type reads, and its policy."""
    _check_policy(policy)

    def mark(cls: Q) -> Q:
        cls.__cqrskit_reads__ = ReadSpec(tuple(projections), policy, timeout)  # type: ignore[attr-defined]
        return cls

    return mark


def read_spec(query_type: type) -> ReadSpec | None:
    """What ``@reads(...)`` declared for ``query_type`` (or a base class), if anything."""
    spec: ReadSpec | None = getattr(query_type, "__cqrskit_reads__", None)
    return spec


def _check_policy(policy: str | None) -> None:
    if policy is not None and policy not in _POLICIES:
        raise ConfigurationError(
            f"unknown consistency policy {policy!r}.", hint=f"use one of {_POLICIES}."
        )


@dataclass(slots=True)
class ReadAfter:
    """The consistency request of the current context; the caller's view of the outcome.

    Attributes:
        token: the position the read models must reach.
        stale: set to ``True`` when a query inside ran on read models behind the token.
        positions: the checkpoints seen by the last check, by projection.
        source: where the last query ran, when a replica router chose it (``"primary"``
            or a replica's name).
        request: the query being gated, while a routing read database serves it.
    """

    token: int | None
    policy: Policy | None = None
    timeout: float | None = None
    projections: tuple[str, ...] | None = None
    stale: bool = False
    checked: bool = False
    positions: dict[str, int] = field(default_factory=dict)
    source: str | None = None
    request: TokenRequest | None = None


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """A query's consistency request as the :class:`ConsistencyGate` resolved it, for a
    read database that routes sessions by token (``ReadDatabase.routes_tokens``).

    Attributes:
        token: the position the query must see.
        projections: the read models it reads.
        policy: what to do when no server has reached the token.
        timeout: the wait allowed (already bounded by the gate's ``max_timeout``).
        deadline: ``time.monotonic()`` after which the wait is over.
        store: the event log, to reject tokens from the future.
    """

    token: int
    projections: tuple[str, ...]
    policy: Policy
    timeout: float
    deadline: float
    store: EventStore


_request: contextvars.ContextVar[ReadAfter | None] = contextvars.ContextVar(
    "cqrskit_read_after", default=None
)


@asynccontextmanager
async def read_after(
    token: int | None,
    *,
    policy: Policy | None = None,
    timeout: float | None = None,
    projections: Sequence[str] | None = None,
) -> AsyncIterator[ReadAfter]:
    """Queries asked inside the block see read models at ``token`` or later (by policy).

    ``policy``, ``timeout`` and ``projections`` override the query type's :func:`reads`.
    """
    _check_policy(policy)
    state = ReadAfter(token, policy, timeout, tuple(projections) if projections else None)
    reset = _request.set(state)
    try:
        yield state
    finally:
        _request.reset(reset)


def current_read_after() -> ReadAfter | None:
    """The consistency request of the current context (:func:`read_after`), if any."""
    return _request.get()


@dataclass(frozen=True, slots=True)
class ConsistentRead(Generic[R]):
    """The result of :func:`ask_consistent`: the value and whether it is stale."""

    value: R
    stale: bool
    positions: dict[str, int]


async def ask_consistent(
    mediator: Any,
    query: Query[R],
    token: int | None,
    *,
    policy: Policy | None = None,
    timeout: float | None = None,
    projections: Sequence[str] | None = None,
) -> ConsistentRead[R]:
    """Ask ``query`` with a consistency token; see :func:`read_after`.

    Raises:
        ConfigurationError: the mediator has no :class:`ConsistencyGate` behavior for it.
    """
    async with read_after(token, policy=policy, timeout=timeout, projections=projections) as state:
        value = await mediator.ask(query)
    if token is not None and not state.checked:
        raise ConfigurationError(
            f"query {describe(type(query))} was asked with a consistency token, but no "
            "ConsistencyGate behavior ran for it.",
            message_type=type(query),
            hint="build the mediator with behaviors=[for_queries(gate.behavior), ...].",
        )
    return ConsistentRead(value, state.stale, dict(state.positions))


class ConsistencyGate:
    """The query behavior enforcing consistency tokens.

    Args:
        store: the event log (to reject tokens from the future).
        read_db: where the projections' checkpoints are.
        signal: an in-process wake-up from a :class:`~cqrskit.projections.Projector`
            (``projector.signal``); without one, checkpoints are polled with a short backoff.
        max_timeout: an upper bound on any wait, whatever a caller asks for.
    """

    def __init__(
        self,
        store: EventStore,
        read_db: ReadDatabase,
        *,
        signal: Signal | None = None,
        max_timeout: float = 30.0,
    ) -> None:
        self.store = store
        self.read_db = read_db
        self.signal = signal or Signal()
        self.max_timeout = max_timeout

    async def behavior(self, message: Any, next: Callable[[Any], Any]) -> Any:
        """Pipeline behavior: wait (or flag, or fail) before running the query handler."""
        state = _request.get()
        if state is None or state.token is None:
            return await next(message)
        state.checked = True
        spec = read_spec(type(message))
        names = state.projections or (spec.projections if spec else ())
        if not names:
            raise ConfigurationError(
                f"query {describe(type(message))} was given a consistency token but does "
                "not declare the projections it reads.",
                message_type=type(message),
                hint="decorate it with @reads('projection', ...) or pass projections=[...].",
            )
        policy = state.policy or (spec.policy if spec else "wait")
        timeout = state.timeout if state.timeout is not None else (spec.timeout if spec else 2.0)
        timeout = min(timeout, self.max_timeout)
        if self.read_db.routes_tokens:
            # the read database picks a server that reached the token for each session
            outer = state.request  # a query asked from inside another one gets its own
            state.request = TokenRequest(
                state.token, tuple(names), policy, timeout, time.monotonic() + timeout, self.store
            )
            try:
                return await next(message)
            finally:
                state.request = outer
        if await self.check(names, state.token, policy, timeout, state):
            state.stale = True
        return await next(message)

    async def positions(self, names: Sequence[str]) -> dict[str, int]:
        """The active checkpoint of each named projection."""
        marks = ", ".join("?" for _ in names)
        async with self.read_db.read_only() as s:
            rows = await s.fetchall(
                "SELECT p.name, c.position FROM cqrskit_projections p "
                "JOIN cqrskit_checkpoints c "
                "ON c.projection = p.name AND c.generation = p.active_generation "
                f"WHERE p.name IN ({marks})",
                *names,
            )
        found = {str(r[0]): int(r[1]) for r in rows}
        missing = sorted(set(names) - set(found))
        if missing:
            raise ConfigurationError(
                f"projection(s) {missing} are not set up in the read database.",
                hint="start their projector (or InlineProjections.setup()) first.",
            )
        return found

    async def check(
        self,
        names: Sequence[str],
        token: int,
        policy: Policy,
        timeout: float,
        state: ReadAfter | None = None,
    ) -> bool:
        """Return ``False`` when every projection reached ``token``, ``True`` for stale.

        Raises:
            TokenFromFutureError: ``token`` is beyond the end of the log.
            StaleReadError: behind, and the policy says fail (or wait timed out).
        """
        positions = await self.positions(names)
        if state is not None:
            state.positions = positions
        if min(positions.values()) >= token:
            return False
        last = await self.store.last_position()
        if token > last:
            raise TokenFromFutureError(
                f"consistency token {token} is beyond the end of the event log ({last}).",
                hint="pass the token of a committed command (receipt.token), unmodified.",
            )
        deadline = time.monotonic() + (0.0 if policy == "fail" else timeout)
        pause = 0.001
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self.signal.wait(min(remaining, pause))
            pause = min(pause * 2, 0.05)
            positions = await self.positions(names)
            if state is not None:
                state.positions = positions
            if min(positions.values()) >= token:
                return False
        if policy == "stale":
            return True
        behind = sorted(n for n, p in positions.items() if p < token)
        raise StaleReadError(
            f"read model(s) {behind} did not reach consistency token {token} "
            f"(at {min(positions.values())}) within {timeout:g}s.",
            hint="retry later, raise the timeout, or use policy='stale'.",
        )
