"""The Sync* twins through SyncMediator; async built-ins refused by it at build time."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dishka
import pytest
from dishka import make_async_container, make_container

from cqrskit import (
    Command,
    ConcurrencyError,
    DependencyError,
    FieldError,
    NotAuthorizedError,
    RegistrationError,
    Registry,
    ValidationError,
)
from cqrskit.dishka import DishkaResolver
from cqrskit.pipeline import (
    AuthorizationBehavior,
    LoggingBehavior,
    RetryBehavior,
    SyncAuthorizationBehavior,
    SyncLoggingBehavior,
    SyncRetryBehavior,
    SyncValidationBehavior,
    TimeoutBehavior,
    ValidationBehavior,
    allow_all,
    for_commands,
)
from cqrskit.sync import SyncMediator


@dataclass(frozen=True, slots=True)
class Deposit(Command[int]):
    amount: int


principal: contextvars.ContextVar[str | None] = contextvars.ContextVar("principal")


def _registry(failures: list[BaseException], calls: list[int]) -> Registry:
    registry = Registry()

    @registry.handler
    def deposit(cmd: Deposit) -> int:
        calls.append(cmd.amount)
        if failures:
            raise failures.pop(0)
        return cmd.amount

    return registry


def test_sync_twins_compose_in_a_sync_mediator(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tests.sync.twins")
    failures: list[BaseException] = [ConcurrencyError("stale")]
    calls: list[int] = []
    delays: list[float] = []
    mediator = SyncMediator(
        _registry(failures, calls),
        behaviors=[
            SyncLoggingBehavior("tests.sync.twins"),
            SyncAuthorizationBehavior(
                {Deposit: lambda p, m: p == "ada"}, principal=principal, strict=True
            ),
            SyncValidationBehavior(
                {Deposit: lambda m: [FieldError("amount", "positive")] if m.amount <= 0 else []}
            ),
            for_commands(SyncRetryBehavior(sleep=delays.append, random=lambda: 0.5)),
        ],
    )
    token = principal.set("ada")
    try:
        assert mediator.send(Deposit(5)) == 5
        assert calls == [5, 5]
        assert delays == [0.025]
        with pytest.raises(ValidationError):
            mediator.send(Deposit(0))
    finally:
        principal.reset(token)
    with pytest.raises(NotAuthorizedError):
        mediator.send(Deposit(1))
    assert calls == [5, 5]
    lines = [r.getMessage() for r in caplog.records if r.name == "tests.sync.twins"]
    assert lines[0] == "dispatch Deposit started"
    assert lines[1].startswith("dispatch Deposit ended")


@pytest.mark.parametrize(
    "behavior",
    [
        LoggingBehavior(),
        ValidationBehavior(),
        TimeoutBehavior(1.0),
        RetryBehavior(),
        AuthorizationBehavior({Deposit: allow_all}, principal=principal),
        for_commands(ValidationBehavior()),
    ],
    ids=["logging", "validation", "timeout", "retry", "authorization", "scoped"],
)
def test_sync_mediator_refuses_async_built_ins_at_build(behavior: Any) -> None:
    with pytest.raises(RegistrationError, match="is asynchronous"):
        SyncMediator(_registry([], []), behaviors=[behavior])


class Session:
    pass


def test_dishka_sync_container_with_the_sync_mediator() -> None:
    log: list[str] = []
    provider = dishka.Provider()

    def session() -> Iterator[Session]:
        log.append("open")
        yield Session()
        log.append("close")

    provider.provide(session, scope=dishka.Scope.REQUEST)
    container = make_container(provider)
    registry = Registry()

    @registry.handler
    def deposit(cmd: Deposit, s: Session) -> int:
        log.append("handle")
        return cmd.amount

    mediator = SyncMediator(registry, resolver=DishkaResolver(container))
    assert mediator.send(Deposit(3)) == 3
    assert log == ["open", "handle", "close"]
    container.close()


async def test_dishka_async_container_is_refused_by_the_sync_mediator() -> None:
    provider = dishka.Provider()
    provider.provide(Session, scope=dishka.Scope.REQUEST)
    container = make_async_container(provider)
    registry = Registry()

    @registry.handler
    def deposit(cmd: Deposit, s: Session) -> int:
        return cmd.amount

    with pytest.raises(DependencyError):
        SyncMediator(registry, resolver=DishkaResolver(container))
    await container.close()
