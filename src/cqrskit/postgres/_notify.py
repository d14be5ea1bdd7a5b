"""The wake-up hints of ``notify=True``: one ``NOTIFY`` after commits, on a connection of its
own (:class:`Notifier`), and the ``LISTEN`` connection of readers (:class:`Listener`).

PostgreSQL takes a database-wide lock when a transaction that notifies commits and holds it
through that commit's WAL flush, so writers that ``NOTIFY`` inside their transactions commit
one at a time (no group commit). A ``NOTIFY`` sent on its own after the command's commit
returned takes that lock only for a transaction that wrote nothing else, whose commit does
not wait for a flush: writers keep committing in parallel.

Pokes coalesce: while one ``NOTIFY`` is on its way, any number of commits ask for one more,
sent once it returned. Readers woken by it read what is committed by then, and the poke of
every later commit follows. The hint is best effort: a failure is logged and the next
poke connects again; readers poll meanwhile (a missed wake-up costs latency, never events).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

_log = logging.getLogger("cqrskit.postgres")


async def _close(conn: Any, timeout: float) -> None:
    """Close ``conn`` (if any) politely within ``timeout``, never raising."""
    if conn is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), timeout)


class Notifier:
    """Sends ``NOTIFY <channel>`` after commits, coalescing the pokes that arrive while one
    is on its way.

    Args:
        dsn: where to connect (once, lazily; again after a failure).
        channel: the validated, quoted channel name.
        timeout: seconds for the connection and for each ``NOTIFY``.
    """

    __slots__ = ("_dsn", "_sql", "_timeout", "_conn", "_task", "_again", "_closed", "sent")

    def __init__(self, dsn: str, channel: str, timeout: float) -> None:
        self._dsn = dsn
        self._sql = f"NOTIFY {channel}"
        self._timeout = timeout
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._closed = False
        self.sent = 0
        """How many ``NOTIFY`` statements were sent (for tests and diagnostics)."""

    def poke(self) -> None:
        """Ask for a ``NOTIFY`` after a commit that returned; never blocks, never raises."""
        if self._closed:
            return
        if self._task is not None:
            self._again = True
            return
        # a fresh context: the task must not keep the first poking command's alive
        self._task = asyncio.get_running_loop().create_task(
            self._run(), context=contextvars.Context()
        )

    async def _run(self) -> None:
        try:
            again = True
            while again and not self._closed:
                self._again = False
                await self._send()
                again = self._again
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a hint: readers still poll
            _log.warning("NOTIFY after commit failed (%s); readers poll until the next one", exc)
            await self._drop()
        finally:
            self._task = None

    async def _send(self) -> None:
        conn = self._conn
        if conn is None or conn.is_closed():
            conn = self._conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
        await conn.execute(self._sql, timeout=self._timeout)
        self.sent += 1

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()

    async def close(self) -> None:
        """Stop: the ``NOTIFY`` on its way (and one asked for meanwhile) is sent, waiting at
        most the timeout; then the connection is closed."""
        task = self._task
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), self._timeout)
        self._closed = True
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn, self._conn = self._conn, None
        await _close(conn, self._timeout)


class Listener:
    """The ``LISTEN`` connection of a store's readers, opened on first use and again after
    the server ended it.

    It is opened in a task of its own: a caller cancelled meanwhile (a relay whose
    acknowledgements came first) must not leave behind a connection that never ran
    ``LISTEN``, which would turn every later wake-up into a poll.

    Args:
        dsn: where to connect.
        channel: the channel name (asyncpg quotes it).
        callback: called with asyncpg's arguments for each notification.
        timeout: seconds for the connection.
    """

    __slots__ = ("_dsn", "_channel", "_callback", "_timeout", "_conn", "_task", "opened")

    def __init__(
        self, dsn: str, channel: str, callback: Callable[..., None], timeout: float
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self._callback = callback
        self._timeout = timeout
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self.opened = 0
        """How many connections it opened (for tests and diagnostics)."""

    async def ready(self) -> None:
        """Return once the connection listens; open it if needed.

        Raises:
            Exception: the connection failed (the next call tries again).
        """
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return
        task = self._task
        if task is None or task.done():
            self._conn = None
            task = self._task = asyncio.get_running_loop().create_task(
                self._open(), context=contextvars.Context()
            )
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and (task.cancelled() or task.exception() is not None):
                self._task = None

    async def _open(self) -> None:
        conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
        try:
            await conn.add_listener(self._channel, self._callback)
        except BaseException:
            conn.terminate()
            raise
        self.opened += 1
        self._conn = conn

    async def close(self) -> None:
        """Stop listening and close the connection."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn, self._conn = self._conn, None
        await _close(conn, self._timeout)
