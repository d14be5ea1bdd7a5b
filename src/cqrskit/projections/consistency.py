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
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from cqrskit.errors import (
    ConfigurationError,
    StaleReadError,
    TokenFromFutureError,
    ValidationError,
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
_UNIT_SPAN = 1 << 20  # a unit of work's events lie within this many positions of its token
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
    """Class decorator declaring the projections a query type reads, and its policy.

    Raises:
        ConfigurationError: an unknown policy, or a timeout that is not a finite number of
            seconds >= 0.
    """
    _check_policy(policy)
    if not _valid_timeout(timeout):
        raise ConfigurationError(
            f"@reads(...): timeout must be a finite number of seconds >= 0, got {timeout!r}.",
            hint="e.g. timeout=2.0; use policy='fail' (or timeout=0) not to wait.",
        )

    def mark(cls: Q) -> Q:
        cls.__cqrskit_reads__ = ReadSpec(tuple(projections), policy, timeout)  # type: ignore[attr-defined]
        return cls

    return mark


def read_spec(query_type: type) -> ReadSpec | None:
    """What ``@reads(...)`` declared for ``query_type`` (or a base class), if anything."""
    spec: ReadSpec | None = getattr(query_type, "__cqrskit_reads__", None)
    return spec


def _valid_timeout(value: object) -> bool:
    # NaN compares false with everything: a NaN deadline never expires, bypasses
    # min(timeout, max_timeout) and corrupts the event loop's timer heap
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _check_timeout(value: float | None) -> None:
    """Refuse a caller's wait that is not a finite number of seconds >= 0."""
    if value is not None and not _valid_timeout(value):
        raise ValidationError(
            {"timeout": "must be a finite number of seconds >= 0 (not NaN, infinite or negative)"}
        )


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

    Raises:
        ConfigurationError: an unknown policy.
        ValidationError: ``timeout`` is NaN, infinite or negative.
    """
    _check_policy(policy)
    _check_timeout(timeout)
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
        max_timeout: an upper bound on any wait, whatever a caller asks for (a finite
            number of seconds >= 0).
    """

    def __init__(
        self,
        store: EventStore,
        read_db: ReadDatabase,
        *,
        signal: Signal | None = None,
        max_timeout: float = 30.0,
    ) -> None:
        if not _valid_timeout(max_timeout):
            raise ConfigurationError(
                "ConsistencyGate: max_timeout must be a finite number of seconds >= 0, got "
                f"{max_timeout!r}.",
                hint="e.g. max_timeout=30.0.",
            )
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
        """The active checkpoint of each named projection (of a partitioned one: its lowest
        partition position)."""
        return (await self._observe(names, None))[0]

    async def _observe(
        self, names: Sequence[str], token: int | None
    ) -> tuple[dict[str, int], dict[str, int]]:
        """Checkpoints by projection and, given ``token``, the highest parked position at or
        below it (within one unit of work's span) by projection — one query. A partitioned
        projection's checkpoint is ``token`` once every partition has applied it, else its
        lowest partition position (:func:`~cqrskit.projections.partitions.token_positions`)."""
        marks = ", ".join("?" for _ in names)
        window = (token, token - _UNIT_SPAN) if token is not None else (0, 0)
        async with self.read_db.read_only() as s:
            rows = await s.fetchall(
                "SELECT p.name, c.position, (SELECT max(d.position) "
                "FROM cqrskit_dead_letters d WHERE d.projection = p.name "
                "AND d.generation = p.active_generation AND d.position <= ? "
                "AND d.position > ?), p.mode FROM cqrskit_projections p "
                "JOIN cqrskit_checkpoints c "
                "ON c.projection = p.name AND c.generation = p.active_generation "
                f"WHERE p.name IN ({marks})",
                *window,
                *names,
            )
            found = {str(r[0]): int(r[1]) for r in rows}
            split = [str(r[0]) for r in rows if r[3] in ("partitioned", "consumer")]
            if split:
                from cqrskit.projections.partitions import token_positions

                found.update(await token_positions(s, self.store, split, token))
        missing = sorted(set(names) - set(found))
        if missing:
            raise ConfigurationError(
                f"projection(s) {missing} are not set up in the read database.",
                hint="start their projector (or InlineProjections.setup()) first.",
            )
        parked = {str(r[0]): int(r[2]) for r in rows if token is not None and r[2] is not None}
        return found, parked

    async def _first_position(self, token: int) -> int:
        """The position of the first event of the unit of work whose last event is at
        ``token``: its events have consecutive positions, and each one's ``message_id``
        ends with ``-<n>``, its index in the unit of work."""
        found = await self.store.read_after(token - 1, 1)
        if found and found[0].position == token:
            message_id = found[0].metadata.get("message_id")
            if isinstance(message_id, str):
                _, _, index = message_id.rpartition("-")
                if index.isdigit() and int(index) <= _UNIT_SPAN:
                    return token - int(index)
        return token

    async def check(
        self,
        names: Sequence[str],
        token: int,
        policy: Policy,
        timeout: float,
        state: ReadAfter | None = None,
    ) -> bool:
        """Return ``False`` when every projection reached ``token``, ``True`` for stale.

        A projection that parked an event of the token's own command (a dead letter) has
        not applied that write, even with its checkpoint past it: it counts as behind.

        Raises:
            TokenFromFutureError: ``token`` is beyond the end of the log.
            StaleReadError: behind, and the policy says fail (or wait timed out).
            ValidationError: ``timeout`` is NaN, infinite or negative.
        """
        _check_timeout(timeout)
        first: list[int] = []  # the command's first position, looked up once if needed

        async def behind() -> tuple[dict[str, int], list[str], list[str]]:
            local = self.signal.reached(names, token, _UNIT_SPAN)
            if local is not None:  # this process's projectors committed it: no round trip
                if state is not None:
                    state.positions = local
                return local, [], []
            positions, parked = await self._observe(names, token)
            if state is not None:
                state.positions = positions
            late = sorted(n for n, p in positions.items() if p < token)
            holes: list[str] = []
            if parked:
                if not first:
                    first.append(await self._first_position(token))
                holes = sorted(n for n, p in parked.items() if p >= first[0])
            return positions, late, holes

        positions, late, holes = await behind()
        if not late and not holes:
            return False
        if late:
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
            positions, late, holes = await behind()
            if not late and not holes:
                return False
        if policy == "stale":
            return True
        if late:
            raise StaleReadError(
                f"read model(s) {late} did not reach consistency token {token} "
                f"(at {min(positions[n] for n in late)}) within {timeout:g}s.",
                hint="retry later, raise the timeout, or use policy='stale'.",
            )
        raise StaleReadError(
            f"read model(s) {holes} parked an event of the command with consistency token "
            f"{token} (a dead letter): they do not contain that write.",
            hint="fix the projection and retry its dead letters (request_retry, or "
            "'cqrskit projections dead-letters NAME --retry'), or use policy='stale'.",
        )
