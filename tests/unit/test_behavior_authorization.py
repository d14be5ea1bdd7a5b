"""AuthorizationBehavior / SyncAuthorizationBehavior."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

import pytest

from cqrskit import (
    Command,
    Dependencies,
    Event,
    Mediator,
    NotAuthorizedError,
    Query,
    Registry,
)
from cqrskit.pipeline import (
    AuthorizationBehavior,
    SyncAuthorizationBehavior,
    allow_all,
    authenticated,
)


@dataclass(frozen=True, slots=True)
class User:
    name: str
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CloseAccount(Command[None]):
    account_id: str
    acting_as: str = ""  # a field the caller controls: must never grant anything


@dataclass(frozen=True, slots=True)
class CloseVipAccount(CloseAccount):
    pass


@dataclass(frozen=True, slots=True)
class GetBalance(Query[int]):
    account_id: str


@dataclass(frozen=True, slots=True)
class Unpoliced(Command[None]):
    pass


@dataclass(frozen=True, slots=True)
class AccountClosed(Event):
    account_id: str


current_user: contextvars.ContextVar[User | None] = contextvars.ContextVar("current_user")


def is_admin(user: User | None, message: object) -> bool:
    return user is not None and "admin" in user.roles


async def ok(message: Any) -> str:
    return "done"


def _behavior(strict: bool = True) -> AuthorizationBehavior:
    return AuthorizationBehavior(
        {CloseAccount: is_admin, GetBalance: authenticated},
        principal=current_user,
        strict=strict,
    )


async def test_policy_grants_and_denies_from_context_principal() -> None:
    behavior = _behavior()
    token = current_user.set(User("root", frozenset({"admin"})))
    try:
        assert await behavior(CloseAccount("a1"), ok) == "done"
    finally:
        current_user.reset(token)
    token = current_user.set(User("eve"))
    try:
        with pytest.raises(NotAuthorizedError) as info:
            await behavior(CloseAccount("a1", acting_as="root"), ok)
    finally:
        current_user.reset(token)
    assert info.value.message_type is CloseAccount
    assert "not authorized to dispatch CloseAccount" in str(info.value)


async def test_unset_context_means_anonymous() -> None:
    with pytest.raises(NotAuthorizedError):
        await _behavior()(GetBalance("a1"), ok)
    token = current_user.set(User("ada"))
    try:
        assert await _behavior()(GetBalance("a1"), ok) == "done"
    finally:
        current_user.reset(token)


async def test_strict_fails_closed_naming_type_and_fix() -> None:
    handled: list[object] = []

    async def handler(m: Any) -> None:
        handled.append(m)

    with pytest.raises(NotAuthorizedError) as info:
        await _behavior()(Unpoliced(), handler)
    assert handled == []
    assert info.value.message_type is Unpoliced
    text = str(info.value)
    assert "no authorization policy for Unpoliced" in text
    assert "policies={Unpoliced: policy}" in text
    assert "allow_all" in text


async def test_non_strict_lets_unpoliced_types_through_untouched() -> None:
    behavior = _behavior(strict=False)
    awaitable = ok(Unpoliced())
    assert behavior(Unpoliced(), lambda m: awaitable) is awaitable
    assert await awaitable == "done"
    with pytest.raises(NotAuthorizedError):  # policed types are still checked
        await behavior(CloseAccount("a"), ok)


async def test_base_class_policy_covers_subclasses_most_derived_wins() -> None:
    behavior = AuthorizationBehavior({CloseAccount: allow_all}, principal=lambda: None, strict=True)
    assert await behavior(CloseVipAccount("v"), ok) == "done"
    stricter = AuthorizationBehavior(
        {CloseAccount: allow_all, CloseVipAccount: is_admin}, principal=lambda: None
    )
    with pytest.raises(NotAuthorizedError):
        await stricter(CloseVipAccount("v"), ok)
    assert await stricter(CloseAccount("a"), ok) == "done"


async def test_events_pass_through_even_in_strict_mode() -> None:
    assert await _behavior()(AccountClosed("a"), ok) == "done"


async def test_async_policy_and_non_bool_verdicts_deny() -> None:
    async def async_policy(user: Any, message: CloseAccount) -> bool:
        return message.account_id == "mine"

    def forgot_return(user: Any, message: Any) -> None:
        pass

    def truthy(user: Any, message: Any) -> str:
        return "yes"

    behavior = AuthorizationBehavior(
        {CloseAccount: async_policy, GetBalance: forgot_return, Unpoliced: truthy},  # type: ignore[dict-item]
        principal=lambda: User("x"),
    )
    assert await behavior(CloseAccount("mine"), ok) == "done"
    with pytest.raises(NotAuthorizedError):
        await behavior(CloseAccount("yours"), ok)
    with pytest.raises(NotAuthorizedError, match="returned NoneType, not a bool"):
        await behavior(GetBalance("a"), ok)
    with pytest.raises(NotAuthorizedError, match="returned str"):
        await behavior(Unpoliced(), ok)


async def test_policy_exception_propagates_and_handler_does_not_run() -> None:
    def broken(user: Any, message: Any) -> bool:
        raise RuntimeError("policy store down")

    handled: list[object] = []

    async def handler(m: Any) -> None:
        handled.append(m)

    behavior = AuthorizationBehavior({CloseAccount: broken}, principal=lambda: None)
    with pytest.raises(RuntimeError, match="policy store down"):
        await behavior(CloseAccount("a"), handler)
    assert handled == []


def test_configuration_errors() -> None:
    with pytest.raises(TypeError, match="ContextVar"):
        AuthorizationBehavior({}, principal="user")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not callable"):
        AuthorizationBehavior({CloseAccount: True}, principal=lambda: None)  # type: ignore[dict-item]


async def test_through_a_mediator_with_the_principal_from_the_context() -> None:
    registry = Registry()
    closed: list[str] = []

    @registry.handler
    async def close(cmd: CloseAccount) -> None:
        closed.append(cmd.account_id)

    @registry.handler
    async def balance(q: GetBalance) -> int:
        return 10

    @registry.handler
    async def unpoliced(cmd: Unpoliced) -> None:
        pass

    mediator = Mediator(registry, behaviors=[_behavior()])
    token = current_user.set(User("root", frozenset({"admin"})))
    try:
        await mediator.send(CloseAccount("a1"))
        assert await mediator.ask(GetBalance("a1")) == 10
        with pytest.raises(NotAuthorizedError):
            await mediator.send(Unpoliced())
    finally:
        current_user.reset(token)
    with pytest.raises(NotAuthorizedError):
        await mediator.send(CloseAccount("a2"))
    assert closed == ["a1"]


class Principal:
    def __init__(self, user: User | None) -> None:
        self.user = user


request_user: contextvars.ContextVar[User | None] = contextvars.ContextVar(
    "request_user", default=None
)


def current_principal() -> Principal:
    return Principal(request_user.get())


async def test_principal_resolved_as_a_dependency_by_type() -> None:
    registry = Registry()

    @registry.handler
    async def close(cmd: CloseAccount) -> None:
        pass

    def admin_principal(p: Principal, message: object) -> bool:
        return p.user is not None and "admin" in p.user.roles

    deps = Dependencies()
    deps.scoped(Principal, current_principal)
    behavior = AuthorizationBehavior.resolving(Principal, {CloseAccount: admin_principal})
    mediator = Mediator(registry, behaviors=[behavior], resolver=deps)
    with pytest.raises(NotAuthorizedError):
        await mediator.send(CloseAccount("a"))
    token = request_user.set(User("root", frozenset({"admin"})))
    try:
        await mediator.send(CloseAccount("a"))
    finally:
        request_user.reset(token)


def test_sync_twin() -> None:
    behavior = SyncAuthorizationBehavior(
        {CloseAccount: is_admin, GetBalance: allow_all}, principal=current_user
    )
    assert behavior(GetBalance("a"), lambda m: 5) == 5
    with pytest.raises(NotAuthorizedError):
        behavior(CloseAccount("a"), lambda m: None)
    with pytest.raises(NotAuthorizedError, match="no authorization policy"):
        behavior(Unpoliced(), lambda m: None)
    assert behavior(AccountClosed("a"), lambda m: "event") == "event"

    async def async_policy(user: Any, message: Any) -> bool:
        return True

    mixed = SyncAuthorizationBehavior({CloseAccount: async_policy}, principal=lambda: None)
    with pytest.raises(NotAuthorizedError, match="is async"):
        mixed(CloseAccount("a"), lambda m: None)


def test_sync_resolving_principal_from_a_dependency() -> None:
    from cqrskit.sync import SyncMediator

    registry = Registry()

    @registry.handler
    def close(cmd: CloseAccount) -> None:
        pass

    def admin_principal(p: Principal, message: object) -> bool:
        return p.user is not None and "admin" in p.user.roles

    deps = Dependencies()
    deps.scoped(Principal, current_principal)
    behavior = SyncAuthorizationBehavior.resolving(Principal, {CloseAccount: admin_principal})
    mediator = SyncMediator(registry, behaviors=[behavior], resolver=deps)
    with pytest.raises(NotAuthorizedError):
        mediator.send(CloseAccount("a"))
    with pytest.raises(NotAuthorizedError, match="no authorization policy"):
        behavior(Unpoliced(), lambda m: None, Principal(None))
    token = request_user.set(User("root", frozenset({"admin"})))
    try:
        mediator.send(CloseAccount("a"))
    finally:
        request_user.reset(token)


async def test_authorize_with_an_explicit_principal() -> None:
    behavior = AuthorizationBehavior(
        {CloseAccount: is_admin, GetBalance: forbid_async}, principal=lambda: None
    )
    admin = User("root", frozenset({"admin"}))
    assert await behavior.authorize(CloseAccount("a"), ok, admin) == "done"
    assert await behavior.authorize(AccountClosed("a"), ok, None) == "done"  # events pass
    with pytest.raises(NotAuthorizedError, match="no authorization policy"):
        await behavior.authorize(Unpoliced(), ok, admin)
    with pytest.raises(NotAuthorizedError):
        await behavior.authorize(CloseAccount("a"), ok, User("eve"))
    with pytest.raises(NotAuthorizedError):
        await behavior.authorize(GetBalance("a"), ok, admin)


async def forbid_async(user: Any, message: Any) -> bool:
    return False
