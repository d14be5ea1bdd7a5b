"""Authorization behavior: a policy per command and query type; fail closed.

A policy is ``policy(principal, message) -> bool`` (or an awaitable of it). Only ``True``
grants: ``False``, ``None`` (a forgotten ``return``) or anything else denies with
:class:`~cqrskit.errors.NotAuthorizedError`, and so does an exception inside the policy
(it propagates). The principal comes from the caller's context — a
:class:`contextvars.ContextVar`, a zero-argument callable, or a dependency resolved by type
(:meth:`AuthorizationBehavior.resolving`) — never from message fields or headers, which the
caller controls.

In strict mode (the default) a command or query type without a policy is refused, so a
new message is unreachable until someone decides who may send it. Events pass through: they
are facts already authorized through the command that caused them. The policy for each
message type is looked up once (a policy for a base class covers its subclasses; the most
derived wins) and cached.

The principal a policy granted is recorded in the dispatch's scope
(:func:`authorized_principal`), so that behaviors further in — idempotency keys are scoped
to it — act for the same caller.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any

from cqrskit.dependencies import scope_var
from cqrskit.errors import ConfigurationError, NotAuthorizedError
from cqrskit.messages import Event
from cqrskit.pipeline._core import Next
from cqrskit.pipeline._support import SyncNext, failed, returns_awaitable, type_name

__all__ = [
    "AuthorizationBehavior",
    "Policy",
    "SyncAuthorizationBehavior",
    "allow_all",
    "authenticated",
    "authorized_principal",
]

Policy = Callable[[Any, Any], "bool | Awaitable[bool]"]
"""``policy(principal, message)``: ``True`` grants, anything else denies."""


def allow_all(principal: object, message: object) -> bool:
    """A policy that grants everyone, anonymous callers included (public queries)."""
    return True


def authenticated(principal: object, message: object) -> bool:
    """A policy that grants any caller with a principal (``principal is not None``)."""
    return principal is not None


_PRINCIPAL_KEY = "cqrskit.authorized_principal"
_current_scope = scope_var.get


def _record(principal: Any) -> None:
    """Note ``principal`` in the running dispatch's scope (read by :func:`authorized_principal`)."""
    scope = _current_scope()
    if scope is not None:
        scope[_PRINCIPAL_KEY] = principal


def authorized_principal(scope: Mapping[Any, Any] | None) -> tuple[bool, Any]:
    """``(True, principal)`` when an :class:`AuthorizationBehavior` granted the dispatch
    whose scope is ``scope`` (``principal`` may be ``None``: an anonymous caller a policy
    let through); ``(False, None)`` when no policy ran for it."""
    if scope is None or _PRINCIPAL_KEY not in scope:
        return False, None
    return True, scope[_PRINCIPAL_KEY]


class _Missing:
    __slots__ = ()


_MISSING = _Missing()
_PASS = None


def _principal_getter(principal: ContextVar[Any] | Callable[[], Any]) -> Callable[[], Any]:
    if isinstance(principal, ContextVar):
        var = principal

        def from_var() -> Any:
            return var.get(None)

        return from_var
    if not callable(principal):
        raise TypeError(
            "principal must be a contextvars.ContextVar or a zero-argument callable, "
            f"got {principal!r}"
        )
    return principal


class _AuthorizationConfig:
    __slots__ = ("_policies", "_strict", "_principal", "_plans")

    def __init__(
        self,
        policies: Mapping[type, Policy],
        *,
        principal: ContextVar[Any] | Callable[[], Any],
        strict: bool = True,
    ) -> None:
        for tp, policy in policies.items():
            if not callable(policy):
                raise TypeError(f"policy for {type_name(tp)} is not callable: {policy!r}")
            if isinstance(tp, type) and issubclass(tp, Event):
                # events pass through unchecked: such a policy would be silently ignored
                raise ConfigurationError(
                    f"an authorization policy is configured for the event type "
                    f"{type_name(tp)}; events are not authorized (they are facts, already "
                    "authorized through the command that recorded them), so it would never run.",
                    message_type=tp,
                    hint="remove it and put the policy on the command (or query) whose handler "
                    "records or reads this event.",
                )
        self._policies = dict(policies)
        self._strict = strict
        self._principal = _principal_getter(principal)
        self._plans: dict[type, Policy | _Missing | None] = {}

    def policy_for(self, message_type: type) -> Policy | None:
        """The policy that governs ``message_type``, or ``None`` when there is none."""
        for cls in message_type.__mro__:
            policy = self._policies.get(cls)
            if policy is not None:
                return policy
        return None

    def _plan_for(self, message_type: type) -> Policy | _Missing | None:
        plan: Policy | _Missing | None
        if issubclass(message_type, Event):
            plan = _PASS
        else:
            plan = self.policy_for(message_type)
            if plan is None and self._strict:
                plan = _MISSING
        self._plans[message_type] = plan
        return plan

    def _plan(self, message_type: type) -> Policy | _Missing | None:
        try:
            return self._plans[message_type]
        except KeyError:
            return self._plan_for(message_type)

    @staticmethod
    def _missing(message_type: type) -> NotAuthorizedError:
        name = type_name(message_type)
        return NotAuthorizedError(
            f"no authorization policy for {name}; strict mode refuses it.",
            message_type=message_type,
            hint=(
                f"add one: policies={{{message_type.__name__}: policy}} (use "
                "cqrskit.pipeline.allow_all for public messages), or strict=False to let "
                "types without a policy through."
            ),
        )

    @staticmethod
    def _denied(message_type: type, verdict: object) -> NotAuthorizedError:
        hint = None
        if verdict is not False:
            hint = f"the policy returned {type(verdict).__name__}, not a bool; only True grants."
        return NotAuthorizedError(
            f"not authorized to dispatch {type_name(message_type)}.",
            message_type=message_type,
            hint=hint,
        )


class AuthorizationBehavior(_AuthorizationConfig):
    """Check the caller's principal against the message type's policy before the handler.

    Args:
        policies: ``{message type: policy}``; a policy for a base class covers subclasses.
        principal: where the caller's principal comes from: a ``ContextVar`` (unset means
            ``None``, anonymous) or a zero-argument callable.
        strict: refuse command and query types that have no policy (default ``True``).

    Raises:
        ConfigurationError: (when built) a policy is given for an event type.

    Raises (at dispatch):
        NotAuthorizedError: the policy denied, or strict mode found no policy.
    """

    __slots__ = ()

    @returns_awaitable
    def __call__(self, message: Any, next: Next) -> Awaitable[Any]:
        """Authorize ``message``, then continue with ``next(message)``."""
        try:
            policy = self._plans[message.__class__]
        except KeyError:
            policy = self._plan_for(message.__class__)
        if policy is None:
            return next(message)
        if policy.__class__ is _Missing:
            return failed(self._missing(message.__class__))
        principal = self._principal()
        verdict = policy(principal, message)  # type: ignore[operator]
        if verdict is True:
            _record(principal)
            return next(message)
        if inspect.isawaitable(verdict):
            return self._awaiting(verdict, message, next, principal)
        return failed(self._denied(message.__class__, verdict))

    def authorize(self, message: Any, next: Next, principal: Any) -> Awaitable[Any]:
        """Authorize ``message`` for an explicitly given ``principal``, then run ``next``."""
        cls = message.__class__
        policy = self._plan(cls)
        if policy is None:
            return next(message)
        if isinstance(policy, _Missing):
            return failed(self._missing(cls))
        verdict = policy(principal, message)
        if verdict is True:
            _record(principal)
            return next(message)
        if inspect.isawaitable(verdict):
            return self._awaiting(verdict, message, next, principal)
        return failed(self._denied(cls, verdict))

    async def _awaiting(
        self, verdict: Awaitable[Any], message: Any, next: Next, principal: Any
    ) -> Any:
        decided = await verdict
        if decided is not True:
            raise self._denied(message.__class__, decided)
        _record(principal)
        return await next(message)

    @classmethod
    def resolving(
        cls,
        principal_type: Any,
        policies: Mapping[type, Policy],
        *,
        strict: bool = True,
    ) -> Callable[..., Awaitable[Any]]:
        """A behavior that receives the principal as a dependency of type ``principal_type``.

        The mediator resolves ``principal_type`` through its resolvers like any handler
        parameter (e.g. ``deps.scoped(Principal, current_principal)``).
        """
        checker = cls(policies, principal=_no_principal, strict=strict)

        async def authorization(message: Any, next: Next, principal: Any) -> Any:
            return await checker.authorize(message, next, principal)

        authorization.__annotations__ = {"principal": principal_type}
        authorization.__qualname__ = f"AuthorizationBehavior.resolving({type_name(principal_type)})"
        return authorization


def _no_principal() -> None:
    return None


class SyncAuthorizationBehavior(_AuthorizationConfig):
    """The sync mediator's twin of :class:`AuthorizationBehavior`; policies must be sync."""

    __slots__ = ()

    def __call__(self, message: Any, next: SyncNext) -> Any:
        """Authorize ``message``, then continue with ``next(message)``."""
        try:
            policy = self._plans[message.__class__]
        except KeyError:
            policy = self._plan_for(message.__class__)
        if policy is None:
            return next(message)
        return self.authorize(message, next, self._principal())

    def authorize(self, message: Any, next: SyncNext, principal: Any) -> Any:
        """Authorize ``message`` for an explicitly given ``principal``, then run ``next``."""
        cls = message.__class__
        policy = self._plan(cls)
        if policy is None:
            return next(message)
        if isinstance(policy, _Missing):
            raise self._missing(cls)
        verdict = policy(principal, message)
        if verdict is True:
            return next(message)
        if inspect.isawaitable(verdict):
            close = getattr(verdict, "close", None)
            if close is not None:
                close()  # never awaited by design: free it quietly
            raise NotAuthorizedError(
                f"the policy for {type_name(cls)} is async, which the sync mediator cannot await.",
                message_type=cls,
                hint="make the policy a plain def for SyncAuthorizationBehavior.",
            )
        raise self._denied(cls, verdict)

    @classmethod
    def resolving(
        cls,
        principal_type: Any,
        policies: Mapping[type, Policy],
        *,
        strict: bool = True,
    ) -> Callable[..., Any]:
        """The sync twin of :meth:`AuthorizationBehavior.resolving`."""
        checker = cls(policies, principal=_no_principal, strict=strict)

        def authorization(message: Any, next: SyncNext, principal: Any) -> Any:
            return checker.authorize(message, next, principal)

        authorization.__annotations__ = {"principal": principal_type}
        authorization.__qualname__ = (
            f"SyncAuthorizationBehavior.resolving({type_name(principal_type)})"
        )
        return authorization
