"""Dependencies: lifetimes, factory kinds, cleanup on success and error, build-time errors."""

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cqrskit import (
    Command,
    Dependencies,
    DependencyError,
    Mediator,
    Metadata,
    Provider,
    Query,
    Registry,
    Scope,
)


@dataclass(frozen=True)
class OpenAccount(Command[str]):
    owner: str


@dataclass(frozen=True)
class ListAccounts(Query[AsyncIterator[str]]):
    pass


class Config:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn


class Session:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.events: list[str] = []


class Repo:
    def __init__(self, session: Session) -> None:
        self.session = session


class A:
    pass


class B:
    pass


class Lifecycle:
    """Records what generator factories saw."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.thrown: list[BaseException] = []


async def send_open(
    factory: Any, *, fail: bool = False, lifecycle: Lifecycle | None = None
) -> tuple[Mediator, list[Session]]:
    registry = Registry()
    seen: list[Session] = []

    @registry.handler
    async def open_account(cmd: OpenAccount, session: Session) -> str:
        seen.append(session)
        if fail:
            raise ValueError("handler failed")
        return "ok"

    deps = Dependencies()
    deps.singleton(Config, Config("sqlite://"))
    if lifecycle is not None:
        deps.singleton(Lifecycle, lifecycle)
    deps.scoped(Session, factory)
    return Mediator(registry, resolver=deps), seen


def test_dependencies_container_basics() -> None:
    deps = Dependencies()
    config = Config("x")
    deps.singleton(Config, config)
    deps.scoped(Session, Session)
    assert Config in deps
    assert Session in deps
    assert Repo not in deps

    def lookup(tp: Any) -> Provider:
        raise AssertionError("not needed")

    provider = deps.provider(Config, lookup)
    assert provider is not None
    assert provider.lifetime == "singleton"
    assert provider.value is config
    assert deps.provider(Repo, lookup) is None


async def test_singleton_is_the_same_object_every_time() -> None:
    registry = Registry()
    seen: list[Config] = []

    @registry.handler
    async def open_account(cmd: OpenAccount, config: Config) -> str:
        seen.append(config)
        return config.dsn

    deps = Dependencies()
    config = Config("pg://")
    deps.singleton(Config, config)
    mediator = Mediator(registry, resolver=deps)
    assert await mediator.send(OpenAccount("a")) == "pg://"
    await mediator.send(OpenAccount("b"))
    assert seen == [config, config]


async def test_scoped_factory_params_are_resolved_by_type_and_cached_per_dispatch() -> None:
    registry = Registry()
    seen: list[tuple[Session, Repo]] = []

    @registry.handler
    async def open_account(cmd: OpenAccount, session: Session, repo: Repo) -> str:
        seen.append((session, repo))
        return "ok"

    deps = Dependencies()
    deps.singleton(Config, Config("pg://"))
    deps.scoped(Session, Session)  # a class is a factory: Session(config: Config)
    deps.scoped(Repo, Repo)  # Repo(session: Session) shares the dispatch's Session
    mediator = Mediator(registry, resolver=deps)
    await mediator.send(OpenAccount("a"))
    await mediator.send(OpenAccount("b"))
    (s1, r1), (s2, r2) = seen
    assert r1.session is s1
    assert r2.session is s2
    assert s1 is not s2
    assert s1.config.dsn == "pg://"


def sync_factory(config: Config) -> Session:
    return Session(config)


async def async_factory(config: Config) -> Session:
    return Session(config)


def generator_factory(config: Config, lifecycle: Lifecycle) -> Iterator[Session]:
    session = Session(config)
    lifecycle.log.append("open")
    try:
        yield session
    except BaseException as exc:
        lifecycle.thrown.append(exc)
        lifecycle.log.append("rollback")
        raise
    lifecycle.log.append("commit")


async def async_generator_factory(config: Config, lifecycle: Lifecycle) -> AsyncIterator[Session]:
    session = Session(config)
    lifecycle.log.append("open")
    try:
        yield session
    except BaseException as exc:
        lifecycle.thrown.append(exc)
        lifecycle.log.append("rollback")
        raise
    lifecycle.log.append("commit")


@pytest.mark.parametrize("factory", [sync_factory, async_factory])
async def test_plain_and_async_factories(factory: Any) -> None:
    mediator, seen = await send_open(factory)
    assert await mediator.send(OpenAccount("a")) == "ok"
    await mediator.send(OpenAccount("b"))
    assert isinstance(seen[0], Session)
    assert seen[0] is not seen[1]


@pytest.mark.parametrize("factory", [generator_factory, async_generator_factory])
async def test_generator_factories_close_after_success(factory: Any) -> None:
    lifecycle = Lifecycle()
    mediator, _ = await send_open(factory, lifecycle=lifecycle)
    assert await mediator.send(OpenAccount("a")) == "ok"
    assert lifecycle.log == ["open", "commit"]
    assert lifecycle.thrown == []


@pytest.mark.parametrize("factory", [generator_factory, async_generator_factory])
async def test_generator_factories_get_the_error_thrown_in(factory: Any) -> None:
    lifecycle = Lifecycle()
    mediator, _ = await send_open(factory, fail=True, lifecycle=lifecycle)
    with pytest.raises(ValueError, match="handler failed") as info:
        await mediator.send(OpenAccount("a"))
    assert lifecycle.log == ["open", "rollback"]
    assert lifecycle.thrown == [info.value]


def yields_twice(config: Config) -> Iterator[Session]:
    yield Session(config)
    yield Session(config)


async def agen_yields_twice(config: Config) -> AsyncIterator[Session]:
    yield Session(config)
    yield Session(config)


@pytest.mark.parametrize("factory", [yields_twice, agen_yields_twice])
async def test_factory_yielding_twice_is_an_error(factory: Any) -> None:
    mediator, _ = await send_open(factory)
    with pytest.raises(DependencyError, match="yielded twice"):
        await mediator.send(OpenAccount("a"))


def failing_cleanup(config: Config) -> Iterator[Session]:
    yield Session(config)
    raise RuntimeError("commit failed")


async def test_cleanup_error_propagates_after_a_successful_handler() -> None:
    mediator, seen = await send_open(failing_cleanup)
    with pytest.raises(RuntimeError, match="commit failed"):
        await mediator.send(OpenAccount("a"))
    assert len(seen) == 1


async def test_every_cleanup_runs_even_when_one_fails() -> None:
    registry = Registry()
    closed: list[str] = []

    def session(config: Config) -> Iterator[Session]:
        yield Session(config)
        closed.append("session")

    def repo(session: Session) -> Iterator[Repo]:
        yield Repo(session)
        closed.append("repo")
        raise RuntimeError("repo cleanup failed")

    @registry.handler
    async def open_account(cmd: OpenAccount, repo: Repo) -> str:
        return "ok"

    deps = Dependencies()
    deps.singleton(Config, Config("x"))
    deps.scoped(Session, session)
    deps.scoped(Repo, repo)
    with pytest.raises(RuntimeError, match="repo cleanup failed"):
        await Mediator(registry, resolver=deps).send(OpenAccount("a"))
    assert closed == ["repo", "session"]  # last opened, first closed


async def test_scoped_handler_class_is_created_per_dispatch() -> None:
    registry = Registry()
    instances: list[object] = []

    @registry.handler
    class OpenHandler:
        def __init__(self, session: Session, config: Config) -> None:
            self.session = session
            instances.append(self)

        async def handle(self, cmd: OpenAccount, session: Session) -> str:
            return "same" if session is self.session else "different"

    deps = Dependencies()
    deps.singleton(Config, Config("x"))
    deps.scoped(Session, Session)
    mediator = Mediator(registry, resolver=deps)
    assert await mediator.send(OpenAccount("a")) == "same"
    assert await mediator.send(OpenAccount("b")) == "same"
    assert len(instances) == 2


async def test_streaming_handler_reads_its_scoped_dependency_while_yielding() -> None:
    registry = Registry()
    lifecycle = Lifecycle()

    @registry.handler
    async def list_accounts(q: ListAccounts, session: Session) -> AsyncIterator[str]:
        for name in ("a", "b"):
            lifecycle.log.append(f"yield {name}")
            yield name

    deps = Dependencies()
    deps.singleton(Config, Config("x"))
    deps.singleton(Lifecycle, lifecycle)
    deps.scoped(Session, generator_factory)
    mediator = Mediator(registry, resolver=deps)
    assert [x async for x in mediator.stream(ListAccounts())] == ["a", "b"]
    assert lifecycle.log == ["open", "yield a", "yield b", "commit"]


async def test_metadata_and_scope_are_injectable() -> None:
    registry = Registry()
    seen: list[Any] = []

    @registry.handler
    async def open_account(cmd: OpenAccount, md: Metadata, scope: Scope) -> str:
        seen.extend([md, scope])
        return "ok"

    await Mediator(registry).send(OpenAccount("a"))
    md, scope = seen
    assert scope.metadata is md
    assert scope.parent is None


def test_dependency_cycle_is_found_at_build() -> None:
    def make_a(b: B) -> A:
        return A()

    def make_b(a: A) -> B:
        return B()

    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount, a: A) -> str:
        return ""

    deps = Dependencies()
    deps.scoped(A, make_a)
    deps.scoped(B, make_b)
    with pytest.raises(DependencyError, match="dependency cycle") as info:
        Mediator(registry, resolver=deps)
    assert "A -> " in str(info.value)
    assert info.value.handler is open_account


def test_unresolvable_factory_parameter_is_found_at_build() -> None:
    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount, session: Session) -> str:
        return ""

    deps = Dependencies()
    deps.scoped(Session, Session)  # needs Config, which nobody provides
    with pytest.raises(DependencyError, match="no provider for") as info:
        Mediator(registry, resolver=deps)
    assert info.value.dependency is Session
    assert "Config" in str(info.value)


def test_factory_annotation_errors() -> None:
    def unannotated(config):  # type: ignore[no-untyped-def]
        return Session(config)

    def unresolvable(config: "Missing") -> Session:  # type: ignore[name-defined]  # noqa: F821
        return Session(config)

    for factory, text in ((unannotated, "has no annotation"), (unresolvable, "cannot be resolved")):
        registry = Registry()

        @registry.handler
        async def open_account(cmd: OpenAccount, session: Session) -> str:
            return ""

        deps = Dependencies()
        deps.scoped(Session, factory)
        with pytest.raises(DependencyError, match=text):
            Mediator(registry, resolver=deps)


async def test_resolvers_are_asked_in_order() -> None:
    class Fallback:
        def provider(self, dependency: Any, lookup: Any) -> Provider | None:
            if dependency is Config:
                return Provider.singleton(Config("fallback"))
            return None

    first = Dependencies()
    first.singleton(Config, Config("first"))
    registry = Registry()

    @registry.handler
    async def open_account(cmd: OpenAccount, config: Config) -> str:
        return config.dsn

    assert await Mediator(registry, resolver=[first, Fallback()]).send(OpenAccount("a")) == "first"
    assert await Mediator(registry, resolver=[Fallback(), first]).send(OpenAccount("a")) == (
        "fallback"
    )
    assert await Mediator(registry, resolver=Fallback()).send(OpenAccount("a")) == "fallback"


async def test_outer_sync_scope_closes_its_callbacks() -> None:
    registry = Registry()
    mediator = Mediator(registry)
    closed: list[BaseException | None] = []
    with mediator.scope() as scope:
        scope.on_exit(closed.append)
    assert closed == [None]

    def fail_inside() -> None:
        with mediator.scope() as scope:
            scope.on_exit(closed.append)
            raise KeyError("x")

    with pytest.raises(KeyError):
        fail_inside()
    assert isinstance(closed[1], KeyError)
