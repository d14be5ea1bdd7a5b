"""Named fail points: places where a fault test can pause, stop or kill the process.

A fault test must make its fault land where it claims (a SIGKILL between applying a batch
and committing it, a leader paused with a batch in hand). The library marks those places
with ``await reached("projector.applied", ...)``; without a hook (always, outside tests)
each is a coroutine that returns at once: four per batch, never per event.

Points (``info`` keys in brackets):

``projector.before_commit``  a batch was read, its read-database transaction not begun
``projector.applied``        the batch is applied inside the transaction, checkpoint not yet
``projector.checkpointed``   the checkpoint is raised, the transaction not yet committed
``projector.committed``      the transaction committed

each with ``projection``, ``generation``, ``epoch``, ``first`` and ``last`` (positions).
Tests install a hook with :func:`set_hook` (e.g. in a projector subprocess started through
a small wrapper), never the library itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

__all__ = ["Hook", "reached", "set_hook"]

Hook = Callable[[str, Mapping[str, object]], Awaitable[None]]

_hook: Hook | None = None


def set_hook(hook: Hook | None) -> None:
    """Call ``hook(point, info)`` at every fail point from now on (``None``: stop)."""
    global _hook
    _hook = hook


async def reached(point: str, **info: object) -> None:
    """Mark fail point ``point``; runs the test's hook if one is set."""
    hook = _hook
    if hook is not None:
        await hook(point, info)
