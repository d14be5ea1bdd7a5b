"""What differs between the async and the sync dispatch, and nothing else.

A plan of the async flavour returns an awaitable of the handler's result; a plan of the
sync flavour returns the result. Two kinds of code depend on that:

* **adapters**, for a handler whose own call does not return what a plan returns (a plain
  ``def`` handler or a generator under the async mediator): :meth:`Flavour.adapt`;
* **wrappers that wait for what they wrap**: the per-dispatch scope (it closes after the
  handler finished), the streaming scope (it closes with the stream) and the in-order
  publish loop. Their code is identical but for ``async``/``await`` and the name of the
  closing method, so it is written once, as the source text :data:`_WAITING` with
  ``{async_}``, ``{await_}``, ``{aclose}`` and ``{close_items}`` slots, and compiled for each
  flavour when this module is imported. The compiled functions are the ones a hand-written
  twin would be (no per-call cost for sharing them); tracebacks show each flavour's own
  text (it is registered with :mod:`linecache`).
"""

from __future__ import annotations

import inspect
import linecache
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from cqrskit.dependencies import ASYNC_EXITS, EXITS, Scope, scope_var
from cqrskit.errors import PublishError
from cqrskit.registry import HandlerSpec

__all__ = ["ASYNC", "SYNC", "Entries", "Flavour", "Plan", "ScopedCall", "scope_var"]

Plan = Callable[[Any], Any]
"""``plan(message)``: the handler's result (sync) or an awaitable of it (async)."""
ScopedCall = Callable[[Scope, Any], Any]
"""A plan's inner chain once a scope exists: ``call(scope, message)``."""
Entries = tuple[tuple[object, Plan], ...]
"""The event handlers of one event type, in order: ``(owner, plan)`` pairs."""

# The source of the waiting wrappers, both flavours. Fixed text: nothing from a message, a
# registry or a user reaches it.
_WAITING = """
def with_scope(chain):
    new_scope = dict.__new__
    get_current = scope_var.get
    set_current = scope_var.set
    reset_current = scope_var.reset

    {async_}def plan(message):
        scope = new_scope(Scope)  # an empty Scope without a Python-level __init__ call
        scope.parent = get_current()
        scope._metadata = scope._extras = None
        token = set_current(scope)
        try:
            result = {await_}chain(scope, message)
        except BaseException as exc:
            try:
                if EXITS in scope:
                    {await_}scope.{aclose}(exc)
            finally:
                reset_current(token)
            raise
        if EXITS in scope:
            try:
                if ASYNC_EXITS in scope:  # some exit may return an awaitable
                    {await_}scope.{aclose}(None)
                else:  # synchronous exits only: no coroutine to create (async flavour)
                    scope.close_sync(None)
            finally:
                reset_current(token)
        else:
            reset_current(token)
        return result

    return plan


def with_stream_scope(chain):
    # the scope stays open while the handler yields (it reads its scoped dependencies) and
    # closes when the stream is exhausted or closed
    get_current = scope_var.get
    set_current = scope_var.set
    reset_current = scope_var.reset

    {async_}def plan(message):
        scope = Scope(get_current())
        token = set_current(scope)
        try:
            items = {await_}chain(scope, message)
        except BaseException as exc:
            try:
                {await_}scope.{aclose}(exc)
            finally:
                reset_current(token)
            raise
        reset_current(token)
        return closing_stream(items, scope)

    return plan


{async_}def closing_stream(items, scope):
    try:
        {async_}for item in items:
            yield item
    except BaseException as exc:  # GeneratorExit too: closing early is thrown in, as in Python
        close = getattr(items, "{close_items}", None)
        if close is not None and isinstance(exc, GeneratorExit):
            {await_}close()
        {await_}scope.{aclose}(exc)
        raise
    {await_}scope.{aclose}(None)


{async_}def publish_in_order(event, entries):
    failures = None
    for owner, plan in entries:
        try:
            {await_}plan(event)
        except Exception as exc:  # collected; every handler runs
            failures = failed(failures, owner, exc)
    if failures:
        raise PublishError(event.__class__, failures)
"""


def failed(
    failures: list[tuple[object, BaseException]] | None, owner: object, exc: BaseException
) -> list[tuple[object, BaseException]]:
    """Add one handler's failure to the list of a publish (created on the first)."""
    if failures is None:
        failures = []
    failures.append((owner, exc))
    return failures


def _compile_waiting(name: str, words: dict[str, str]) -> dict[str, Any]:
    source = _WAITING.format(**words)
    filename = f"<cqrskit {name} dispatch>"
    # mtime None: linecache.checkcache keeps the entry (attrs does the same for its methods)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {
        "Scope": Scope,
        "EXITS": EXITS,
        "ASYNC_EXITS": ASYNC_EXITS,
        "PublishError": PublishError,
        "scope_var": scope_var,
        "failed": failed,
    }
    exec(compile(source, filename, "exec"), namespace)
    return namespace


@dataclass(frozen=True, slots=True)
class Flavour:
    """The async or the sync way to call, wait and close; see the module docstring."""

    name: str
    is_async: bool
    with_scope: Callable[[ScopedCall], Plan]
    """Wrap a chain in a fresh per-dispatch scope, closed when the chain has returned."""
    with_stream_scope: Callable[[ScopedCall], Plan]
    """Like ``with_scope`` for a streaming query: the scope closes with the stream."""
    publish_in_order: Callable[[Any, Entries], Any]
    """``publish_in_order(event, entries)``: every handler, in order; failures together."""

    def native(self, spec: HandlerSpec) -> bool:
        """Whether calling the handler gives what a plan returns, as it is."""
        return not self.is_async or (spec.is_async and not spec.is_generator)

    def adapt(self, spec: HandlerSpec, func: Callable[..., Any]) -> Callable[..., Any]:
        """``func`` (the handler, maybe with arguments bound) made to return what a plan
        returns. Takes any arguments; see :meth:`adapt_one` for the one-argument case."""
        if self.native(spec):
            return func
        if spec.is_generator:

            async def stream_call(*args: Any, **kwargs: Any) -> Any:
                return _iter_async(func(*args, **kwargs))

            return stream_call

        async def call_sync(*args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

        return call_sync

    def adapt_one(self, spec: HandlerSpec, func: Callable[[Any], Any]) -> Plan:
        """:meth:`adapt` for ``func(message)``: the wrappers take one argument, which spares
        building an argument tuple and dictionary per call."""
        if not self.is_async:
            return func
        if spec.is_generator:

            async def stream_call(message: Any) -> Any:
                return _iter_async(func(message))

            return stream_call
        if spec.is_async:
            if inspect.isfunction(func) or isinstance(func, partial):
                return func
            target = func

            async def call_async(message: Any) -> Any:  # bound methods and other callables
                return await target(message)

            return call_async

        async def call_sync(message: Any) -> Any:
            return func(message)

        return call_sync


def _iter_async(result: Any) -> Any:
    """An async iterator over what a streaming handler returned (sync generators too)."""
    if hasattr(result, "__aiter__"):
        return result

    async def gen() -> AsyncIterator[Any]:
        for item in result:
            yield item

    return gen()


def _flavour(name: str, words: dict[str, str]) -> Flavour:
    waiting = _compile_waiting(name, words)
    return Flavour(
        name=name,
        is_async=name == "async",
        with_scope=cast("Callable[[ScopedCall], Plan]", waiting["with_scope"]),
        with_stream_scope=cast("Callable[[ScopedCall], Plan]", waiting["with_stream_scope"]),
        publish_in_order=cast("Callable[[Any, Entries], Any]", waiting["publish_in_order"]),
    )


ASYNC = _flavour(
    "async", {"async_": "async ", "await_": "await ", "aclose": "aclose", "close_items": "aclose"}
)
SYNC = _flavour(
    "sync", {"async_": "", "await_": "", "aclose": "close_sync", "close_items": "close"}
)
