"""PostgreSQL write connections: a light LIFO pool for units of work, ``begin_ahead``
transactions, the uncancellable COMMIT round trip and the translation of connection loss.

A connection is used again only after its unit of work ended cleanly. One whose statement
was interrupted (a timeout, a cancelled task), whose server ended the session, or that gave
no answer within the bound is dropped; an interrupted one is closed in the background once
the server confirmed the cancellation (or after the bound), so that nothing of it keeps
running there."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import select
import time
import types
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from cqrskit.errors import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    ConnectionLostError,
    CqrsError,
    MissingExtraError,
    PersistenceError,
    UnavailableError,
)

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("postgres", "asyncpg") from exc

_log = logging.getLogger("cqrskit.postgres")


class _Outcome:
    """What a task waits on while its COMMIT is on the wire: asyncpg's own future, seen
    through a view that refuses cancellation.

    ``Task.cancel()`` asks the future it waits on to cancel; this view says no, so asyncio
    marks the cancellation as pending and delivers it when the future is done, at this
    same await (then the outcome is in: :func:`_commit_round_trip` keeps it and delivers
    the cancellation again at the caller's next await). The future itself is never
    cancelled, so asyncpg does not cancel the statement. The task is woken by the future
    directly: no extra task, no extra pass of the event loop."""

    # asyncio's task reads ``_loop`` (there is no get_loop()) and calls add_done_callback,
    # here the future's own bound method: no Python call on the way
    __slots__ = ("_fut", "_asyncio_future_blocking", "_loop", "add_done_callback")

    def __init__(self, fut: Any) -> None:
        self._fut = fut
        self._asyncio_future_blocking = True
        self._loop = fut.get_loop()
        self.add_done_callback = fut.add_done_callback

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        return self._fut.remove_done_callback(fn)  # type: ignore[no-any-return]

    def cancel(self, msg: Any | None = None) -> bool:
        """Refuse: the outcome of a COMMIT on the wire cannot be recalled."""
        return False

    def cancelled(self) -> bool:
        return self._fut.cancelled()  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._fut.done()  # type: ignore[no-any-return]

    def result(self) -> Any:
        return self._fut.result()

    def exception(self) -> BaseException | None:
        return self._fut.exception()  # type: ignore[no-any-return]


class _CommitClock:
    """The bound on COMMIT replies, ``timeout`` seconds, for every commit of one store in
    flight: one timer for all of them, armed for the earliest deadline, instead of a timer
    armed and cancelled per commit. A commit past its deadline has its connection ended;
    :meth:`stop` then says so."""

    __slots__ = ("_timeout", "_due", "_timer", "_loop")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._due: dict[Any, float] = {}  # connection -> time.monotonic() deadline
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, conn: Any) -> None:
        self._due[conn] = time.monotonic() + self._timeout
        if self._timer is None or self._loop is not asyncio.get_running_loop():
            self._arm(self._timeout)

    def stop(self, conn: Any) -> bool:
        """Forget ``conn``'s deadline; ``False`` when the timeout ended the connection."""
        return self._due.pop(conn, None) is not None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop = asyncio.get_running_loop()
        # a fresh context: the timer must not keep the committing command's context alive
        self._timer = loop.call_later(delay, self._check, context=contextvars.Context())

    def _check(self) -> None:
        self._timer = None
        due = self._due
        if not due:
            return
        now = time.monotonic()
        for conn, deadline in list(due.items()):
            if deadline <= now:
                del due[conn]
                try:
                    conn.terminate()  # the round trip then fails at once
                except Exception as exc:  # noqa: BLE001 - the other deadlines still count
                    _log.debug("ending a connection past its COMMIT deadline: %s", exc)
        if due:
            self._arm(max(min(due.values()) - now, 0.001))


@types.coroutine
def _commit_round_trip(conn: Any, sql: str, clock: _CommitClock) -> Generator[Any, Any, None]:
    """Send the round trip that ends in COMMIT so that a cancellation cannot cut it in half,
    and wait at most the clock's timeout for its reply.

    Once COMMIT is on the wire its outcome cannot be recalled: a cancellation that arrives
    meanwhile waits for the outcome (the commit then completes, its token is reported) and
    is delivered again at the caller's next await. A reply that does not come within the
    timeout (a frozen server, a black-holed link, a synchronous standby gone) ends the
    connection, which the caller then discards, and raises
    :class:`~cqrskit.errors.CommitOutcomeUnknownError`.

    asyncpg's coroutine runs in the caller's task (no task of its own, no extra pass of
    the event loop): each future it waits on is handed to the task as an :class:`_Outcome`.
    """
    coro = conn.execute(sql)
    interrupted: asyncio.CancelledError | None = None
    value: Any = None
    error: BaseException | None = None
    clock.start(conn)
    try:
        try:
            while True:
                try:
                    waiting = coro.send(value) if error is None else coro.throw(error)
                except StopIteration:
                    return
                value = error = None
                view = None if waiting is None else _Outcome(waiting)  # None: a bare yield
                while True:
                    try:
                        value = yield view
                    except asyncio.CancelledError as exc:
                        if view is not None and waiting.cancelled():
                            error = exc  # the future itself was cancelled, not the task
                        elif view is not None and not waiting.done():  # pragma: no cover
                            interrupted = exc  # another task class: wait for the outcome
                            continue
                        else:
                            # the task's cancellation, delivered by asyncio once the
                            # future is done (_Outcome refused it): the coroutine reads
                            # the outcome, the cancellation comes again after
                            interrupted = exc
                    except GeneratorExit:
                        coro.close()
                        raise
                    except BaseException as exc:  # noqa: BLE001 - the future's error: to asyncpg
                        error = exc
                    break
        finally:
            expired = not clock.stop(conn)
    except Exception as exc:
        if expired:
            raise CommitOutcomeUnknownError(
                f"no reply to COMMIT from PostgreSQL within {clock._timeout:g} s; the "
                "connection was closed and the command may or may not have committed.",
                hint="retry with the same idempotency key (cqrskit.idempotency); "
                "raise commit_timeout in PostgresEventStore.open() if commits are "
                "legitimately that slow (a synchronous standby far away).",
            ) from exc
        raise
    finally:
        if interrupted is not None:
            current = asyncio.current_task()
            if current is not None:
                # the cancellation consumed here is delivered again at the next await
                # (uncancel first: asyncio.timeout() counts the requests)
                current.uncancel()
                current.cancel(interrupted.args[0] if interrupted.args else None)


class _WriteConnections:
    """Connections for units of work: idle ones reused last-in first-out, new ones opened
    on demand up to ``size``, then callers queue. Lighter than a general pool: a unit of
    work always ends its transaction, so a connection needs no reset between uses (one
    whose statement was interrupted is retired instead: :meth:`retire`). ``bound`` limits
    the wait for the pool's own round trips (the idle rollback, the goodbye).

    With ``begin_ahead > 0`` a unit of work ends with ``COMMIT; BEGIN`` (or ``ROLLBACK;
    BEGIN``): the connection comes back already inside the next, empty transaction and
    the next command skips its BEGIN round trip. Such a transaction has no xid and no
    snapshot, so it holds back neither readers' horizon nor VACUUM. A connection left
    idle longer than ``begin_ahead`` seconds is rolled back in the background (and a
    caller that takes it meanwhile begins afresh), so ``now()`` in a handler is never
    older than that, and monitoring sees an idle transaction no longer than that.
    """

    def __init__(
        self,
        dsn: str,
        size: int,
        begin_ahead: float = 0.0,
        on_connect: Callable[[Any], Awaitable[None]] | None = None,
        bound: float = 5.0,
        acquire_timeout: float | None = None,
    ) -> None:
        self._dsn = dsn
        self._acquire_timeout = acquire_timeout  # the longest wait for a busy pool
        self._on_connect = on_connect
        self._size = size
        self._ahead = begin_ahead
        self._bound = bound  # seconds a round trip of the pool's own may wait for a reply
        self._idle: list[tuple[Any, float]] = []  # (connection, released at)
        self._opened = 0
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._ending: set[asyncio.Task[None]] = set()
        self._polls: dict[Any, Any] = {}  # connection -> select.poll() of its socket

    async def acquire(self) -> tuple[Any, bool]:
        """A connection, and whether it is inside a transaction begun less than
        ``begin_ahead`` seconds ago (the caller then needs no BEGIN)."""
        if self._closed:
            raise PersistenceError("the PostgreSQL event store is closed.")
        idle = self._idle
        while idle:
            conn, since = idle.pop()
            if conn.is_closed():  # died while idle (server restart, idle timeout)
                self.release(conn, broken=True)
                continue
            return conn, conn.is_in_transaction() and time.monotonic() - since < self._ahead
        if self._opened < self._size:
            self._opened += 1
            try:
                conn = await asyncpg.connect(self._dsn)
                await _check_connection(conn)
                if self._on_connect is not None:
                    await self._on_connect(conn)
            except BaseException:
                self._opened -= 1
                raise
            poller = _poller(conn)
            if poller is not None:
                self._polls[conn] = poller
            return conn, False
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self._acquire_timeout):
                try:
                    conn = await fut
                except asyncio.CancelledError:
                    # a connection handed over just before the cancellation (or the
                    # timeout) goes back; a _Retry handed over must not turn the
                    # cancellation into a retry
                    if fut.done() and not fut.cancelled():
                        if fut.exception() is None:
                            self.release(fut.result())
                        else:  # a _Retry (a slot freed): the next queued caller takes it
                            self._pass_retry()
                    raise
        except TimeoutError:
            raise UnavailableError(
                f"every one of the {self._size} PostgreSQL write connections stayed busy "
                f"for {self._acquire_timeout:g} s (pool exhausted); nothing was written.",
                hint="retry later; or raise max_size or acquire_timeout in "
                "PostgresEventStore.open, or look for commands that hold their "
                "transaction long.",
            ) from None
        return conn, conn.is_in_transaction()  # handed over the moment it was released

    def take(self) -> Any | None:
        """The most recently released connection if it can run a command right away: open,
        inside a transaction begun less than ``begin_ahead`` seconds ago, and nothing
        arrived on its socket while it sat idle (see :meth:`quiet`); else ``None`` (the
        caller then goes through :meth:`acquire`). No await: the common case of a command
        costs no pass of the event loop and no coroutine here."""
        idle = self._idle
        if not idle or self._closed:
            return None
        conn, since = idle[-1]
        if (
            time.monotonic() - since < self._ahead
            and conn.is_in_transaction()
            and not conn.is_closed()
            and self.quiet(conn)
        ):
            idle.pop()
            return conn
        return None

    def quiet(self, conn: Any) -> bool | None:
        """Whether nothing arrived on ``conn``'s socket since the connection was last read:
        no data and no end of stream that the event loop has yet to hand to asyncpg (a
        server that ended the session while the connection was idle). ``None`` when it
        cannot tell (no ``select.poll`` on this platform, a transport without a socket)."""
        poller = self._polls.get(conn)
        if poller is None:
            return None
        try:
            return not poller.poll(0)
        except OSError:
            return False

    def release(self, conn: Any, broken: bool = False) -> None:
        if broken or self._closed or conn.is_closed():
            self._polls.pop(conn, None)
            conn.terminate()
            self._forget()
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self._idle.append((conn, time.monotonic()))
        if self._sweeper is None and self._ahead > 0 and conn.is_in_transaction():
            # a fresh context: the timer must not keep the releasing command's context alive
            self._sweeper = asyncio.get_running_loop().call_later(
                self._ahead, self._sweep, context=contextvars.Context()
            )

    def retire(self, conn: Any) -> None:
        """Give ``conn`` up for good: a statement on it was interrupted (cancelled, timed
        out) and may still run on the server. Its slot is free at once. asyncpg has asked
        the server to cancel that statement; the connection is closed in the background
        once the server confirmed (then nothing of it keeps running or holds locks there;
        the server rolls its transaction back), or after ``bound`` seconds at most."""
        self._polls.pop(conn, None)
        self._forget()
        task = asyncio.get_running_loop().create_task(
            self._close_one(conn), context=contextvars.Context()
        )
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    def _forget(self) -> None:
        """A connection of this pool is gone: free its slot; a queued caller may open a
        fresh connection now."""
        self._opened -= 1
        self._pass_retry()

    def _pass_retry(self) -> None:
        """Tell the first queued caller still waiting that a slot is free."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(_Retry())
                break

    async def _close_one(self, conn: Any) -> None:
        """Close ``conn`` politely within ``bound`` seconds (asyncpg first waits for a
        pending cancellation to be confirmed), else end it."""
        try:
            async with asyncio.timeout(self._bound):
                await conn.close(timeout=self._bound)
        except Exception as exc:  # noqa: BLE001 - no answer or already gone: ended below
            _log.debug("ending a write connection: %s", exc)
        finally:
            if not conn.is_closed():
                conn.terminate()

    def _sweep(self) -> None:
        """Roll back the begun-ahead transactions of connections idle past ``begin_ahead``."""
        self._sweeper = None
        if self._closed:
            return
        now = time.monotonic()
        keep: list[tuple[Any, float]] = []
        oldest: float | None = None
        for conn, since in self._idle:
            if conn.is_in_transaction() and not conn.is_closed():
                if now - since >= self._ahead:
                    task = asyncio.ensure_future(self._end(conn))
                    self._ending.add(task)
                    task.add_done_callback(self._ending.discard)
                    continue
                oldest = since if oldest is None else min(oldest, since)
            keep.append((conn, since))
        self._idle = keep
        if oldest is not None:
            delay = max(oldest + self._ahead - now, 0.001)
            self._sweeper = asyncio.get_running_loop().call_later(
                delay, self._sweep, context=contextvars.Context()
            )

    async def _end(self, conn: Any) -> None:
        try:
            await conn.execute("ROLLBACK", timeout=self._bound)
        except Exception as exc:  # noqa: BLE001 - a background task: drop the connection
            _log.debug("discarding a write connection: %s", exc)
            self.release(conn, broken=True)
            return
        except BaseException:  # cancelled (store closing, loop ending): drop it too
            self.release(conn, broken=True)
            raise
        self.release(conn)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, []  # nothing is handed out while closing
        if self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)
        for conn, _since in idle:
            self._opened -= 1
            self._polls.pop(conn, None)
            await self._close_one(conn)
        if self._ending:  # connections given up meanwhile (retire)
            await asyncio.gather(*self._ending, return_exceptions=True)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(PersistenceError("the PostgreSQL event store is closed."))


def _poller(conn: Any) -> Any:
    """A ``select.poll()`` object watching ``conn``'s socket for input, or ``None`` (no
    ``poll`` on this platform, a transport without a socket). The socket is asyncpg's (the
    transport is not public API; without it the check falls back to passes of the loop)."""
    make = getattr(select, "poll", None)
    transport = getattr(conn, "_transport", None)
    if make is None or transport is None:
        return None
    try:
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        poller = make()
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    except (OSError, ValueError, AttributeError):
        return None
    return poller


class _Retry(Exception):
    """A queued caller is told to try acquiring again (a connection was discarded)."""


async def _check_connection(conn: Any) -> None:
    if conn.get_settings().standard_conforming_strings != "on":
        raise ConfigurationError(
            "PostgreSQL standard_conforming_strings is off; cqrskit renders event literals "
            "and refuses to run without it.",
            hint="ALTER DATABASE ... SET standard_conforming_strings = on (the default).",
        )


async def _no_reset(conn: Any) -> None:
    # every unit of work ends its transaction itself; the default reset (UNLISTEN, RESET
    # ALL, ...) would cost one more round trip per command
    return None


_CONNECTION_LOST = (asyncpg.PostgresConnectionError, OSError)
# the server ended the session: administrator command (pg_terminate_backend), crash or
# shutdown, idle-session timeouts (not 57014, a cancelled statement: the session lives)
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03", "57P05", "25P03"})


def _lost(exc: BaseException, conn: Any) -> bool:
    """Whether ``exc`` (raised by a statement on ``conn``) means the connection is gone."""
    if isinstance(exc, CqrsError):  # already typed (ConnectionLostError is an OSError)
        return False
    if isinstance(exc, _CONNECTION_LOST):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return getattr(exc, "sqlstate", None) in _SESSION_ENDED
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError):
        # asyncpg ends a connection whose protocol state it cannot trust any more, e.g.
        # one that read the server's FATAL goodbye while idle (a shutdown, an idle timeout,
        # pg_terminate_backend) and then refused the next statement
        try:
            return bool(conn.is_closed())
        except asyncpg.InterfaceError:  # a pool proxy already released: gone as well
            return True
    return False


def _unsent(exc: BaseException) -> bool:
    """Whether asyncpg refused the statement before sending anything, so that a COMMIT
    that failed so was never sent: an InterfaceError on a connection it already knows is
    closed, or its protocol-state check ("cannot switch to state ...", raised before the
    statement is written) on one that read the server's goodbye while idle."""
    if isinstance(exc, asyncpg.InterfaceError):
        return True
    return isinstance(exc, asyncpg.InternalClientError) and str(exc).startswith(
        "cannot switch to state"
    )


def _interrupted(conn: Any) -> bool:
    """Whether a statement on ``conn`` was cancelled (a timeout, a cancelled task) and the
    server has not confirmed the cancellation yet. asyncpg makes the next statement wait
    for that confirmation, without a bound when the server is gone, so such a connection
    is given up instead of being rolled back and reused. asyncpg has no public test for
    this; its pool asks the protocol the same way. Without the method (another asyncpg)
    the answer is ``False`` and the ROLLBACK's own bound applies."""
    probe = getattr(getattr(conn, "_protocol", None), "_is_cancelling", None)
    if probe is None:
        return False
    try:
        return bool(probe())
    except Exception:  # noqa: BLE001 - a protocol in an unknown state: give it up
        return True


def _connection_lost(exc: BaseException, committing: bool) -> PersistenceError:
    if committing:
        return CommitOutcomeUnknownError(
            f"the connection to PostgreSQL was lost while COMMIT was in flight ({exc}); the "
            "command may or may not have committed.",
            hint="retry with the same idempotency key (cqrskit.idempotency), which returns "
            "the stored result if the first attempt committed.",
        )
    return ConnectionLostError(
        f"the connection to PostgreSQL was lost before COMMIT ({exc}); nothing was committed.",
        hint="retry the command (the retry behavior does: this is a ConnectionError).",
    )
