"""WAL checkpoints on a thread of their own, so that commands do not wait for them.

In WAL mode SQLite appends each commit to the ``-wal`` file; a *checkpoint* copies those
pages back into the database file and, with ``synchronous=NORMAL`` or ``FULL``, calls
``fsync`` on both files. By default the connection that commits runs a checkpoint itself
whenever the WAL has reached 1,000 pages (``wal_autocheckpoint``): with a few pages per
command, one command in ~250 stalls for the two ``fsync`` calls — milliseconds on a real
disk, on the event loop's thread, where nothing else runs meanwhile. Measured here (raw
``sqlite3``, two rows per transaction, ``synchronous=NORMAL``, ext4 on a virtual disk)
those checkpoints were 37–51 % of a command loop's wall time.

:class:`WalCheckpointer` runs ``PRAGMA wal_checkpoint(PASSIVE)`` on a connection of its
own, in a daemon thread, each time the writer has committed ``every`` transactions. A
passive checkpoint never blocks readers or writers, and ``sqlite3`` releases the GIL while
SQLite works, so the event loop keeps going. The checkpointer's connection uses the
store's ``synchronous`` setting: the checkpoint syncs what it copies exactly as the
writer's own checkpoint would, so durability is unchanged.

A passive checkpoint cannot copy frames committed while it runs, and SQLite starts the WAL
over only when every frame has been copied; under a steady stream of commits that never
happens by itself. The writer therefore keeps its own automatic checkpoint, at
:data:`WRITER_AUTOCHECKPOINT` pages instead of 1,000: it bounds the WAL (about 16 MB with
4 KiB pages), and as the background thread has already copied and synced most pages by
then, the writer's checkpoint is rarer and has less to do. Once a checkpoint finds the WAL
at that size, the thread skips its next turn, so that the writer's checkpoint does not find
the checkpoint lock taken. The bound is soft, as SQLite's own is: on a loaded machine the
WAL peaked at 4,700–9,400 pages in runs of 40,000 back-to-back commits.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

__all__ = ["WRITER_AUTOCHECKPOINT", "WalCheckpointer"]

_log = logging.getLogger("cqrskit.sqlite")

WRITER_AUTOCHECKPOINT = 4000
"""``PRAGMA wal_autocheckpoint`` of a write connection whose store checkpoints in the
background: the WAL's bound in pages (SQLite's default is 1,000)."""


class WalCheckpointer:
    """Runs passive WAL checkpoints of one database file on a daemon thread.

    The writer calls :meth:`poke` every :attr:`every` commits; the thread starts at the
    first poke (a store that commits little never starts one) and stops in :meth:`close`.

    Attributes:
        every: commits between two checkpoints.
        checkpoints: passive checkpoints run so far.
        failures: checkpoints that raised (logged; the writer's own automatic checkpoint
            still bounds the WAL).
        last_result: the last checkpoint's ``(busy, WAL frames, frames copied)``.
    """

    __slots__ = (
        "every",
        "checkpoints",
        "failures",
        "last_result",
        "last_error",
        "_path",
        "_synchronous",
        "_busy_ms",
        "_wake",
        "_closed",
        "_thread",
        "_gave_up",
    )

    def __init__(self, path: str, *, synchronous: str, busy_ms: int, every: int = 256) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.checkpoints = 0
        self.failures = 0
        self.last_result: tuple[int, int, int] | None = None
        self.last_error: BaseException | None = None
        self._path = path
        self._synchronous = synchronous
        self._busy_ms = busy_ms
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._gave_up = False

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def poke(self) -> None:
        """Ask for a checkpoint soon (starts the thread the first time)."""
        if self._closed or self._gave_up:
            return
        thread = self._thread
        if thread is None or not thread.is_alive():  # the first poke, or a forked child
            self._wake = threading.Event()
            thread = self._thread = threading.Thread(
                target=self._run,
                args=(self._wake,),
                name=f"cqrskit-sqlite-checkpoint:{self._path}",
                daemon=True,
            )
            thread.start()
        self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread, waiting up to ``timeout`` seconds for a checkpoint under way."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self, wake: threading.Event) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                # the checkpoint syncs as this connection's setting says: the store's own
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as exc:
            self._gave_up = True
            self.last_error = exc
            _log.warning(
                "cannot open %s for background WAL checkpoints (%s); the write connection "
                "checkpoints by itself",
                self._path,
                exc,
            )
            return
        stand_aside = False
        try:
            while True:
                wake.wait()
                wake.clear()
                if self._closed:
                    return
                if stand_aside:
                    # the WAL had reached the writer's own threshold: its checkpoint (and
                    # the restart of the WAL after it) finds the checkpoint lock free
                    stand_aside = False
                    continue
                try:
                    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:
                    self.failures += 1
                    if self.last_error is None or self.failures % 100 == 1:
                        _log.warning("background WAL checkpoint of %s failed: %s", self._path, exc)
                    self.last_error = exc
                    continue
                self.last_result = (busy, frames, copied)
                self.checkpoints += 1
                stand_aside = frames >= WRITER_AUTOCHECKPOINT
        finally:
            conn.close()
