"""Ports of the write side: the event log (which is also the outbox) and the unit of work.

One table is both the outbox and the history: every recorded event gets a global
``position`` (ordered so that positions become visible in commit order), a ``stream`` id and
a per-stream ``version``. Drivers (``cqrskit.sqlite``, ``cqrskit.postgres``) implement
:class:`EventStore`; :class:`InMemoryEventStore` has the same semantics for tests.

A command runs in a :class:`UnitOfWork`: the transaction behavior (``store.transaction()``)
opens it, the handler changes state through the driver's connection and ``record``\\ s events,
the behavior appends the events and commits, reports the consistency token
(:func:`cqrskit.mediator.record_token`) and then publishes the events to in-process handlers.

The read side uses only :class:`StoredEvent`, :meth:`EventStore.read_after`,
:meth:`EventStore.head`, :meth:`EventStore.wait_for`, :meth:`EventStore.read_stream` and
:meth:`EventStore.add_inline_hook`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Self

from cqrskit._encoding import Encoded, Encoder, encode_event
from cqrskit.dependencies import Provider, Scope
from cqrskit.errors import (
    ConcurrencyError,
    ConfigurationError,
    DependencyError,
    DispatchTimeoutError,
    PersistenceError,
)
from cqrskit.mediator import Mediator, _receipt_var
from cqrskit.messages import Event, Metadata, _iso_utc, _new_id
from cqrskit.pipeline._core import ScopedBehavior, for_commands

if TYPE_CHECKING:
    from cqrskit.idempotency import IdempotencyBackend

__all__ = [
    "Appender",
    "EventStore",
    "InMemoryEventStore",
    "InMemoryUnitOfWork",
    "InlineHook",
    "NewEvent",
    "PendingRow",
    "PublishErrorHandler",
    "StoredEvent",
    "UnitOfWork",
    "validate_identifier",
]

_log = logging.getLogger("cqrskit.eventlog")

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # fullmatch: "$" accepts a final newline

InlineHook = Callable[["UnitOfWork", "list[StoredEvent]"], Awaitable[None]]
"""``async hook(uow, stored_events)``: runs inside the transaction, after the append (positions
known) and before COMMIT; an error rolls the whole command back."""

PublishErrorHandler = Callable[[Event, Exception], None]
"""``fn(event, error)``: told when an in-process event handler fails after commit."""


def _epoch(stamp: object) -> float | None:
    """An ISO timestamp from event metadata as seconds since the epoch (``None`` if bad)."""
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


def validate_identifier(name: str, what: str = "identifier") -> str:
    """Return ``name`` double-quoted for SQL after checking ``^[a-z_][a-z0-9_]{0,62}$``.

    Raises:
        ConfigurationError: the name does not match (nothing is ever interpolated raw).
    """
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise ConfigurationError(
            f"invalid {what} {name!r}: it must match ^[a-z_][a-z0-9_]{{0,62}}$.",
            hint="use lower-case letters, digits and underscores, starting with a letter or _.",
        )
    return f'"{name}"'


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event recorded by a handler, not yet written.

    Attributes:
        stream: the stream id (e.g. ``"account-42"``).
        event: the event object.
        expected_version: the stream version the writer expects before this event
            (``0`` = the stream must be new), or ``None`` for no check.
    """

    stream: str
    event: Event
    expected_version: int | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as read back from the log.

    Attributes:
        position: global position; a reader that has read up to ``p`` never later sees a
            new event with a position ``<= p``. Positions increase but may have gaps.
        stream: stream id.
        version: version within the stream, 1-based and contiguous.
        type: the event's stable registered name (not the Python class path).
        schema_version: version of the event's schema, for upcasting.
        data: the encoded payload (JSON text by default).
        metadata: ``message_id``, ``correlation_id``, ``causation_id``, ``timestamp`` (ISO).
    """

    position: int
    stream: str
    version: int
    type: str
    schema_version: int
    data: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Appender:
    """A transaction that can still append to the log and so holds readers back (see
    :meth:`EventStore.oldest_appender`).

    Attributes:
        pid: the database server's process id of its session (PostgreSQL:
            ``pg_terminate_backend(pid)`` ends it).
        xid: its transaction id (PostgreSQL: 32 bits, as ``pg_stat_activity`` shows it).
        seconds: how long its transaction has been open (``None`` when not visible to the
            monitoring role).
        state: its session's state (``active``, ``idle in transaction``, ...), if visible.
    """

    pid: int
    xid: int
    seconds: float | None
    state: str | None


@dataclass(frozen=True, slots=True)
class PendingRow:
    """One event ready to append: everything but its position and version (drivers).

    ``expected_version`` is the version the stream must be at before this event, or
    ``None``; ``index`` is the event's place among its stream's events in this unit of
    work (0-based).
    """

    stream: str
    index: int
    expected_version: int | None
    encoded: Encoded
    metadata: dict[str, Any]
    event: Event


class UnitOfWork(ABC):
    """The handler's view of one command's write transaction.

    A handler declares a parameter of a driver's unit-of-work type (or this base) and:
    changes state through the driver's connection, then ``record``\\ s events. The
    transaction behavior appends the events and commits everything atomically; a handler
    never calls :meth:`commit` itself. Outside the mediator, use ``uow = await
    store.begin()``, then ``await uow.commit()`` or ``await uow.rollback()``.
    """

    __slots__ = ("_events", "_base", "_count", "_active", "_failed_nested", "metadata", "store")

    def __init__(self, store: EventStore, metadata: Metadata | None) -> None:
        self.store = store
        self.metadata = metadata
        self._events: list[tuple[str, Event]] = []
        self._base: dict[str, int | None] = {}
        self._count: dict[str, int] = {}
        self._active = True
        self._failed_nested: BaseException | None = None

    def record(self, stream: str, *events: Event, expected_version: int | None = None) -> None:
        """Record events for ``stream``; they are written with the transaction.

        ``expected_version`` is the version the stream must be at before the first of these
        events (``0`` for a new stream); a mismatch raises
        :class:`~cqrskit.errors.ConcurrencyError` at commit (or at once, when it contradicts
        events already recorded for the stream in this unit of work).
        """
        if not self._active:
            raise PersistenceError(
                "record() on a unit of work that has already committed or rolled back.",
                hint="record events inside the command handler, before it returns.",
            )
        if not isinstance(stream, str) or not stream:
            raise ValueError(f"stream id must be a non-empty str, got {stream!r}")
        for e in events:
            if not isinstance(e, Event):
                raise TypeError(f"record() takes cqrskit.Event instances, got {e!r}")
        counts = self._count
        count = counts.get(stream, 0)
        if expected_version is not None:
            if expected_version < 0:
                raise ValueError(f"expected_version must be >= 0, got {expected_version}")
            base = self._base.get(stream)
            if count == 0 or base is None:
                self._base[stream] = expected_version - count
                if expected_version - count < 0:
                    raise ConcurrencyError(
                        f"stream {stream!r}: expected version {expected_version} but this "
                        f"unit of work already recorded {count} event(s) for a new stream.",
                        stream=stream,
                        expected_version=expected_version,
                    )
            elif base + count != expected_version:
                raise ConcurrencyError(
                    f"stream {stream!r}: expected version {expected_version}, but this unit "
                    f"of work has it at {base + count}.",
                    stream=stream,
                    expected_version=expected_version,
                    actual_version=base + count,
                )
        elif count == 0:
            self._base[stream] = None
        counts[stream] = count + len(events)
        if len(events) == 1:  # the commonest call: no loop
            self._events.append((stream, events[0]))
        else:
            self._events.extend([(stream, e) for e in events])

    @property
    def recorded(self) -> Sequence[NewEvent]:
        """Events recorded so far in this unit of work (with per-event expected versions)."""
        seen: dict[str, int] = {}
        out: list[NewEvent] = []
        for stream, e in self._events:
            i = seen.get(stream, 0)
            seen[stream] = i + 1
            base = self._base.get(stream)
            out.append(NewEvent(stream, e, None if base is None else base + i))
        return out

    @property
    def active(self) -> bool:
        """``True`` until the unit of work commits or rolls back."""
        return self._active

    def pending_rows(self, encode: Encoder) -> list[PendingRow]:
        """The recorded events encoded, with their metadata (for drivers).

        An event's ``message_id`` is ``<command message id>-<n>`` (``n`` counts the unit of
        work's events from 0): unique as long as command ids are, stable across a relay's
        retries, and one uuid per command instead of one per event.
        """
        prefix, correlation, causation, timestamp = self._lineage()
        seen: dict[str, int] = {}
        rows: list[PendingRow] = []
        for n, (stream, e) in enumerate(self._events):
            i = seen.get(stream, 0)
            seen[stream] = i + 1
            base = self._base.get(stream)
            rows.append(
                PendingRow(
                    stream,
                    i,
                    None if base is None else base + i,
                    encode(e),
                    {
                        "message_id": f"{prefix}-{n}",
                        "correlation_id": correlation,
                        "causation_id": causation,
                        "timestamp": timestamp,
                    },
                    e,
                )
            )
        return rows

    def _lineage(self) -> tuple[str, str | None, str | None, str]:
        """The events' message-id prefix, correlation id, causation id and ISO timestamp."""
        md = self.metadata
        if md is not None:
            return md._event_lineage()
        return _new_id(), None, None, _iso_utc(time.time_ns())

    def _close(self) -> None:
        self._active = False

    def _failure(self, exc: BaseException) -> BaseException:
        """The error to raise for ``exc``, which escaped the handler (after rollback):
        a driver turns its own "connection lost" errors into
        :class:`~cqrskit.errors.ConnectionLostError` here; by default ``exc`` itself."""
        return exc

    @abstractmethod
    async def commit(self) -> int | None:
        """Append the recorded events, run inline hooks, commit; return the last position.

        Returns ``None`` when no event was recorded (or the unit of work was opened with
        ``positions=False`` and the driver did not read them back). Raises
        :class:`~cqrskit.errors.ConcurrencyError` (after rolling back) when an expected
        version does not hold or another writer appended the same stream version.
        """

    @abstractmethod
    async def rollback(self) -> None:
        """Discard the transaction: no state change and no event is kept."""


class EventStore(ABC):
    """A driver's event log: append (through a unit of work) and read by position.

    Wiring a mediator takes three lines::

        store = SqliteEventStore("app.db")
        mediator = Mediator(registry, behaviors=[store.transaction()],
                            resolver=[store.resolver(), deps])
    """

    #: The driver's unit-of-work class; handlers may ask for it or for :class:`UnitOfWork`.
    unit_of_work_type: ClassVar[type[UnitOfWork]]
    # whether commit() may hold back a cancellation until the COMMIT's outcome is in (and
    # request it again afterwards): the transaction behavior then delivers it inside
    # send(); a driver whose commit awaits nothing that refuses cancellation says False
    _commit_holds_cancellation: ClassVar[bool] = True

    def __init__(self, *, encoder: Encoder | None = None) -> None:
        self._hooks: list[InlineHook] = []
        self._encode = encoder or encode_event
        self._waiters: set[asyncio.Future[None]] = set()

    # -- write side ----------------------------------------------------------------------

    @abstractmethod
    async def begin(
        self, metadata: Metadata | None = None, *, positions: bool = True
    ) -> UnitOfWork:
        """Open a unit of work (a write transaction) on this store.

        ``metadata`` supplies the events' correlation and causation ids. With
        ``positions=False`` a driver may skip reading back the positions at commit (saving a
        round trip on PostgreSQL); :meth:`UnitOfWork.commit` then returns ``None``.
        """

    def transaction(self, *, on_publish_error: PublishErrorHandler | None = None) -> ScopedBehavior:
        """The transaction behavior for commands: one unit of work per command.

        The handler runs inside the transaction; on success the events are appended and
        everything commits atomically, the consistency token is reported to
        ``send_tracked``, and the events are published to in-process handlers *after*
        commit. On an error nothing is kept and nothing is published. A command sent from
        inside a handler joins the outer unit of work.

        A failing event handler cannot undo the commit: its error is passed to
        ``on_publish_error(event, error)`` (default: logged at ERROR on
        ``cqrskit.eventlog``) and the command still returns its result.
        """
        return for_commands(_TransactionBehavior(self, on_publish_error))

    def resolver(self) -> _UnitOfWorkResolver:
        """A resolver giving handlers the current :class:`UnitOfWork` (or driver subclass)."""
        return _UnitOfWorkResolver(self)

    def add_inline_hook(self, hook: InlineHook) -> None:
        """Run ``await hook(uow, stored_events)`` in every commit, before COMMIT.

        Hooks see the appended events with their positions and may write through the same
        transaction (inline projections); an error rolls the command back.
        """
        self._hooks.append(hook)

    def idempotency_backend(self, table: str, wait_timeout: float) -> IdempotencyBackend:
        """Where :class:`~cqrskit.idempotency.Idempotency` keeps its rows for this store.

        A driver returns its own :class:`~cqrskit.idempotency.IdempotencyBackend`; the
        default refuses, naming the store.
        """
        raise ConfigurationError(
            f"Idempotency does not support {type(self).__qualname__}.",
            hint="implement EventStore.idempotency_backend() in the driver, or use "
            "InMemoryEventStore, SqliteEventStore, PostgresEventStore or "
            "cqrskit.sqlalchemy.SqlAlchemyEventStore.",
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the store's connections, whether its driver's ``close()`` is sync or async
        (nothing to do for stores without one)."""
        close = getattr(self, "close", None)
        if close is not None:
            result = close()
            if inspect.isawaitable(result):
                await result

    async def __aenter__(self) -> Self:
        """``async with store:`` closes the store when the block ends (an application's
        lifespan: ``async with SqliteEventStore("app.db") as store: ...``)."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- read side -----------------------------------------------------------------------

    @abstractmethod
    async def read_after(self, position: int, limit: int = 1000) -> list[StoredEvent]:
        """Up to ``limit`` events with position ``> position``, in position order.

        Never returns an event while an event with a lower position may still commit.
        """

    @abstractmethod
    async def head(self) -> int:
        """The highest position visible to :meth:`read_after` (0 for an empty log)."""

    async def last_position(self) -> int:
        """The highest committed position, readable or not (0 for an empty log).

        Equal to :meth:`head` except on PostgreSQL, where :meth:`head` stops below the
        readable horizon while a transaction that may append to the log is open. Use this one
        to ask "is a reader behind the log?" and to check a token from the future; use
        :meth:`head` for what :meth:`read_after` can return now.
        """
        return await self.head()

    async def backlog(self, position: int, limit: int) -> tuple[int, float | None]:
        """Committed events with a position ``> position``, readable yet or not: how many
        (counted up to ``limit``) and the recording time (seconds since the epoch) of the
        oldest of those counted, ``None`` when there are none.

        The base implementation counts with :meth:`read_after` (right for stores whose
        reads have no horizon); the PostgreSQL store counts every committed row.
        """
        count, oldest, after = 0, None, position
        while count < limit:
            batch = await self.read_after(after, min(1000, limit - count))
            if not batch:
                break
            for e in batch:
                stamp = _epoch(e.metadata.get("timestamp"))
                if stamp is not None and (oldest is None or stamp < oldest):
                    oldest = stamp
            count += len(batch)
            after = batch[-1].position
        return count, oldest

    async def oldest_appender(self) -> Appender | None:
        """The open transaction that holds readers back the longest, if any.

        ``None`` by default: only the PostgreSQL store has writers that can hold readers
        back (an open transaction that may still append, at its transaction id).
        """
        return None

    async def wait_for(self, position: int, timeout: float) -> bool:
        """Wait until an event with position ``> position`` may be readable.

        A hint only (returns ``True`` on a wake-up, ``False`` on timeout); callers must
        re-read and may be woken spuriously. The base implementation wakes on commits made
        through this store object in this process; drivers add cross-process hints.

        Raises:
            ValueError: ``timeout`` is NaN (a NaN deadline would corrupt the event loop's
                timer order).
        """
        if timeout != timeout:
            raise ValueError("wait_for: timeout must be a number of seconds, got NaN.")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fut: asyncio.Future[None] = loop.create_future()
        # registered before the head is read: a commit landing while head() runs still
        # wakes this waiter (checking first and registering after would lose that wake-up)
        self._waiters.add(fut)
        try:
            if await self.head() > position or fut.done():
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.wait_for(asyncio.shield(fut), left)
        except TimeoutError:
            return False
        finally:
            self._waiters.discard(fut)
        return True

    @property
    def encoder(self) -> Encoder:
        """What turns an event into its stored form (type, schema version, JSON data): the
        ``encoder`` this store was made with, else cqrskit's. A wrapper that writes this
        store's events through a connection of its own encodes with it."""
        return self._encode

    def notify_committed(self) -> None:
        """Wake every :meth:`wait_for` caller: events were committed. The store's own units
        of work do it after each commit; a wrapper that inserts events through a connection
        of its own (``cqrskit.sqlalchemy``) calls it after its COMMIT."""
        self._wake()

    def _wake(self) -> None:
        """Wake every :meth:`wait_for` caller (after a commit)."""
        waiters = self._waiters
        if waiters:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
            waiters.clear()

    @abstractmethod
    async def read_stream(self, stream: str, after_version: int = 0) -> list[StoredEvent]:
        """Events of one stream with version ``> after_version``, in version order."""


# -- the transaction behavior ------------------------------------------------------------


def _find_active(scope: Scope | None, key: object) -> UnitOfWork | None:
    while scope is not None:
        uow = scope.get(key)
        if uow is not None:
            return uow if uow.active else None
        scope = scope.parent
    return None


class _TransactionBehavior:
    __slots__ = ("_store", "_on_error")

    def __init__(self, store: EventStore, on_error: PublishErrorHandler | None) -> None:
        self._store = store
        self._on_error = on_error

    async def __call__(
        self, message: Any, next: Callable[[Any], Awaitable[Any]], scope: Scope, mediator: Mediator
    ) -> Any:
        store = self._store
        parent = scope.parent
        if parent is not None:
            outer = _find_active(parent, store)
            if outer is not None:
                scope[store] = outer
                try:
                    return await next(message)
                except BaseException as exc:
                    # Its state changes share the outer transaction and cannot be undone
                    # alone: the whole unit of work may no longer commit.
                    if outer._failed_nested is None:
                        outer._failed_nested = exc
                    raise
        uow = await store.begin(scope.metadata, positions=_receipt_var.get() is not None)
        scope[store] = uow
        try:
            result = await next(message)
            if not uow._active:
                raise PersistenceError(
                    "the handler committed or rolled back the unit of work itself.",
                    message_type=type(message),
                    hint="let the transaction behavior commit; raise to roll back.",
                )
            if uow._failed_nested is not None:
                raise PersistenceError(
                    f"a command sent by the handler of {type(message).__name__} failed "
                    f"({type(uow._failed_nested).__name__}); its changes share this "
                    "transaction, so nothing is committed.",
                    message_type=type(message),
                    hint="let the nested command's error propagate, or send it after this "
                    "command (e.g. from an event handler, which runs after commit).",
                ) from uow._failed_nested
            # what the handler recorded (an inline hook recording more is not published)
            recorded = len(uow._events)
            position = await uow.commit()
        except BaseException as exc:
            if uow.active:
                await uow.rollback()
                if isinstance(exc, DispatchTimeoutError) and exc._message is message:
                    # this command's own deadline, inside its transaction, which is now
                    # rolled back: running it again applies it once (a timeout of another
                    # dispatch passing through says nothing about what that one committed)
                    exc.retry_safe = True
            failure = uow._failure(exc)
            if failure is not exc:
                raise failure from exc
            raise
        if position is not None:
            receipt = _receipt_var.get()  # record_token(position), inline
            if receipt is not None:
                receipt.record(position)
        # a driver's COMMIT, or an inline hook of the user's, may hold one back
        task = asyncio.current_task() if store._commit_holds_cancellation or store._hooks else None
        if task is not None and task.cancelling():
            # a cancellation (a timeout) that came while COMMIT was on the wire was held
            # until the outcome was in: deliver it here, inside the caller's await of
            # send(), so that an asyncio.timeout() around it sees its own cancellation
            # (after its block it would hit an unrelated await)
            await asyncio.sleep(0)
        if recorded:
            events = uow._events
            if len(events) != recorded:
                events = events[:recorded]
            for _, event in events:
                if not mediator.has_event_handlers(event.__class__):
                    continue
                try:
                    await mediator.publish(event)
                except Exception as exc:  # noqa: BLE001 - the commit stands; reported below
                    self._report(event, exc)
        return result

    def _report(self, event: Event, exc: Exception) -> None:
        if self._on_error is not None:
            try:
                self._on_error(event, exc)
            except Exception as callback_error:  # noqa: BLE001 - the commit stands
                _log.error(
                    "on_publish_error failed for %s: %s (handler error: %s)",
                    type(event).__name__,
                    callback_error,
                    exc,
                    exc_info=callback_error,
                )
        else:
            _log.error(
                "event handler failed after commit for %s: %s",
                type(event).__name__,
                exc,
                exc_info=exc,
            )


class _UnitOfWorkResolver:
    __slots__ = ("_store", "_types")

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._types: set[type] = {UnitOfWork, store.unit_of_work_type}

    def provider(self, dependency: Any, lookup: Any) -> Provider | None:
        if dependency not in self._types:
            return None
        store = self._store

        def get(scope: Scope) -> UnitOfWork:
            try:
                return scope[store]  # type: ignore[no-any-return]
            except KeyError:
                raise DependencyError(
                    "no unit of work in this dispatch: only command handlers wrapped by "
                    "store.transaction() receive one.",
                    dependency=dependency,
                    hint="add behaviors=[store.transaction()] to the Mediator, and ask for "
                    "a UnitOfWork in command handlers only.",
                ) from None

        return Provider.scoped(get)


# -- in-memory implementation ------------------------------------------------------------


class InMemoryUnitOfWork(UnitOfWork):
    """Unit of work of :class:`InMemoryEventStore`.

    Attributes:
        changes: state changes staged by the handler (``uow.changes[key] = value``); they
            are applied to ``store.state`` at commit, together with the events.
    """

    __slots__ = ("changes",)

    store: InMemoryEventStore

    def __init__(self, store: InMemoryEventStore, metadata: Metadata | None) -> None:
        super().__init__(store, metadata)
        self.changes: dict[str, Any] = {}

    async def commit(self) -> int | None:
        """See :meth:`UnitOfWork.commit`."""
        store = self.store
        stored: list[StoredEvent] = []
        try:
            async with store._lock:
                if self._events:
                    stored = store._prepare(self.pending_rows(store._encode))
                    for hook in store._hooks:
                        await hook(self, stored)
                    store._apply(stored)
                store.state.update(self.changes)
        finally:
            self._close()
        if not stored:
            return None
        store._wake()
        return stored[-1].position

    async def rollback(self) -> None:
        """See :meth:`UnitOfWork.rollback`."""
        self.changes.clear()
        self._close()


class InMemoryEventStore(EventStore):
    """An event store in a list, with the drivers' semantics; for unit tests and demos.

    Attributes:
        state: committed state (see :attr:`InMemoryUnitOfWork.changes`).
    """

    unit_of_work_type = InMemoryUnitOfWork
    _commit_holds_cancellation = False  # commit awaits only inline hooks

    def __init__(self, *, encoder: Encoder | None = None) -> None:
        super().__init__(encoder=encoder)
        self._log: list[StoredEvent] = []
        self._streams: dict[str, list[StoredEvent]] = {}
        self._lock = asyncio.Lock()
        self.state: dict[str, Any] = {}

    async def begin(
        self, metadata: Metadata | None = None, *, positions: bool = True
    ) -> InMemoryUnitOfWork:
        """See :meth:`EventStore.begin`."""
        return InMemoryUnitOfWork(self, metadata)

    def _prepare(self, rows: list[PendingRow]) -> list[StoredEvent]:
        position = self._log[-1].position if self._log else 0
        current: dict[str, int] = {}
        out: list[StoredEvent] = []
        for row in rows:
            if row.stream not in current:
                current[row.stream] = len(self._streams.get(row.stream, ()))
            actual = current[row.stream]
            if row.expected_version is not None and row.expected_version != actual:
                raise ConcurrencyError(
                    f"stream {row.stream!r} is at version {actual}, expected "
                    f"{row.expected_version}.",
                    stream=row.stream,
                    expected_version=row.expected_version,
                    actual_version=actual,
                )
            current[row.stream] = actual + 1
            position += 1
            enc = row.encoded
            out.append(
                StoredEvent(
                    position,
                    row.stream,
                    actual + 1,
                    enc.type,
                    enc.schema_version,
                    enc.data,
                    row.metadata,
                )
            )
        return out

    def _apply(self, stored: list[StoredEvent]) -> None:
        self._log.extend(stored)
        for e in stored:
            self._streams.setdefault(e.stream, []).append(e)

    async def read_after(self, position: int, limit: int = 1000) -> list[StoredEvent]:
        """See :meth:`EventStore.read_after`."""
        log = self._log
        lo, hi = 0, len(log)
        while lo < hi:
            mid = (lo + hi) // 2
            if log[mid].position <= position:
                lo = mid + 1
            else:
                hi = mid
        return log[lo : lo + limit]

    async def head(self) -> int:
        """See :meth:`EventStore.head`."""
        return self._log[-1].position if self._log else 0

    async def read_stream(self, stream: str, after_version: int = 0) -> list[StoredEvent]:
        """See :meth:`EventStore.read_stream`."""
        return list(self._streams.get(stream, ())[max(after_version, 0) :])
