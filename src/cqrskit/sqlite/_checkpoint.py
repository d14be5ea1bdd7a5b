"""WAL checkpoints on a thread of their own, so that the event loop does not wait for them.

In WAL mode SQLite appends each commit to the ``-wal`` file; a *checkpoint* copies those
pages back into the database file and, with ``synchronous=NORMAL`` or ``FULL``, calls
``fsync`` on both files. By default the connection that commits runs a checkpoint itself
whenever the WAL has reached 1,000 pages (``wal_autocheckpoint``): with a few pages per
command, one command in ~250 stalls for the ``fsync`` calls — milliseconds on a real
disk, on the event loop's thread, where nothing else runs meanwhile. Measured here (raw
``sqlite3``, two rows per transaction, ``synchronous=NORMAL``, ext4 on a virtual disk)
those checkpoints were 45–52 % of a command loop's wall time
(``benchmarks/sqlite_checkpoints.py``).

:class:`WalCheckpointer` runs ``PRAGMA wal_checkpoint(PASSIVE)`` on a connection of its
own, in a daemon thread, each time the writer has committed ``every`` transactions. A
passive checkpoint never blocks readers or writers, and ``sqlite3`` releases the GIL while
SQLite works, so the event loop keeps going. The checkpointer's connection uses the
store's ``synchronous`` setting: the checkpoint syncs what it copies exactly as the
writer's own checkpoint would, so durability is unchanged.

A passive checkpoint cannot copy frames committed while it runs, and SQLite starts the WAL
over only after a checkpoint that copied every frame; under a steady stream of commits that
never happens by itself. So once the WAL has reached :data:`RESTART_AT` pages, the thread
asks the store's writers to pause: the next command awaits :meth:`WalCheckpointer.park`
(the event loop runs other tasks meanwhile; later commands queue on the store's write lock)
while the thread runs ``PRAGMA wal_checkpoint(RESTART)``, which copies the rest and lets the
next commit start the WAL from its first page. Its wait for readers and other processes is
short (200 ms); if they hold on, the restart gives up and is tried again later.

The write connection keeps an automatic checkpoint of its own as the bound, at
:data:`WRITER_AUTOCHECKPOINT` pages instead of 1,000 (about 24 MB with 4 KiB pages): it
runs only when the thread is not there (no event loop to park, a failure, a reader holding
the WAL). The thread drops the requests that came while it worked, and skips a turn when
it finds the WAL at that size, so that the writer's checkpoint finds the checkpoint lock
free. The bound is soft, as SQLite's own is (a long reader holds the WAL). One ``fsync``
stays with the writer: the first commit after the WAL starts over syncs its header.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import urllib.parse
from pathlib import Path

__all__ = ["WRITER_AUTOCHECKPOINT", "WalCheckpointer"]

_log = logging.getLogger("cqrskit.sqlite")

WRITER_AUTOCHECKPOINT = 6000
"""``PRAGMA wal_autocheckpoint`` of a write connection whose store checkpoints in the
background: the WAL's bound in pages (SQLite's default is 1,000)."""

RESTART_AT = 3000
"""WAL size in pages at which the thread starts the WAL over: it asks the store's writers
to pause (:meth:`WalCheckpointer.park`, awaited by the next command without blocking the
event loop) and runs ``PRAGMA wal_checkpoint(RESTART)`` meanwhile."""

_RESTART_BUSY_MS = 200  # how long the restart waits for readers and other processes
_PARK_WAIT = 1.0  # how long the thread waits for a command to park
_PARK_TIMEOUT = 5.0  # how long a parked command waits at most

_SYNC_LEVELS = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}


class WalCheckpointer:
    """Runs passive WAL checkpoints of one database file on a daemon thread.

    The writer calls :meth:`poke` every :attr:`every` commits; the thread starts at the
    first poke (a store that commits little never starts one) and stops in :meth:`close`.
    A thread that could not open the file (or start) ends; the next poke tries again.

    Attributes:
        every: commits between two checkpoints.
        checkpoints: passive checkpoints that ran (not counting busy ones).
        busy: checkpoints that found another one under way (another connection's), and
            restarts that gave up (a reader or another process held on).
        restarts: times the thread started the WAL over with the writers parked.
        late: parked commands that went on after 5 s without the thread's answer.
        failures: checkpoints, connections or thread starts that failed (logged: the first
            after a success, then every 100th; the writer's own automatic checkpoint still
            bounds the WAL).
        last_result: the last checkpoint's ``(busy, WAL frames, frames copied)``.
        last_error: the last failure, or ``None``.
        synchronous: the checkpoint connection's ``PRAGMA synchronous`` as read back
            (``1`` NORMAL, ``2`` FULL), or ``None`` before it opened.
    """

    __slots__ = (
        "every",
        "checkpoints",
        "busy",
        "failures",
        "last_result",
        "last_error",
        "synchronous",
        "_uri",
        "_path",
        "_want",
        "_busy_ms",
        "_wake",
        "_closed",
        "_thread",
        "_failing",
        "restarts",
        "late",
        "pause",
        "_resume",
        "_loop",
    )

    def __init__(
        self, path: str | Path, *, synchronous: str, busy_ms: int, every: int = 256
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if synchronous not in _SYNC_LEVELS:
            raise ValueError(f"synchronous must be one of {sorted(_SYNC_LEVELS)}")
        self.every = every
        self.checkpoints = 0
        self.busy = 0
        self.failures = 0
        self.last_result: tuple[int, int, int] | None = None
        self.last_error: BaseException | None = None
        self.synchronous: int | None = None
        # resolved now: a later chdir must not point the thread at another file, and
        # mode=rw never creates one
        self._path = str(Path(path).absolute())
        self._uri = "file:" + urllib.parse.quote(self._path) + "?mode=rw"
        self._want = synchronous
        self._busy_ms = busy_ms
        self._wake: queue.SimpleQueue[bool] = queue.SimpleQueue()  # True: a checkpoint
        self._closed = False
        self._thread: threading.Thread | None = None
        self._failing = 0  # failures since the last success
        self.restarts = 0
        self.late = 0
        # set by the thread while it wants the writers parked (see park())
        self.pause: threading.Event | None = None
        # the parked command's loop and future, which the thread resolves
        self._resume: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the last poke's event loop

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def poke(self) -> None:
        """Ask for a checkpoint soon (starts the thread if none runs). Never raises."""
        if self._closed:
            return
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: no parking, the writer's own checkpoint
            self._loop = None
        thread = self._thread
        if thread is None or not thread.is_alive():  # the first poke, a failure, a fork
            wake: queue.SimpleQueue[bool] = queue.SimpleQueue()
            thread = threading.Thread(
                target=self._run,
                args=(wake,),
                name=f"cqrskit-sqlite-checkpoint:{self._path}",
                daemon=True,
            )
            try:
                thread.start()
            except Exception as exc:  # noqa: BLE001 - e.g. a thread limit: checkpoint inline
                self._failed(exc, "cannot start the background WAL checkpoint thread")
                return
            self._wake = wake
            self._thread = thread
        self._wake.put(True)

    def stop(self) -> None:
        """Ask the thread to end after the checkpoint under way, without waiting. Safe in a
        garbage collector's callback (a store dropped without ``close()``): a
        ``SimpleQueue.put`` takes no lock the thread may hold."""
        self._closed = True
        self._wake.put(False)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread, waiting up to ``timeout`` seconds for a checkpoint under way
        (after that it ends, and closes its connection, on its own)."""
        self.stop()
        pause = self.pause
        if pause is not None:  # the thread waits for a command to park: wake it now
            pause.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    async def park(self) -> None:
        """Called by the store's writer, holding its write lock, when :attr:`pause` is set:
        wait (at most 5 s, without blocking the event loop) while the thread starts the WAL
        over. Commands queue on the store's write lock meanwhile."""
        pause = self.pause
        if pause is None:
            return
        thread = self._thread
        if thread is None or not thread.is_alive():  # e.g. a forked child: nobody answers
            self.pause = None
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        resume = self._resume = (loop, fut)  # before the thread can see the pause taken
        pause.set()
        if self.pause is not pause:
            # the thread gave up waiting meanwhile; it either saw `resume` (and resolves
            # the future) or had already looked: nothing to wait for either way
            if self._resume is resume:
                self._resume = None
            return
        try:
            async with asyncio.timeout(_PARK_TIMEOUT):
                await fut
        except TimeoutError:  # the thread is late: go on (BEGIN IMMEDIATE waits if needed)
            self.late += 1
        finally:
            if self._resume is resume:
                self._resume = None

    @staticmethod
    def _resume_writers(fut: asyncio.Future[None]) -> None:  # on the parked command's loop
        if not fut.done():
            fut.set_result(None)

    def _restart(self, conn: sqlite3.Connection) -> bool:
        """Start the WAL over with the store's writers parked; ``True`` if it was."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        parked = threading.Event()
        self.pause = parked  # the next command parks (see park())
        try:
            if not parked.wait(_PARK_WAIT) or self._closed:
                return False  # no command came: nothing is writing, nothing to hurry
            conn.execute(f"PRAGMA busy_timeout = {_RESTART_BUSY_MS}")
            try:
                busy, _frames, _copied = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_ms)}")
            if busy:  # a reader or another process held on past the busy timeout
                self.busy += 1
                return False
            self.restarts += 1
            return True
        except sqlite3.Error as exc:
            self._failed(exc, "restarting the WAL failed")
            return False
        finally:
            self.pause = None  # before reading _resume: see park()
            resume, self._resume = self._resume, None
            if resume is not None:
                try:
                    resume[0].call_soon_threadsafe(self._resume_writers, resume[1])
                except RuntimeError:  # that event loop closed meanwhile
                    pass

    def _failed(self, exc: BaseException, what: str) -> None:
        self.failures += 1
        self._failing += 1
        self.last_error = exc
        if self._failing % 100 == 1:  # the first after a success, then every 100th
            _log.warning(
                "%s for %s (%s); the write connection still checkpoints by itself",
                what,
                self._path,
                exc,
            )

    def _run(self, wake: queue.SimpleQueue[bool]) -> None:
        try:
            conn = sqlite3.connect(
                self._uri, uri=True, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_ms)}")
                # the checkpoint syncs as this connection's setting says: the store's own
                conn.execute(f"PRAGMA synchronous = {self._want}")
                self.synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as exc:
            self._failed(exc, "cannot open the database for background WAL checkpoints")
            return
        if self.synchronous != _SYNC_LEVELS[self._want]:
            _log.warning(
                "background WAL checkpoints of %s run with synchronous=%s, not %s",
                self._path,
                self.synchronous,
                self._want,
            )
        stand_aside = False
        restart_at = RESTART_AT
        try:
            while not self._closed:  # stop() sets it before it wakes the thread
                wake.get()
                if self._closed:
                    return
                if stand_aside:
                    # the WAL had reached the writer's own threshold: leave the checkpoint
                    # lock to the writer's checkpoint (and the WAL's restart after it)
                    stand_aside = False
                    _drain(wake)
                    continue
                try:
                    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:
                    self._failed(exc, "a background WAL checkpoint failed")
                    continue
                finally:
                    # requests that came meanwhile are dropped: a thread that checkpoints
                    # back to back would hold the lock the writer's checkpoint needs
                    _drain(wake)
                self._failing = 0
                self.last_result = (busy, frames, copied)
                if busy:
                    self.busy += 1
                else:
                    self.checkpoints += 1
                # a restart only when this checkpoint copied every frame (a reader holding
                # an older snapshot would make it wait its 200 ms for nothing, every
                # turn), and after one that gave up only once the WAL grew by RESTART_AT
                if frames < RESTART_AT:  # the WAL started over (here or in the writer)
                    restart_at = RESTART_AT
                restarted = False
                if frames >= restart_at and copied == frames:
                    restarted = self._restart(conn)
                    restart_at = RESTART_AT if restarted else frames + RESTART_AT
                # the WAL at the writer's own threshold and not started over: leave the
                # checkpoint lock to the writer's checkpoint for a turn
                stand_aside = not restarted and frames >= WRITER_AUTOCHECKPOINT
        finally:
            conn.close()


def _drain(wake: queue.SimpleQueue[bool]) -> None:
    """Drop the requests queued so far."""
    try:
        while True:
            wake.get_nowait()
    except queue.Empty:
        pass
