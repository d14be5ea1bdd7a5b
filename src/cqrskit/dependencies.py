"""Dependency resolution: the resolver port, the per-dispatch scope and a built-in container.

Handler and behavior parameters after the message are resolved *by type* when the mediator
is built: each type is turned into a :class:`Provider` once, so no signature is inspected
per call. Two lifetimes exist:

* **singleton** — one value for the mediator's life;
* **scoped** — created at most once per dispatch, shared by the handler and the behaviors of
  that dispatch, and closed when the dispatch ends (on error too).

A factory may be a plain function, an ``async def``, or a (sync or async) generator that
yields the value and cleans up after the ``yield``; its own parameters are resolved by type.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import typing
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol, TypeVar

from cqrskit.errors import DependencyError, describe
from cqrskit.messages import Metadata, _metadata_of

__all__ = ["Dependencies", "Provider", "Resolver", "Scope"]

T = TypeVar("T")
_log = logging.getLogger("cqrskit.dependencies")
_MISSING: Any = object()


class _Key:
    """A private mapping key of :class:`Scope` (never equal to a user's type)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<scope key {self.name}>"


EXITS: Any = _Key("exits")
ASYNC_EXITS: Any = _Key("async exits")
Lookup = Callable[[Any], "Provider"]


class Scope(dict[Any, Any]):
    """State of one dispatch: cached scoped values and the cleanups to run at its end.

    The scope *is* the mapping of scoped values created so far (keyed by their type: read
    them with ``scope[SomeType]`` / ``scope.get(SomeType)``), so creating one per dispatch
    costs no more than an empty dict.

    Attributes:
        metadata: the dispatch's :class:`~cqrskit.messages.Metadata` (created lazily).
        parent: the scope of the dispatch that caused this one, if nested.
        extras: free slots for integrations (e.g. a DI container's request scope).
    """

    # slots, not the instance dict: setting the metadata would create that dict per
    # dispatch (a scope made with dict.__new__ sets all three itself, see _dispatch)
    __slots__ = ("parent", "_metadata", "_extras", "__dict__", "__weakref__")

    parent: Scope | None
    _metadata: Metadata | None
    _extras: dict[str, Any] | None

    def __init__(self, parent: Scope | None = None) -> None:
        self.parent = parent
        self._metadata = None
        self._extras = None

    def __repr__(self) -> str:
        return f"<Scope values={list(self)!r} parent={self.parent is not None}>"

    @property
    def extras(self) -> dict[str, Any]:
        """Free slots for integrations (e.g. a DI container's request scope)."""
        extras = self._extras
        if extras is None:
            extras = self._extras = {}
        return extras

    @property
    def metadata(self) -> Metadata:
        """The metadata of this dispatch, created on first access."""
        md = self._metadata
        if md is None:
            parent = self.parent.metadata if self.parent is not None else None
            md = self._metadata = _metadata_of(parent)
        return md

    @metadata.setter
    def metadata(self, value: Metadata) -> None:
        self._metadata = value

    def on_exit(self, callback: Callable[[BaseException | None], Any]) -> None:
        """Run ``callback(error_or_None)`` when the dispatch ends; it may be async."""
        self.on_exit_sync(callback)
        self[ASYNC_EXITS] = True

    def on_exit_sync(self, callback: Callable[[BaseException | None], None]) -> None:
        """Like :meth:`on_exit` for a callback known to be synchronous, which lets an async
        dispatch close its scope without an extra coroutine."""
        # Exit callbacks live in the mapping under private keys: no per-instance __dict__.
        exits = self.get(EXITS)
        if exits is None:
            self[EXITS] = [callback]
        else:
            exits.append(callback)

    def _take_exits(self) -> list[Callable[[BaseException | None], Any]] | None:
        exits: list[Callable[[BaseException | None], Any]] | None = self.pop(EXITS, None)
        self.pop(ASYNC_EXITS, None)
        return exits

    async def aclose(self, error: BaseException | None = None) -> None:
        """Run the exit callbacks, last registered first. Errors of cleanups propagate
        after every callback has run (the first one wins)."""
        exits = self._take_exits()
        if not exits:
            return
        first: BaseException | None = None
        for callback in reversed(exits):
            try:
                result = callback(error)
                if result is not None and inspect.isawaitable(result):
                    await result
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                if first is None:
                    first = exc
        _raise_cleanup_error(first, error)

    def close_sync(self, error: BaseException | None = None) -> None:
        """Synchronous twin of :meth:`aclose` for the sync mediator."""
        exits = self._take_exits()
        if not exits:
            return
        first: BaseException | None = None
        for callback in reversed(exits):
            try:
                callback(error)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                if first is None:
                    first = exc
        _raise_cleanup_error(first, error)


scope_var: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "cqrskit_scope", default=None
)
"""The scope of the dispatch running in this context: set by the dispatch plans
(``cqrskit._dispatch``), read by :func:`cqrskit.mediator.current_scope` and by behaviors
below the mediator (the authorization behavior notes its principal there)."""


def _raise_cleanup_error(first: BaseException | None, error: BaseException | None) -> None:
    """After every exit callback ran: raise the first cleanup failure — unless the dispatch
    already failed, in which case that error (or cancellation) must reach the caller
    unchanged; the cleanup failure is logged and noted on it instead."""
    if first is None or first is error:
        return
    if error is None:
        raise first
    _log.error("a scoped dependency's cleanup failed after an error: %r", first, exc_info=first)
    error.add_note(f"cqrskit: a scoped dependency's cleanup also failed: {first!r}")


@dataclass(frozen=True, slots=True)
class Provider:
    """How to obtain one dependency, decided once at build time.

    Attributes:
        lifetime: ``"singleton"`` (``value`` is the object) or ``"scoped"`` (``get(scope)``
            returns the object, or an awaitable of it when ``is_async``).
        value: the singleton object.
        get: the scoped getter.
        is_async: ``get`` returns an awaitable.
        factory: for a scoped value made by a plain call with no arguments and no cleanup,
            that callable; lets a plan that has a single consumer of it skip the scope.
    """

    lifetime: Literal["singleton", "scoped"]
    value: Any = None
    get: Callable[[Scope], Any] | None = None
    is_async: bool = False
    factory: Callable[[], Any] | None = None

    @staticmethod
    def singleton(value: Any) -> Provider:
        """A provider that always gives ``value``."""
        return Provider("singleton", value=value)

    @staticmethod
    def scoped(
        get: Callable[[Scope], Any],
        *,
        is_async: bool = False,
        factory: Callable[[], Any] | None = None,
    ) -> Provider:
        """A provider computed per dispatch by ``get(scope)``."""
        return Provider("scoped", get=get, is_async=is_async, factory=factory)


class Resolver(Protocol):
    """The port a DI container implements to feed handler parameters."""

    def provider(self, dependency: Any, lookup: Lookup) -> Provider | None:
        """Return how to obtain ``dependency``, or ``None`` if this resolver does not know it.

        Called once per (handler, parameter) when the mediator is built. ``lookup`` resolves
        a further type through the whole resolver chain (for factories with parameters) and
        raises :class:`~cqrskit.errors.DependencyError` when nothing can.
        """
        ...


def _factory_params(factory: Callable[..., Any]) -> list[tuple[str, Any]]:
    # a class's own annotations describe its attributes; its parameters are __init__'s
    annotated = factory.__init__ if isinstance(factory, type) else factory  # type: ignore[misc]
    try:
        hints = typing.get_type_hints(annotated)
    except NameError as exc:
        raise DependencyError(
            f"factory {describe(factory)} has an annotation that cannot be resolved: {exc}.",
            hint="make every type in the factory signature importable at module level.",
        ) from exc
    out: list[tuple[str, Any]] = []
    for p in inspect.signature(factory).parameters.values():
        if p.default is not inspect.Parameter.empty:
            continue
        if p.name not in hints:
            raise DependencyError(
                f"factory {describe(factory)}: parameter {p.name!r} has no annotation.",
                hint="annotate every factory parameter with the type to inject.",
            )
        out.append((p.name, hints[p.name]))
    return out


class Dependencies:
    """The built-in resolver: register singletons and per-dispatch (scoped) factories.

    Example::

        deps = Dependencies()
        deps.singleton(Clock, SystemClock())
        deps.scoped(Session, open_session)      # def open_session(db: Database) -> Iterator[...]

        mediator = Mediator(registry, resolver=deps)
    """

    def __init__(self) -> None:
        self._singletons: dict[Any, Any] = {}
        self._factories: dict[Any, Callable[..., Any]] = {}

    def singleton(self, dependency: type[T] | Any, value: T) -> None:
        """Provide ``value`` for every parameter annotated ``dependency``."""
        self._singletons[dependency] = value

    def scoped(self, dependency: type[T] | Any, factory: Callable[..., Any]) -> None:
        """Create ``dependency`` once per dispatch with ``factory`` (params resolved by type).

        ``factory`` may be sync, async, or a (sync or async) generator whose code after the
        ``yield`` runs when the dispatch ends; the exception that ended it, if any, is thrown
        in at the ``yield``.
        """
        self._factories[dependency] = factory

    def __contains__(self, dependency: object) -> bool:
        return dependency in self._singletons or dependency in self._factories

    def provider(self, dependency: Any, lookup: Lookup) -> Provider | None:
        """See :meth:`Resolver.provider`."""
        if dependency in self._singletons:
            return Provider.singleton(self._singletons[dependency])
        factory = self._factories.get(dependency)
        if factory is None:
            return None
        return compile_factory(dependency, factory, lookup)


def _close_generator(
    gen: Generator[Any, None, None], factory: object, error: BaseException | None
) -> None:
    """Finish a generator factory: resume it after its ``yield`` (or throw ``error`` in)."""
    if error is None:
        if next(gen, _MISSING) is _MISSING:
            return
        raise DependencyError(f"factory {describe(factory)} yielded twice.")
    try:
        gen.throw(error)
    except StopIteration:
        return
    except BaseException as exc:
        if exc is error:
            return
        raise


def compile_factory(key: Any, factory: Callable[..., Any], lookup: Lookup) -> Provider:
    """Turn a factory into a caching scoped :class:`Provider` (used by resolvers)."""
    subs = [lookup(tp) for _, tp in _factory_params(factory)]
    names = [name for name, _ in _factory_params(factory)]
    any_async = any(p.is_async for p in subs)
    is_gen = inspect.isgeneratorfunction(factory)
    is_agen = inspect.isasyncgenfunction(factory)
    is_coro = inspect.iscoroutinefunction(factory)

    def resolve_sync(scope: Scope) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, prov in zip(names, subs):  # noqa: B905 - same length by construction
            out[name] = prov.value if prov.lifetime == "singleton" else prov.get(scope)  # type: ignore[misc]
        return out

    async def resolve_async(scope: Scope) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, prov in zip(names, subs):  # noqa: B905 - same length by construction
            if prov.lifetime == "singleton":
                out[name] = prov.value
            else:
                value = prov.get(scope)  # type: ignore[misc]
                out[name] = (await value) if prov.is_async else value
        return out

    def finish_gen(gen: Generator[Any, None, None], scope: Scope) -> Any:
        value = next(gen)
        scope.on_exit_sync(partial(_close_generator, gen, factory))
        return value

    async def finish_agen(agen: AsyncGenerator[Any, None], scope: Scope) -> Any:
        value = await agen.__anext__()

        async def close(error: BaseException | None) -> None:
            if error is None:
                try:
                    await agen.__anext__()
                except StopAsyncIteration:
                    return
                raise DependencyError(f"factory {describe(factory)} yielded twice.")
            try:
                await agen.athrow(error)
            except StopAsyncIteration:
                return
            except BaseException as exc:
                if exc is error:
                    return
                raise

        scope.on_exit(close)
        return value

    if is_gen and not subs:

        def get_generated(scope: Scope) -> Any:
            cached = scope.get(key, _MISSING)
            if cached is not _MISSING:
                return cached
            gen = factory()
            value = scope[key] = next(gen)
            scope.on_exit_sync(partial(_close_generator, gen, factory))
            return value

        return Provider.scoped(get_generated)

    if not any_async and not is_agen and not is_coro:
        if not subs and not is_gen:

            def get(scope: Scope) -> Any:
                values = scope
                value = values.get(key, _MISSING)
                if value is _MISSING:
                    value = values[key] = factory()
                return value

            return Provider.scoped(get, factory=factory)

        def get_sync(scope: Scope) -> Any:
            values = scope
            cached = values.get(key, _MISSING)
            if cached is not _MISSING:
                return cached
            result = factory(**resolve_sync(scope))
            if is_gen:
                result = finish_gen(result, scope)
            values[key] = result
            return result

        return Provider.scoped(get_sync)

    async def get_async(scope: Scope) -> Any:
        values = scope
        cached = values.get(key, _MISSING)
        if cached is not _MISSING:
            return cached
        kwargs = await resolve_async(scope) if any_async else resolve_sync(scope)
        if is_agen:
            result = await finish_agen(factory(**kwargs), scope)
        elif is_gen:
            result = finish_gen(factory(**kwargs), scope)
        elif is_coro:
            result = await factory(**kwargs)
        else:
            result = factory(**kwargs)
        values[key] = result
        return result

    return Provider.scoped(get_async, is_async=True)
