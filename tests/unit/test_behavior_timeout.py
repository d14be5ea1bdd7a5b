"""TimeoutBehavior."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from cqrskit import Command, DispatchTimeoutError, Mediator, Query, Registry
from cqrskit.pipeline import TimeoutBehavior, for_commands


@dataclass(frozen=True, slots=True)
class Slow(Command[str]):
    pass


@dataclass(frozen=True, slots=True)
class SlowReport(Slow):
    pass


@dataclass(frozen=True, slots=True)
class Fast(Query[int]):
    pass


def _blocking(log: list[str]) -> Any:
    async def handler(message: Any) -> str:
        try:
            await asyncio.Event().wait()  # never set: only the deadline ends this
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        return "unreachable"

    return handler


async def test_times_out_with_dispatch_timeout_error_and_cancels_handler() -> None:
    log: list[str] = []
    behavior = TimeoutBehavior(0.02)
    with pytest.raises(DispatchTimeoutError) as info:
        await behavior(Slow(), _blocking(log))
    err = info.value
    assert err.message_type is Slow
    assert "outcome is unknown" in str(err)
    assert "0.02 s" in str(err)
    assert isinstance(err, TimeoutError)
    assert isinstance(err.__cause__, TimeoutError)
    assert log == ["cancelled"]


async def test_per_type_override_and_inheritance() -> None:
    behavior = TimeoutBehavior(0.02, per_type={Slow: 5.0, SlowReport: 0.01, Fast: None})
    assert behavior.limit_for(Slow) == 5.0
    assert behavior.limit_for(SlowReport) == 0.01
    assert behavior.limit_for(Fast) is None

    @dataclass(frozen=True)
    class Other(Command[None]):
        pass

    assert behavior.limit_for(Other) == 0.02
    with pytest.raises(DispatchTimeoutError, match="SlowReport"):
        await behavior(SlowReport(), _blocking([]))


async def test_no_limit_returns_next_awaitable_itself() -> None:
    behavior = TimeoutBehavior()

    async def handler(m: Any) -> int:
        return 1

    awaitable = handler(Fast())
    assert behavior(Fast(), lambda m: awaitable) is awaitable
    assert await awaitable == 1


async def test_fast_handler_result_and_errors_pass_through() -> None:
    behavior = TimeoutBehavior(5.0)

    async def ok(m: Any) -> str:
        return "done"

    async def own_timeout(m: Any) -> str:
        raise TimeoutError("driver timeout")

    assert await behavior(Slow(), ok) == "done"
    with pytest.raises(TimeoutError, match="driver timeout") as info:
        await behavior(Slow(), own_timeout)
    assert not isinstance(info.value, DispatchTimeoutError)


def test_rejects_non_positive_timeouts() -> None:
    with pytest.raises(ValueError, match="positive"):
        TimeoutBehavior(0)
    with pytest.raises(ValueError, match="positive"):
        TimeoutBehavior(1, per_type={Slow: -1})


async def test_through_a_mediator_scoped_to_commands() -> None:
    registry = Registry()

    @registry.handler
    async def slow(cmd: Slow) -> str:
        await asyncio.Event().wait()
        return "never"

    @registry.handler
    async def fast(q: Fast) -> int:
        return 42

    mediator = Mediator(registry, behaviors=[for_commands(TimeoutBehavior(0.02))])
    with pytest.raises(DispatchTimeoutError):
        await mediator.send(Slow())
    assert await mediator.ask(Fast()) == 42
