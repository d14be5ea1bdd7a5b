"""Build-time analysis shared by the async and sync mediators.

Turns each handler and behavior into a :class:`Binding`: the callable plus one
:class:`~cqrskit.dependencies.Provider` per dependency parameter, resolved through the
resolver chain once. The compiler in :mod:`cqrskit._dispatch` turns bindings into plans.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cqrskit.dependencies import Provider, Resolver, Scope, compile_factory
from cqrskit.errors import (
    ConfigurationError,
    DependencyError,
    RegistrationError,
    describe,
)
from cqrskit.messages import Metadata, result_type
from cqrskit.pipeline._core import ScopedBehavior
from cqrskit.registry import HandlerSpec, Registry


@dataclass(frozen=True, slots=True)
class Binding:
    """A callable with its dependency providers, decided at build time."""

    func: Callable[..., Any]
    names: tuple[str, ...]
    providers: tuple[Provider, ...]
    instance: Provider | None = None  # handler classes: how to get ``self``

    @property
    def scoped(self) -> bool:
        """Whether any value must be produced per dispatch."""
        return any(p.lifetime == "scoped" for p in self.all_providers())

    @property
    def any_async(self) -> bool:
        """Whether any provider is asynchronous."""
        return any(p.is_async for p in self.all_providers())

    def all_providers(self) -> tuple[Provider, ...]:
        """Every provider, the instance's included."""
        return self.providers + ((self.instance,) if self.instance is not None else ())

    def singleton_kwargs(self) -> dict[str, Any]:
        """Keyword arguments when every provider is a singleton."""
        return {n: p.value for n, p in zip(self.names, self.providers, strict=True)}


class Planner:
    """Resolves parameter types through built-ins and the user's resolvers."""

    def __init__(self, mediator: object, resolvers: Sequence[Resolver]) -> None:
        self._resolvers = tuple(resolvers)
        self._builtins: dict[Any, Provider] = {
            Metadata: Provider.scoped(_get_metadata),
            Scope: Provider.scoped(_get_scope),
            type(mediator): Provider.singleton(mediator),
        }
        self._cache: dict[Any, Provider] = {}
        self._resolving: list[Any] = []

    def lookup(self, dependency: Any) -> Provider:
        """Provider for ``dependency``; raises DependencyError when none knows it."""
        cached = self._cache.get(dependency)
        if cached is not None:
            return cached
        builtin = self._builtins.get(dependency)
        if builtin is not None:
            return builtin
        if dependency in self._resolving:
            chain = " -> ".join(describe(t) for t in [*self._resolving, dependency])
            raise DependencyError(
                f"dependency cycle: {chain}.",
                dependency=dependency,
                hint="break the cycle by making one factory take a lazy accessor instead.",
            )
        self._resolving.append(dependency)
        try:
            for resolver in self._resolvers:
                provider = resolver.provider(dependency, self.lookup)
                if provider is not None:
                    self._cache[dependency] = provider
                    return provider
        finally:
            self._resolving.pop()
        raise DependencyError(
            f"no provider for {describe(dependency)}.",
            dependency=dependency,
            hint=(
                f"register it: deps.singleton({_short(dependency)}, instance) or "
                f"deps.scoped({_short(dependency)}, factory), and pass resolver=deps."
            ),
        )

    def _lookup_for(
        self, dependency: Any, name: str, owner: object, message_type: type | None
    ) -> Provider:
        try:
            return self.lookup(dependency)
        except DependencyError as exc:
            where = f"for {describe(message_type)} " if message_type is not None else ""
            raise DependencyError(
                f"{describe(owner)} {where}needs parameter {name!r}: {exc.text}",
                dependency=dependency,
                message_type=message_type,
                handler=owner,
                hint=exc.hint,
            ) from exc

    def bind_handler(self, spec: HandlerSpec) -> Binding:
        """Resolve a handler's parameters (and its class's ``__init__`` parameters)."""
        providers = tuple(
            self._lookup_for(tp, name, spec.owner, spec.message_type) for name, tp in spec.params
        )
        instance: Provider | None = None
        if spec.init_params is not None:
            cls = spec.owner
            init_providers = [
                self._lookup_for(tp, name, cls, spec.message_type) for name, tp in spec.init_params
            ]
            if all(p.lifetime == "singleton" for p in init_providers):
                kwargs = {
                    n: p.value for (n, _), p in zip(spec.init_params, init_providers, strict=True)
                }
                instance = Provider.singleton(cls(**kwargs))
            else:
                instance = compile_factory(("cqrskit.handler", cls), cls, self.lookup)
        return Binding(spec.func, tuple(n for n, _ in spec.params), providers, instance)

    def bind_behavior(self, behavior: Callable[..., Any], message_type: type) -> Binding:
        """Resolve a behavior's parameters after ``(message, next)``."""
        target = behavior
        if not (inspect.isfunction(behavior) or inspect.ismethod(behavior)):
            target = type(behavior).__call__
            skip = 1
        else:
            skip = 0
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError) as exc:
            raise RegistrationError(
                f"behavior {describe(behavior)} cannot be inspected.", handler=behavior
            ) from exc
        params = list(sig.parameters.values())[skip:]
        if len(params) < 2:
            raise RegistrationError(
                f"behavior {describe(behavior)} must accept (message, next).",
                handler=behavior,
                hint="write: async def my_behavior(message, next): return await next(message)",
            )
        extra = [p for p in params[2:] if p.default is inspect.Parameter.empty]
        if not extra:
            return Binding(behavior, (), ())
        hints = typing.get_type_hints(target)
        names: list[str] = []
        providers: list[Provider] = []
        for p in extra:
            if p.name not in hints:
                raise RegistrationError(
                    f"behavior {describe(behavior)}: parameter {p.name!r} has no annotation.",
                    handler=behavior,
                    hint="annotate dependency parameters with the type to inject.",
                )
            names.append(p.name)
            providers.append(self._lookup_for(hints[p.name], p.name, behavior, message_type))
        return Binding(behavior, tuple(names), tuple(providers))


def behaviors_for(
    behaviors: Sequence[Callable[..., Any] | ScopedBehavior], message_type: type
) -> list[Callable[..., Any]]:
    """The behaviors that apply to ``message_type``, outermost first."""
    out: list[Callable[..., Any]] = []
    for b in behaviors:
        if isinstance(b, ScopedBehavior):
            if b.applies(message_type):
                out.append(b.behavior)
        else:
            out.append(b)
    return out


declared_result = result_type  # the declared ``R``; public as cqrskit.messages.result_type


def check_result(spec: HandlerSpec) -> None:
    """Fail when a handler's return annotation plainly contradicts the message's ``R``."""
    declared = declared_result(spec.message_type)
    ret = spec.return_type
    if (
        isinstance(declared, type)
        and isinstance(ret, type)
        and not spec.is_generator
        and not issubclass(ret, declared)
        and declared is not object
    ):
        raise RegistrationError(
            f"handler {spec.name} returns {describe(ret)} but {describe(spec.message_type)} "
            f"declares result {describe(declared)}.",
            message_type=spec.message_type,
            handler=spec.owner,
            hint="make the handler's return annotation match the message's type parameter.",
        )


def _get_metadata(scope: Scope) -> Metadata:
    return scope.metadata


def _get_scope(scope: Scope) -> Scope:
    return scope


def _short(tp: Any) -> str:
    return getattr(tp, "__name__", repr(tp))


# -- build-time checks -----------------------------------------------------------------------


def check_expected(registry: Registry) -> None:
    """Fail when a command or query the registry expects has no handler."""
    missing = sorted(
        (t for t in registry.expected() if registry.handler_for(t) is None), key=describe
    )
    if missing:
        names = ", ".join(describe(t) for t in missing)
        raise ConfigurationError(
            f"no handler registered for: {names}.",
            message_type=missing[0],
            hint="register one with @registry.handler for each, or remove the message.",
        )
