"""Regression: a behavior whose dependencies are all singletons gets them injected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cqrskit import Command, Dependencies, Mediator, Registry
from cqrskit.pipeline import Next


class Clock:
    pass


@dataclass(frozen=True, slots=True)
class Ping(Command[str]):
    n: int


async def test_singleton_dependency_of_a_behavior_is_injected_in_an_unscoped_plan() -> None:
    registry = Registry()

    @registry.handler
    async def ping(cmd: Ping) -> str:
        return f"pong {cmd.n}"

    clock = Clock()
    seen: list[Clock] = []

    async def behavior(message: Any, next: Next, clock: Clock) -> Any:
        seen.append(clock)
        return await next(message)

    deps = Dependencies()
    deps.singleton(Clock, clock)
    mediator = Mediator(registry, behaviors=[behavior], resolver=deps)
    assert await mediator.send(Ping(3)) == "pong 3"
    assert seen == [clock]
