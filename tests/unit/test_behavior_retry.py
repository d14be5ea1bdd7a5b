"""RetryBehavior / SyncRetryBehavior."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from dataclasses import dataclass
from typing import Any

import pytest

from cqrskit import (
    Command,
    CommitOutcomeUnknownError,
    ConcurrencyError,
    ConnectionLostError,
    DispatchTimeoutError,
    Event,
    FieldError,
    Mediator,
    NotAuthorizedError,
    PersistenceError,
    Query,
    Registry,
    ValidationError,
)
from cqrskit.eventlog import InMemoryEventStore, UnitOfWork
from cqrskit.pipeline import (
    RetryBehavior,
    SyncRetryBehavior,
    TimeoutBehavior,
    for_commands,
    is_transient,
)


@dataclass(frozen=True, slots=True)
class Happened(Event):
    n: int


@dataclass(frozen=True, slots=True)
class Deposit(Command[int]):
    amount: int


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def _flaky(failures: list[BaseException], result: Any = "ok") -> tuple[Any, list[int]]:
    calls: list[int] = []

    async def handler(message: Any) -> Any:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return result

    return handler, calls


class SerializationFailure(Exception):
    sqlstate = "40001"


class UniqueViolation(Exception):
    sqlstate = "23505"


def test_default_predicate() -> None:
    assert is_transient(ConcurrencyError("lost race"))
    assert is_transient(TimeoutError())
    assert not is_transient(DispatchTimeoutError("late"))  # the command may have been applied
    safe = DispatchTimeoutError("late")
    safe.retry_safe = True
    assert is_transient(safe)
    assert is_transient(ConnectionResetError())
    assert is_transient(ConnectionLostError("lost before COMMIT"))  # nothing was committed
    assert not is_transient(CommitOutcomeUnknownError("lost during COMMIT"))
    assert is_transient(SerializationFailure())
    assert not is_transient(UniqueViolation())
    assert is_transient(sqlite3.OperationalError("database is locked"))
    assert not is_transient(sqlite3.OperationalError("no such table: x"))
    assert not is_transient(ValueError("bad"))
    assert is_transient(KeyError("k"), (KeyError,))
    wrapped = PersistenceError("write failed")
    wrapped.__cause__ = SerializationFailure()
    assert is_transient(wrapped)
    # never, whatever the cause chain says
    refused = ValidationError([FieldError("a", "b")])
    refused.__cause__ = ConcurrencyError("x")
    assert not is_transient(refused)
    assert not is_transient(NotAuthorizedError("no"))


def test_cause_chain_walk_is_bounded() -> None:
    a = ValueError("a")
    b = ValueError("b")
    a.__cause__ = b
    b.__cause__ = a  # a cycle: must terminate
    assert not is_transient(a)


async def test_retries_transient_until_success_with_jittered_bounded_delays() -> None:
    sleep = FakeSleep()
    rng = random.Random(1234)
    behavior = RetryBehavior(
        attempts=5, base_delay=0.1, max_delay=0.25, sleep=sleep, random=rng.random
    )
    handler, calls = _flaky([ConcurrencyError("x")] * 4)
    assert await behavior(Deposit(1), handler) == "ok"
    assert len(calls) == 5
    assert len(sleep.delays) == 4
    ceilings = [0.1, 0.2, 0.25, 0.25]  # base * 2**(n-1), capped at max_delay
    for delay, ceiling in zip(sleep.delays, ceilings, strict=True):
        assert 0.0 <= delay <= ceiling
    # full jitter: the delays are the ceilings scaled by the seeded random stream
    expected_rng = random.Random(1234)
    assert sleep.delays == [c * expected_rng.random() for c in ceilings]
    assert len(set(sleep.delays)) == 4


async def test_gives_up_after_attempts_with_a_note() -> None:
    sleep = FakeSleep()
    behavior = RetryBehavior(attempts=3, sleep=sleep, random=lambda: 0.5)
    errors: list[BaseException] = [ConcurrencyError(f"try {i}") for i in range(10)]
    handler, calls = _flaky(errors)
    with pytest.raises(ConcurrencyError, match="try 2") as info:
        await behavior(Deposit(1), handler)
    assert len(calls) == 3
    assert len(sleep.delays) == 2
    assert info.value.__notes__ == [
        "cqrskit: Deposit failed on attempt 3 of 3 (retried 2 time(s))."
    ]


@pytest.mark.parametrize(
    "error",
    [ValidationError([FieldError("amount", "must be positive")]), NotAuthorizedError("no")],
)
async def test_validation_and_authorization_are_never_retried(error: Exception) -> None:
    sleep = FakeSleep()
    always = RetryBehavior(attempts=5, transient=lambda e: True, sleep=sleep)
    handler, calls = _flaky([error])
    with pytest.raises(type(error)) as info:
        await always(Deposit(1), handler)
    assert len(calls) == 1
    assert sleep.delays == []
    assert not getattr(info.value, "__notes__", None)


async def test_non_transient_error_fails_at_once() -> None:
    sleep = FakeSleep()
    handler, calls = _flaky([ValueError("not transient")])
    with pytest.raises(ValueError, match="not transient"):
        await RetryBehavior(attempts=5, sleep=sleep)(Deposit(1), handler)
    assert len(calls) == 1
    assert sleep.delays == []


async def test_non_transient_after_a_retry_is_noted_and_stops() -> None:
    sleep = FakeSleep()
    behavior = RetryBehavior(attempts=5, sleep=sleep, random=lambda: 0.0)
    handler, calls = _flaky([TimeoutError(), KeyError("gone")])
    with pytest.raises(KeyError) as info:
        await behavior(Deposit(1), handler)
    assert len(calls) == 2
    assert info.value.__notes__ == [
        "cqrskit: Deposit failed on attempt 2 of 5 (retried 1 time(s))."
    ]


async def test_retry_on_and_custom_predicate() -> None:
    behavior = RetryBehavior(attempts=2, retry_on=(KeyError,), sleep=FakeSleep())
    handler, calls = _flaky([KeyError("x")])
    assert await behavior(Deposit(1), handler) == "ok"
    assert len(calls) == 2

    only_value = RetryBehavior(
        attempts=3, transient=lambda e: isinstance(e, ValueError), sleep=FakeSleep()
    )
    handler2, calls2 = _flaky([ConcurrencyError("c")])
    with pytest.raises(ConcurrencyError):
        await only_value(Deposit(1), handler2)
    assert len(calls2) == 1


async def test_cancellation_is_never_retried() -> None:
    import asyncio

    behavior = RetryBehavior(attempts=5, transient=lambda e: True, sleep=FakeSleep())
    handler, calls = _flaky([asyncio.CancelledError()])
    with pytest.raises(asyncio.CancelledError):
        await behavior(Deposit(1), handler)
    assert len(calls) == 1


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError, match="attempts"):
        RetryBehavior(attempts=0)
    with pytest.raises(ValueError, match="negative"):
        SyncRetryBehavior(base_delay=-1)


def test_default_delays_stay_within_bounds_with_the_real_random() -> None:
    behavior = RetryBehavior(base_delay=0.05, max_delay=0.3)
    for attempt in range(1, 12):
        ceiling = min(0.3, 0.05 * 2 ** (attempt - 1))
        for _ in range(50):
            assert 0.0 <= behavior.delay(attempt) <= ceiling


async def test_through_a_mediator_for_commands() -> None:
    registry = Registry()
    outcomes: list[BaseException] = [ConcurrencyError("stale"), ConcurrencyError("stale")]
    calls: list[int] = []

    @registry.handler
    async def deposit(cmd: Deposit) -> int:
        calls.append(cmd.amount)
        if outcomes:
            raise outcomes.pop(0)
        return cmd.amount

    sleep = FakeSleep()
    mediator = Mediator(registry, behaviors=[for_commands(RetryBehavior(sleep=sleep))])
    assert await mediator.send(Deposit(7)) == 7
    assert calls == [7, 7, 7]
    assert len(sleep.delays) == 2


def test_sync_twin() -> None:
    delays: list[float] = []
    behavior = SyncRetryBehavior(attempts=3, sleep=delays.append, random=lambda: 1.0)
    state = {"left": 2}

    def handler(message: Any) -> str:
        if state["left"]:
            state["left"] -= 1
            raise ConnectionError("reset")
        return "ok"

    assert behavior(Deposit(1), handler) == "ok"
    assert delays == [0.05, 0.1]

    def always_fails(message: Any) -> str:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError) as info:
        behavior(Deposit(1), always_fails)
    assert info.value.__notes__ == [
        "cqrskit: Deposit failed on attempt 3 of 3 (retried 2 time(s))."
    ]


@dataclass(frozen=True, slots=True)
class Slow(Command[int]):
    n: int


@dataclass(frozen=True, slots=True)
class SlowRead(Query[int]):
    n: int


def _slow_app(order: str) -> tuple[Mediator, list[int], InMemoryEventStore]:
    # the first attempt hangs until the time limit; the second returns at once
    store = InMemoryEventStore()
    calls: list[int] = []
    registry = Registry()

    @registry.handler
    async def slow(cmd: Slow, uow: UnitOfWork) -> int:
        calls.append(cmd.n)
        uow.record("s", Happened(cmd.n))
        if len(calls) == 1:
            await asyncio.Event().wait()
        return cmd.n

    @registry.handler
    async def slow_read(q: SlowRead) -> int:
        calls.append(q.n)
        if len(calls) == 1:
            await asyncio.Event().wait()
        return q.n

    retry = RetryBehavior(attempts=3, sleep=FakeSleep())
    timeout = TimeoutBehavior(0.05)
    behaviors: list[Any] = (
        [retry, timeout, store.transaction()]
        if order == "outside"
        else [retry, store.transaction(), timeout]
    )
    return Mediator(registry, behaviors=behaviors, resolver=store.resolver()), calls, store


async def test_a_command_timed_out_outside_its_transaction_is_not_retried() -> None:
    mediator, calls, store = _slow_app("outside")
    with pytest.raises(DispatchTimeoutError) as info:
        await mediator.send(Slow(1))
    assert not info.value.retry_safe
    assert calls == [1]  # run once: it might have committed
    assert await store.read_stream("s") == []


async def test_a_command_timed_out_inside_its_transaction_is_rolled_back_and_retried() -> None:
    mediator, calls, store = _slow_app("inside")
    assert await mediator.send(Slow(7)) == 7
    assert calls == [7, 7]
    assert [e.version for e in await store.read_stream("s")] == [1]  # applied once


async def test_a_timed_out_query_is_retried() -> None:
    mediator, calls, _ = _slow_app("outside")
    assert await mediator.ask(SlowRead(3)) == 3
    assert calls == [3, 3]


def test_a_listed_type_is_retried_whatever_its_flag() -> None:
    assert is_transient(DispatchTimeoutError("late"), (DispatchTimeoutError,))


async def test_a_timeout_of_another_dispatch_does_not_make_this_command_retryable() -> None:
    # the handler's error came from some other dispatch (one whose deadline ran out after
    # it committed): rolling back this command says nothing about that one
    store = InMemoryEventStore()
    calls: list[int] = []
    registry = Registry()

    @registry.handler
    async def slow(cmd: Slow, uow: UnitOfWork) -> int:
        calls.append(cmd.n)
        foreign = DispatchTimeoutError("another dispatch timed out")
        foreign._message = object()
        raise foreign

    mediator = Mediator(
        registry,
        behaviors=[RetryBehavior(attempts=3, sleep=FakeSleep()), store.transaction()],
        resolver=store.resolver(),
    )
    with pytest.raises(DispatchTimeoutError) as info:
        await mediator.send(Slow(1))
    assert not info.value.retry_safe
    assert calls == [1]
