"""The compiler: one plan per handler, of the flavour it is given.

:meth:`Compiler.compile` is the only place that decides how a handler is called. It binds
the handler's and the behaviors' dependencies (through the :class:`~cqrskit._plan.Planner`),
then builds the plan from the shapes in :mod:`cqrskit._dispatch.calls`:

* **general path**: the handler call taking ``(scope, message)``, each behavior folded
  around it, all under a fresh per-dispatch scope that closes when the dispatch ends (or,
  for a streaming query, when the stream does). It runs every handler and behavior.
* **fast paths** for what most handlers are, tried first: no scope at all when nothing is
  per dispatch, or when every per-dispatch value is made by a plain factory for the handler
  alone. Each says in its docstring which case it covers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cqrskit._dispatch.calls import (
    direct_factories,
    fold_plain,
    fold_scoped,
    handler_call,
    handler_call_scoped,
)
from cqrskit._dispatch.flavours import Entries, Flavour, Plan
from cqrskit._plan import Binding, Planner, behaviors_for
from cqrskit.pipeline._core import ScopedBehavior
from cqrskit.registry import HandlerSpec, Registry

__all__ = ["Accept", "Compiler"]

Accept = Callable[[Binding, object, type, "tuple[tuple[str, Any], ...] | None"], None]
"""``accept(binding, owner, message_type, params)``: raises for a binding a flavour cannot
run (the sync mediator refuses dependencies made by async factories)."""


class Compiler:
    """Compiles handlers into plans of one flavour.

    Args:
        flavour: :data:`~cqrskit._dispatch.flavours.ASYNC` or ``SYNC``.
        planner: resolves dependency parameters.
        behaviors: the mediator's behaviors, outermost first.
        accept: called with every binding before it is compiled.
    """

    def __init__(
        self,
        flavour: Flavour,
        planner: Planner,
        behaviors: Sequence[Callable[..., Any] | ScopedBehavior],
        accept: Accept | None = None,
    ) -> None:
        self.flavour = flavour
        self._planner = planner
        self._behaviors = tuple(behaviors)
        self._accept = accept
        self._event_entries: dict[int, tuple[object, Plan]] = {}

    def compile(self, spec: HandlerSpec) -> Plan:
        """The plan of one handler: ``plan(message)``."""
        planner = self._planner
        accept = self._accept
        binding = planner.bind_handler(spec)
        if accept is not None:
            accept(binding, spec.owner, spec.message_type, spec.params)
        behaviors: list[Binding] = []
        for behavior in behaviors_for(self._behaviors, spec.message_type):
            bound = planner.bind_behavior(behavior, spec.message_type)
            if accept is not None:
                accept(bound, behavior, spec.message_type, None)
            behaviors.append(bound)
        flavour = self.flavour

        if not any(b.providers for b in behaviors):
            plan = direct_factories(spec, binding, flavour)
            if plan is not None:
                return _fold_plain_all(behaviors, plan)
        if not binding.scoped and not any(b.scoped for b in behaviors):
            return _fold_plain_all(behaviors, handler_call(spec, binding, flavour))

        chain = handler_call_scoped(spec, binding, flavour)
        for b in reversed(behaviors):
            chain = fold_scoped(b, chain)
        if spec.is_generator:
            return flavour.with_stream_scope(chain)
        return flavour.with_scope(chain)

    def event_entries(self, registry: Registry, event_type: type) -> Entries:
        """``(owner, plan)`` of every handler of ``event_type`` and of its base event types,
        base types first; each handler is compiled once, however many types share it."""
        entries: list[tuple[object, Plan]] = []
        for cls in reversed(event_type.__mro__):
            for spec in registry.event_handlers(cls):
                entry = self._event_entries.get(id(spec))
                if entry is None:
                    entry = self._event_entries[id(spec)] = (spec.owner, self.compile(spec))
                entries.append(entry)
        return tuple(entries)


def _fold_plain_all(behaviors: list[Binding], plan: Plan) -> Plan:
    for b in reversed(behaviors):
        plan = fold_plain(b, plan)
    return plan
