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


class Counting:
    """A class-based behavior with a dependency parameter after (message, next)."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    async def __call__(self, message: Any, next: Next, clock: Clock) -> Any:
        self.seen.append((self, clock))
        return await next(message)


async def test_class_based_behavior_with_singleton_and_scoped_dependencies() -> None:
    registry = Registry()

    @registry.handler
    async def ping(cmd: Ping) -> str:
        return "pong"

    clock = Clock()
    singleton_deps = Dependencies()
    singleton_deps.singleton(Clock, clock)
    behavior = Counting()
    mediator = Mediator(registry, behaviors=[behavior], resolver=singleton_deps)
    assert await mediator.send(Ping(1)) == "pong"
    assert behavior.seen == [(behavior, clock)]

    scoped_deps = Dependencies()
    scoped_deps.scoped(Clock, Clock)
    scoped_behavior = Counting()
    mediator = Mediator(registry, behaviors=[scoped_behavior], resolver=scoped_deps)
    await mediator.send(Ping(1))
    await mediator.send(Ping(2))
    first, second = scoped_behavior.seen
    assert first[0] is scoped_behavior
    assert isinstance(first[1], Clock)
    assert first[1] is not second[1]  # one per dispatch
