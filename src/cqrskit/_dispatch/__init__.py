"""Dispatch plans for both mediators, compiled by one compiler.

A reader following a message: ``Mediator.send`` / ``SyncMediator.send`` (or the code
generated for them, :mod:`.verbs`) finds the message type's *plan*, built once by
:class:`.compiler.Compiler` from the shapes in :mod:`.calls`; what differs between the
async and the sync flavour is in :mod:`.flavours`, and nowhere else.

* :mod:`.flavours` — the two flavours: adapters, scope wrappers, the in-order publish loop.
* :mod:`.calls` — handler calls and behavior folds (general shapes and fast paths).
* :mod:`.compiler` — which shapes a handler's plan is made of.
* :mod:`.verbs` — the base of both mediators: tables, generated verbs, slow paths.
"""

from cqrskit._dispatch.calls import fast_callable
from cqrskit._dispatch.compiler import Compiler
from cqrskit._dispatch.flavours import ASYNC, SYNC, Entries, Flavour, Plan, scope_var
from cqrskit._dispatch.verbs import MediatorCore, publish_concurrently, route

__all__ = [
    "ASYNC",
    "SYNC",
    "Compiler",
    "Entries",
    "Flavour",
    "MediatorCore",
    "Plan",
    "fast_callable",
    "publish_concurrently",
    "route",
    "scope_var",
]
