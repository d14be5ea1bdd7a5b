"""``cqrskit.pipeline.recommended``: the order of the behaviors and its refusals."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import pytest

from cqrskit import (
    Command,
    ConcurrencyError,
    ConfigurationError,
    FieldError,
    Mediator,
    NotAuthorizedError,
    Registry,
    ValidationError,
)
from cqrskit.eventlog import InMemoryEventStore, UnitOfWork
from cqrskit.pipeline import (
    AuthorizationBehavior,
    RetryBehavior,
    TimeoutBehavior,
    ValidationBehavior,
    allow_all,
    recommended,
)


@dataclass(frozen=True)
class Bump(Command[int]):
    amount: int


registry = Registry()
calls: list[int] = []


@registry.handler
async def bump(cmd: Bump, uow: UnitOfWork) -> int:
    calls.append(cmd.amount)
    if len(calls) < 3:  # another writer won twice; the third attempt succeeds
        raise ConcurrencyError("stream moved on", stream="s")
    return cmd.amount


def positive(cmd: Bump) -> list[FieldError]:
    return [] if cmd.amount > 0 else [FieldError("amount", "must be positive")]


user: ContextVar[str | None] = ContextVar("user", default=None)


def test_the_order_is_authorization_validation_retry_transaction_timeout() -> None:
    store = InMemoryEventStore()
    behaviors = recommended(store, policies={Bump: allow_all}, principal=user, timeout=5.0)
    kinds = [type(b) for b in behaviors]
    assert kinds[:3] == [AuthorizationBehavior, ValidationBehavior, RetryBehavior]
    assert type(behaviors[4]) is TimeoutBehavior  # inside the transaction at [3]
    assert len(behaviors) == 5


def test_policies_must_be_given_and_need_a_principal() -> None:
    store = InMemoryEventStore()
    with pytest.raises(ConfigurationError, match="needs policies="):
        recommended(store)
    with pytest.raises(ConfigurationError, match="needs principal="):
        recommended(store, policies={Bump: allow_all})
    for bad in (0, -2):  # "no attempt at all" is not "no retry": a clear error
        with pytest.raises(ConfigurationError, match="attempts"):
            recommended(store, policies=None, attempts=bad)
    without = recommended(store, policies=None, attempts=1)
    assert [type(b) for b in without][:1] == [ValidationBehavior]
    assert not any(isinstance(b, RetryBehavior | AuthorizationBehavior) for b in without)


async def test_conflicts_are_retried_and_bad_input_is_not() -> None:
    store = InMemoryEventStore()
    mediator = Mediator(
        registry,
        behaviors=recommended(
            store,
            policies={Bump: lambda who, msg: who == "ada"},
            principal=user,
            validators={Bump: positive},
        ),
        resolver=store.resolver(),
    )
    calls.clear()
    token = user.set("ada")
    try:
        assert await mediator.send(Bump(5)) == 5
        assert calls == [5, 5, 5]
        calls.clear()
        with pytest.raises(ValidationError):
            await mediator.send(Bump(-1))
        assert calls == []
    finally:
        user.reset(token)
    with pytest.raises(NotAuthorizedError):
        await mediator.send(Bump(1))
    assert calls == []


@pytest.mark.parametrize("page", ["quickstart.md", "fastapi.md"])
def test_the_quickstart_and_the_fastapi_guide_build_services_with_it(page: str) -> None:
    """Every example there that dispatches to a store builds its pipeline with
    ``recommended(...)``: the pipeline a reader copies retries conflicts."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / page).read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    with_store = [b for b in blocks if "store.resolver()" in b]
    assert with_store, page
    for block in with_store:
        assert "behaviors=recommended(" in block, block[:300]
        assert "store.transaction()" not in block, block[:300]
