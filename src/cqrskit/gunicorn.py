"""gunicorn with uvicorn workers that shut down gracefully on every stop signal.

Serve an application that opens its services in the lifespan
(:func:`cqrskit.fastapi.install`) with::

    gunicorn -k cqrskit.gunicorn.UvicornWorker 'myapp.api:create_app()'

gunicorn's master turns the signal it receives into one for its workers: SIGTERM (a
graceful stop) into SIGTERM, SIGINT and SIGQUIT (its *quick* shutdown) into SIGQUIT. The
stock ``uvicorn_worker.UvicornWorker`` stops uvicorn on SIGTERM, but on SIGQUIT it only
marks itself as stopping and keeps serving until the master kills it (SIGKILL) when
``--graceful-timeout`` has passed: the lifespan shutdown never runs, in-process projectors
keep their leases until ``lease_ttl`` runs out and pools are not closed. A master that
gets SIGINT alone — ``kill -INT``, a container whose stop signal is SIGINT — stops that
way; Ctrl-C in a terminal reaches the workers directly as well, which hides it.

:class:`UvicornWorker` is the stock worker with SIGQUIT handled like SIGTERM: uvicorn
stops accepting connections, lets the requests in flight finish, runs the lifespan
shutdown (projectors finish or abandon their batch and release their leases, stores close)
and the worker exits, within ``--graceful-timeout``.

Install with ``pip install 'cqrskit[gunicorn]'`` (gunicorn and uvicorn-worker).
"""

from __future__ import annotations

import signal
from types import FrameType

from cqrskit.errors import MissingExtraError

try:
    from uvicorn_worker import UvicornWorker as _StockWorker
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("gunicorn", "uvicorn-worker") from exc

__all__ = ["UvicornWorker"]


class UvicornWorker(_StockWorker):  # type: ignore[misc]  # an untyped base class
    """A gunicorn worker running uvicorn that stops gracefully on SIGTERM *and* on the
    master's quick shutdown (SIGQUIT, sent when the master gets SIGINT or SIGQUIT): the
    application's lifespan shutdown runs either way. Use it as
    ``gunicorn -k cqrskit.gunicorn.UvicornWorker``; everything else is the stock
    ``uvicorn_worker.UvicornWorker``."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Called on SIGQUIT: mark the worker as stopping, then stop uvicorn the way
        SIGTERM does (uvicorn handles SIGTERM and SIGINT only)."""
        super().handle_exit(sig, frame)
        if sig == signal.SIGQUIT:
            signal.raise_signal(signal.SIGTERM)
