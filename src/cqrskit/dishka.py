"""dishka integration: resolve handler and behavior parameters from a dishka container.

:class:`DishkaResolver` implements the :class:`~cqrskit.dependencies.Resolver` port on top
of a dishka ``AsyncContainer`` (or a sync ``Container``). When the mediator is built, each
parameter type is looked up in the container's registries, so a type dishka does not
provide fails at build time with :class:`~cqrskit.errors.DependencyError` (or falls through
to the next resolver in the chain). Per dispatch, the resolver enters a child scope of the
container (``REQUEST`` by default) the first time a request-scoped value is asked for, and
closes it when the dispatch ends — on error too, with the error passed to dishka's
finalizers. Application-scoped values come from the root container, with no child scope
entered.

Install with ``pip install 'cqrskit[dishka]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cqrskit.dependencies import Lookup, Provider, Scope
from cqrskit.errors import DependencyError, MissingExtraError, describe

try:
    import dishka
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise MissingExtraError("dishka", "dishka") from exc

__all__ = ["DishkaResolver"]

_ContextFactory = Callable[[Scope], Mapping[Any, Any]]


class DishkaResolver:
    """A resolver that takes dependencies from a dishka container.

    Args:
        container: the root container (``make_async_container(...)`` or
            ``make_container(...)``).
        scope: the dishka scope entered once per dispatch; default: the next non-skipped
            scope below the container's (``Scope.REQUEST`` for a root container).
        context: ``context(scope) -> {type: value}`` passed to dishka when the per-dispatch
            scope is entered (for ``from_context`` providers), e.g.
            ``lambda s: {Metadata: s.metadata}``.

    Example::

        container = make_async_container(AppProvider())
        mediator = Mediator(registry, resolver=DishkaResolver(container))
    """

    __slots__ = ("_container", "_is_async", "_scope", "_context", "_key", "_levels")

    def __init__(
        self,
        container: dishka.AsyncContainer | dishka.Container,
        *,
        scope: dishka.BaseScope | None = None,
        context: _ContextFactory | None = None,
    ) -> None:
        if not isinstance(container, dishka.AsyncContainer | dishka.Container):
            raise TypeError(
                f"DishkaResolver needs a dishka AsyncContainer or Container, got {container!r}"
            )
        self._container = container
        self._is_async = isinstance(container, dishka.AsyncContainer)
        self._scope = scope
        self._context = context
        self._key = f"cqrskit.dishka:{id(self)}"
        self._levels = _registry_levels(container, scope)

    # -- the Resolver port ---------------------------------------------------------------

    def provider(self, dependency: Any, lookup: Lookup) -> Provider | None:
        """See :meth:`cqrskit.dependencies.Resolver.provider`.

        Returns ``None`` when the container provides no factory for ``dependency``.
        """
        found = self._level_of(dependency)
        if found is None:
            return None
        level, cached = found
        if level == "app":
            return self._app_provider(dependency, cached)
        return self._request_provider(dependency)

    # -- build-time analysis -------------------------------------------------------------

    def _level_of(self, dependency: Any) -> tuple[str, bool] | None:
        """``(level, cached)`` of the factory providing ``dependency``, ``None`` if none."""
        if self._levels is None:  # registries not inspectable: let dishka decide per call
            return "request", False
        key = dishka.DependencyKey(dependency, dishka.DEFAULT_COMPONENT)
        for level, registry in self._levels:
            factory = registry.get_factory(key)
            if factory is not None:
                if level == "deeper":
                    raise DependencyError(
                        f"{describe(dependency)} is provided in dishka scope "
                        f"{registry.scope}, deeper than the scope entered per dispatch.",
                        dependency=dependency,
                        hint=(
                            "provide it at the per-dispatch scope (Scope.REQUEST), or pass "
                            f"DishkaResolver(container, scope={registry.scope})."
                        ),
                    )
                return level, getattr(factory, "cache", False) is True
        return None

    def _app_provider(self, dependency: Any, cached: bool) -> Provider:
        container: Any = self._container
        # dishka caches an app-scoped value for the container's life; keeping our own copy
        # skips its lock and lookup on every dispatch after the first
        memo: list[Any] = []
        if self._is_async:

            async def get_app(scope: Scope) -> Any:
                if memo:
                    return memo[0]
                value = await container.get(dependency)
                if cached:
                    memo.append(value)
                return value

            return Provider.scoped(get_app, is_async=True)

        def get_app_sync(scope: Scope) -> Any:
            if memo:
                return memo[0]
            value = container.get(dependency)
            if cached:
                memo.append(value)
            return value

        return Provider.scoped(get_app_sync)

    def _request_provider(self, dependency: Any) -> Provider:
        key = self._key
        if self._is_async:
            enter = self._enter_async

            async def get(scope: Scope) -> Any:
                child = scope.extras.get(key)
                if child is None:
                    child = await enter(scope)
                return await child.get(dependency)

            return Provider.scoped(get, is_async=True)
        enter_sync = self._enter_sync

        def get_sync(scope: Scope) -> Any:
            child = scope.extras.get(key)
            if child is None:
                child = enter_sync(scope)
            return child.get(dependency)

        return Provider.scoped(get_sync)

    # -- per dispatch --------------------------------------------------------------------

    def _child(self, scope: Scope) -> Any:
        container: Any = self._container
        if self._context is None and self._scope is None:
            return container()
        args: dict[str, Any] = {}
        if self._context is not None:
            args["context"] = dict(self._context(scope))
        if self._scope is not None:
            args["scope"] = self._scope
        return container(**args)

    async def _enter_async(self, scope: Scope) -> Any:
        child = await self._child(scope).__aenter__()
        scope.extras[self._key] = child
        scope.on_exit(child.close)  # close(exception) runs dishka's finalizers with the error
        return child

    def _enter_sync(self, scope: Scope) -> Any:
        child = self._child(scope).__enter__()
        scope.extras[self._key] = child
        scope.on_exit(child.close)
        return child


def _registry_levels(
    container: dishka.AsyncContainer | dishka.Container, target: dishka.BaseScope | None
) -> list[tuple[str, Any]] | None:
    """``(level, registry)`` from the root down: ``"app"`` for the container's own scope,
    ``"request"`` down to the per-dispatch scope, ``"deeper"`` below it; ``None`` when this
    dishka version does not expose its registries."""
    registry = getattr(container, "registry", None)
    if registry is None or not hasattr(registry, "get_factory"):
        return None
    levels: list[tuple[str, Any]] = [("app", registry)]
    parent = getattr(container, "parent_container", None)
    while parent is not None:  # e.g. the skipped RUNTIME scope above APP
        levels.append(("app", parent.registry))
        parent = getattr(parent, "parent_container", None)
    child = getattr(registry, "child_registry", None)
    reached = False
    while child is not None:
        if reached:
            levels.append(("deeper", child))
        else:
            levels.append(("request", child))
            scope = child.scope
            if (target is None and not scope.skip) or scope is target:
                reached = True
        child = child.child_registry
    return levels
