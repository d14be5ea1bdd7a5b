"""DishkaResolver with real dishka containers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import dishka
import pytest
from dishka import Provider, make_async_container, make_container

from cqrskit import (
    Command,
    Dependencies,
    DependencyError,
    Mediator,
    Metadata,
    Query,
    Registry,
    Scope,
)
from cqrskit.dishka import DishkaResolver
from cqrskit.pipeline import Next


class Settings:
    def __init__(self) -> None:
        self.prefix = "acct"


class Session:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.closed = False


class Log(list[str]):
    pass


class Unprovided:
    pass


class Clock:
    pass


class Step:
    pass


@dataclass(frozen=True, slots=True)
class Open(Command[str]):
    owner: str


@dataclass(frozen=True, slots=True)
class Fail(Command[None]):
    pass


@dataclass(frozen=True, slots=True)
class Config(Query[str]):
    pass


class RequestInfo:
    def __init__(self, correlation_id: str) -> None:
        self.correlation_id = correlation_id


def app_provider(log: Log) -> Provider:
    provider = Provider()
    provider.provide(Settings, scope=dishka.Scope.APP)
    provider.provide(lambda: log, provides=Log, scope=dishka.Scope.APP)

    async def session(log: Log) -> AsyncIterator[Session]:
        s = Session(log)
        log.append("session opened")
        error = yield s
        s.closed = True
        log.append(f"session closed ({type(error).__name__ if error else 'ok'})")

    provider.provide(session, scope=dishka.Scope.REQUEST)
    return provider


def _registry() -> Registry:
    registry = Registry()

    @registry.handler
    async def open_account(cmd: Open, settings: Settings, session: Session) -> str:
        session.log.append(f"handler {cmd.owner}")
        assert not session.closed
        return f"{settings.prefix}-{cmd.owner}"

    @registry.handler
    async def fail(cmd: Fail, session: Session) -> None:
        raise RuntimeError("handler failed")

    @registry.handler
    async def config(q: Config, settings: Settings, scope: Scope) -> str:
        assert not any(k.startswith("cqrskit.dishka") for k in scope.extras)
        return settings.prefix

    return registry


async def test_request_scope_per_dispatch_shared_and_closed() -> None:
    log = Log()
    container = make_async_container(app_provider(log))
    seen: list[Session] = []

    async def behavior(message: Any, next: Next, session: Session) -> Any:
        seen.append(session)
        return await next(message)

    mediator = Mediator(_registry(), behaviors=[behavior], resolver=DishkaResolver(container))
    assert await mediator.send(Open("ada")) == "acct-ada"
    assert log == ["session opened", "handler ada", "session closed (ok)"]
    assert await mediator.send(Open("bob")) == "acct-bob"
    assert log[3:] == ["session opened", "handler bob", "session closed (ok)"]
    assert len(seen) == 2
    assert seen[0] is not seen[1]
    assert all(s.closed for s in seen)
    await container.close()


async def test_error_reaches_dishka_finalizers() -> None:
    log = Log()
    container = make_async_container(app_provider(log))
    mediator = Mediator(_registry(), resolver=DishkaResolver(container))
    with pytest.raises(RuntimeError, match="handler failed"):
        await mediator.send(Fail())
    assert log == ["session opened", "session closed (RuntimeError)"]
    await container.close()


async def test_app_scoped_only_dispatch_enters_no_request_scope() -> None:
    log = Log()
    container = make_async_container(app_provider(log))
    mediator = Mediator(_registry(), resolver=DishkaResolver(container))
    assert await mediator.ask(Config()) == "acct"
    assert log == []
    await container.close()


async def test_unprovided_type_fails_at_build_naming_the_parameter() -> None:
    container = make_async_container(app_provider(Log()))
    registry = Registry()

    @registry.handler
    async def needs(cmd: Open, thing: Unprovided) -> str:
        return ""

    with pytest.raises(DependencyError) as info:
        Mediator(registry, resolver=DishkaResolver(container))
    assert "thing" in str(info.value)
    assert info.value.dependency is Unprovided
    await container.close()


async def test_falls_through_to_the_next_resolver() -> None:
    container = make_async_container(app_provider(Log()))
    registry = Registry()
    clock = Clock()

    @registry.handler
    async def open_account(cmd: Open, settings: Settings, c: Clock) -> str:
        assert c is clock
        return settings.prefix

    deps = Dependencies()
    deps.singleton(Clock, clock)
    mediator = Mediator(registry, resolver=[DishkaResolver(container), deps])
    assert await mediator.send(Open("x")) == "acct"
    await container.close()


async def test_deeper_scope_is_a_build_error_with_the_fix() -> None:
    provider = Provider()
    provider.provide(Step, scope=dishka.Scope.ACTION)
    container = make_async_container(provider)
    registry = Registry()

    @registry.handler
    async def open_account(cmd: Open, step: Step) -> str:
        return ""

    with pytest.raises(DependencyError, match="deeper than the scope entered") as info:
        Mediator(registry, resolver=DishkaResolver(container))
    assert "scope=Scope.ACTION" in str(info.value)
    # entering ACTION per dispatch makes it resolvable
    mediator = Mediator(registry, resolver=DishkaResolver(container, scope=dishka.Scope.ACTION))
    assert await mediator.send(Open("x")) == ""
    await container.close()


async def test_context_for_from_context_providers() -> None:
    provider = Provider()
    provider.from_context(provides=RequestInfo, scope=dishka.Scope.REQUEST)
    container = make_async_container(provider)
    registry = Registry()

    @registry.handler
    async def open_account(cmd: Open, info: RequestInfo, md: Metadata) -> str:
        assert info.correlation_id == md.correlation_id
        return info.correlation_id

    resolver = DishkaResolver(
        container, context=lambda s: {RequestInfo: RequestInfo(s.metadata.correlation_id)}
    )
    mediator = Mediator(registry, resolver=resolver)
    async with mediator.scope(metadata=Metadata(correlation_id="corr-1")):
        assert await mediator.send(Open("x")) == "corr-1"
    await container.close()


async def test_sync_container_works_with_the_async_mediator() -> None:
    log: list[str] = []
    provider = Provider()
    provider.provide(Settings, scope=dishka.Scope.APP)

    def session() -> Iterator[Session]:
        s = Session(log)
        log.append("open")
        yield s
        log.append("close")

    provider.provide(session, scope=dishka.Scope.REQUEST)
    container = make_container(provider)
    mediator = Mediator(_registry(), resolver=DishkaResolver(container))
    assert await mediator.send(Open("ada")) == "acct-ada"
    assert log == ["open", "handler ada", "close"]
    container.close()


def test_rejects_non_containers() -> None:
    with pytest.raises(TypeError, match="AsyncContainer or Container"):
        DishkaResolver(object())  # type: ignore[arg-type]


def test_missing_dishka_raises_missing_extra_error() -> None:
    code = (
        "import sys\n"
        "sys.modules['dishka'] = None\n"
        "from cqrskit.errors import MissingExtraError\n"
        "try:\n"
        "    import cqrskit.dishka\n"
        "except MissingExtraError as exc:\n"
        "    print(exc.extra, '|', exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PYTHONPATH": "src"},
    )
    assert out.stdout.startswith("dishka |")
    assert "pip install 'cqrskit[dishka]'" in out.stdout


class Counter:
    made = 0

    def __init__(self) -> None:
        type(self).made += 1
        self.n = type(self).made


class Fresh:
    pass


async def test_app_scoped_values_respect_dishka_cache_flag() -> None:
    provider = Provider()
    provider.provide(Counter, scope=dishka.Scope.APP)  # cached by default
    provider.provide(Fresh, scope=dishka.Scope.APP, cache=False)
    container = make_async_container(provider)
    registry = Registry()
    seen: list[tuple[Counter, Fresh]] = []

    @registry.handler
    async def open_account(cmd: Open, counter: Counter, fresh: Fresh) -> str:
        seen.append((counter, fresh))
        return ""

    Counter.made = 0
    mediator = Mediator(registry, resolver=DishkaResolver(container))
    for _ in range(3):
        await mediator.send(Open("x"))
    assert Counter.made == 1
    assert seen[0][0] is seen[1][0] is seen[2][0]
    assert len({id(f) for _, f in seen}) == 3  # cache=False: a new one each time
    await container.close()
