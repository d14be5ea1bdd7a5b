"""The shapes a plan is built from: handler calls and behavior folds, for both flavours.

Each shape is a closure made once per message type at build time. The general shapes
(:func:`handler_call_scoped` and :func:`fold_scoped`, under a scope wrapper) can run every
handler and behavior; the others are fast paths, each for the case its docstring names.
Nothing here awaits, except the shapes for dependencies made by async factories, which only
the async flavour reaches (the sync mediator refuses such factories at build time).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from types import MethodType
from typing import Any

from cqrskit._dispatch.flavours import Flavour, Plan, ScopedCall
from cqrskit._plan import Binding, _get_scope
from cqrskit.dependencies import Provider, Scope
from cqrskit.registry import HandlerSpec

__all__ = [
    "direct_factories",
    "fast_callable",
    "fold_plain",
    "fold_scoped",
    "handler_call",
    "handler_call_scoped",
]

# -- handler calls -------------------------------------------------------------------------


def handler_call(spec: HandlerSpec, binding: Binding, flavour: Flavour) -> Plan:
    """Fast path — nothing in the handler is per dispatch: its singletons (and the instance
    of a handler class) are bound once, and the plan is the handler itself when it returns
    what a plan returns."""
    func: Callable[..., Any] = spec.func
    if binding.instance is not None:
        func = partial(func, binding.instance.value)
    kwargs = binding.singleton_kwargs()
    if kwargs:
        func = partial(func, **kwargs)
    return flavour.adapt_one(spec, func)


def direct_factories(spec: HandlerSpec, binding: Binding, flavour: Flavour) -> Plan | None:
    """Fast path — every scoped parameter is a plain no-argument factory and no behavior
    takes dependencies: a plan without a scope, or ``None`` when this does not apply.

    Such a value is created for this dispatch and seen by the handler alone, so no cache
    and no cleanup are needed: the factory is called inline.
    """
    scoped = [p for p in binding.providers if p.lifetime == "scoped"]
    if (
        not scoped
        or binding.instance is not None
        or not flavour.native(spec)
        or spec.is_generator
        or any(p.factory is None for p in scoped)
        or len({id(p) for p in scoped}) != len(scoped)
    ):
        return None
    func = spec.func
    if len(binding.providers) == 1 and _second_positional(func, binding.names[0]):
        factory = scoped[0].factory
        assert factory is not None

        def call_one(message: Any) -> Any:
            return func(message, factory())

        return call_one
    fixed = {
        n: p.value
        for n, p in zip(binding.names, binding.providers, strict=True)
        if p.lifetime == "singleton"
    }
    made = tuple(
        (n, p.factory)
        for n, p in zip(binding.names, binding.providers, strict=True)
        if p.lifetime == "scoped"
    )

    def call(message: Any) -> Any:
        kwargs = dict(fixed)
        for name, make in made:
            kwargs[name] = make()  # type: ignore[misc]
        return func(message, **kwargs)

    return call


def handler_call_scoped(spec: HandlerSpec, binding: Binding, flavour: Flavour) -> ScopedCall:
    """The general handler call, ``call(scope, message)``: any handler, any dependencies
    (singletons bound, scoped ones fetched from the scope per call)."""
    func = spec.func
    inst = binding.instance
    providers = binding.providers
    if (
        inst is None
        and len(providers) == 1
        and providers[0].lifetime == "scoped"
        and not providers[0].is_async
        and flavour.native(spec)
    ):
        # Fast path — the common case of one scoped dependency made by a plain factory: no
        # dictionary of keyword arguments, no wrapper.
        name = binding.names[0]
        get = providers[0].get
        assert get is not None
        if _second_positional(func, name):

            def call_positional(scope: Scope, message: Any) -> Any:
                return func(message, get(scope))

            return call_positional

        def call_one(scope: Scope, message: Any) -> Any:
            return func(message, **{name: get(scope)})

        return call_one

    call = flavour.adapt(spec, func)
    items = tuple(zip(binding.names, providers, strict=True))
    if binding.any_async:
        return _handler_call_awaiting(call, items, inst)

    def call_scoped(scope: Scope, message: Any) -> Any:
        kwargs = {
            name: (p.value if p.lifetime == "singleton" else p.get(scope))  # type: ignore[misc]
            for name, p in items
        }
        if inst is None:
            return call(message, **kwargs)
        obj = inst.value if inst.lifetime == "singleton" else inst.get(scope)  # type: ignore[misc]
        return call(obj, message, **kwargs)

    return call_scoped


def _handler_call_awaiting(
    call: Callable[..., Any],
    items: tuple[tuple[str, Provider], ...],
    inst: Provider | None,
) -> ScopedCall:
    """:func:`handler_call_scoped` when a dependency (or the handler class's instance) is
    made by an async factory; the async flavour only."""

    async def call_scoped(scope: Scope, message: Any) -> Any:
        kwargs = await _resolve_awaiting(items, scope)
        if inst is None:
            return await call(message, **kwargs)
        obj = inst.value if inst.lifetime == "singleton" else inst.get(scope)  # type: ignore[misc]
        if inst.is_async:
            obj = await obj
        return await call(obj, message, **kwargs)

    return call_scoped


def _second_positional(func: Callable[..., Any], name: str) -> bool:
    """Whether ``name`` is the positional parameter right after the message."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False
    return (
        len(params) >= 2
        and params[1].name == name
        and params[1].kind in (params[1].POSITIONAL_ONLY, params[1].POSITIONAL_OR_KEYWORD)
    )


# -- behavior folds ------------------------------------------------------------------------


def fast_callable(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """An instance whose class defines ``__call__`` in Python is called through its bound
    method: CPython specializes that call, while calling the instance does not (~2x)."""
    call = inspect.getattr_static(type(behavior), "__call__", None)
    if inspect.isfunction(call) and not inspect.isfunction(behavior):
        return MethodType(call, behavior)
    return behavior


def fold_plain(b: Binding, inner: Plan) -> Plan:
    """Fast path — no scope: ``behavior(message, inner)``, singleton dependencies bound
    once."""
    behavior = fast_callable(b.func)
    if b.providers:
        behavior = partial(behavior, **b.singleton_kwargs())

    def step(message: Any) -> Any:
        return behavior(message, inner)

    return step


def fold_scoped(b: Binding, inner: ScopedCall) -> ScopedCall:
    """The general fold, ``step(scope, message)``: the behavior gets a ``next`` that carries
    the scope on (``partial(inner, scope)``: the scope comes first so that no frame is needed
    to put it after the message), and its dependencies (scoped ones from the scope, per
    call)."""
    behavior = fast_callable(b.func)
    if not b.providers:

        def step(scope: Scope, message: Any) -> Any:
            return behavior(message, partial(inner, scope))

        return step
    if any(p.is_async for p in b.providers):
        return _fold_awaiting(behavior, b, inner)
    return _fold_direct(behavior, b, inner)


def _fold_direct(behavior: Callable[..., Any], b: Binding, inner: ScopedCall) -> ScopedCall:
    """:func:`fold_scoped` for dependencies made synchronously: one generated ``step`` that
    passes them as keyword arguments of its one call — singletons as constants, the
    dispatch's own scope as it is, other scoped values from their getters.

    A ``partial`` holding the singletons and a dictionary of the scoped values, merged at
    every call, cost ~2.5k instructions per dispatch more (callgrind). The source holds
    fixed text, the behavior's parameter names (identifiers, from its signature) and
    indices.
    """
    namespace: dict[str, Any] = {
        "_behavior": behavior,
        "_partial": partial,
        "_inner": inner,
    }
    kwargs: list[str] = []
    for i, (name, p) in enumerate(zip(b.names, b.providers, strict=True)):
        if p.lifetime == "singleton":
            namespace[f"_v{i}"] = p.value
            kwargs.append(f"{name}=_v{i}")
        elif p.get is _get_scope:
            kwargs.append(f"{name}=scope")
        else:
            namespace[f"_g{i}"] = p.get
            kwargs.append(f"{name}=_g{i}(scope)")
    source = (
        "def step(scope, message):\n"
        "    return _behavior(message, _partial(_inner, scope), "
        f"{', '.join(kwargs)})\n"
    )
    exec(compile(source, "<cqrskit behavior step>", "exec"), namespace)
    step: ScopedCall = namespace["step"]
    return step


def _fold_awaiting(behavior: Callable[..., Any], b: Binding, inner: ScopedCall) -> ScopedCall:
    """:func:`fold_scoped` when a dependency is made by an async factory; the async flavour
    only."""
    items = tuple(zip(b.names, b.providers, strict=True))

    async def step(scope: Scope, message: Any) -> Any:
        kwargs = await _resolve_awaiting(items, scope)
        return await behavior(message, partial(inner, scope), **kwargs)

    return step


async def _resolve_awaiting(
    items: tuple[tuple[str, Provider], ...], scope: Scope
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name, p in items:
        if p.lifetime == "singleton":
            kwargs[name] = p.value
        elif p.is_async:
            kwargs[name] = await p.get(scope)  # type: ignore[misc]
        else:
            kwargs[name] = p.get(scope)  # type: ignore[misc]
    return kwargs
