"""Statements of projection handlers, sent together: batched speed from per-event code.

A projector applies a batch of events in one read-database transaction, and handlers are
written per event (``await ctx.execute(...)`` once or twice per event). Sent one by one,
each statement costs a round trip on PostgreSQL and a trip through the driver on SQLite.
:class:`BatchSession` stands between the handlers' context and the real session and queues
their writes instead:

* a run of consecutive statements with the same SQL (at least :data:`RUN` of them) goes as
  one ``executemany`` (asyncpg pipelines the executions in one round trip); the statements
  between such runs go together through ``Session.execute_all`` (on PostgreSQL one
  multi-statement string, see ``cqrskit.postgres.readdb``), in the order they were issued;
* a read (``fetchall``/``fetchone``/``fetchval``), a savepoint and the end of the batch send
  what is queued first, so a handler reads its own writes and those of earlier events;
* the order of effects is exactly the order of the handlers' calls;
* inside a savepoint block a handler opens (``ctx.session.savepoint()``), statements run
  at once, so an error is raised where the handler issued the statement, as without
  batching.

Errors. A statement that fails when the queue is sent fails the whole batch, even when the
handler that was running at that moment catches the exception (it may not be that
handler's statement): the caller then rolls the transaction back and applies the batch
again event by event, each statement sent as it is issued (``Applier.apply_careful``), so
the failure is attributed to the event that issued the statement, exactly as without
batching.

Row counts. ``execute`` returns the number of rows a statement changed, which a queued
statement does not know yet: it returns a stand-in that becomes that number when the
handler uses it (compares, tests, adds, prints or passes it on). Used while the statement is
still queued, the stand-in stops the handler (:class:`_Unbatch`, a ``BaseException`` so an
``except Exception`` in the handler does not swallow it); its queued statements are
dropped — none of them was sent — and the handler runs again for that event with every
statement executed at once, as it does from then on. Reaching for the driver connection
(``ctx.connection``) while statements are queued does the same. A handler that reads after
writing has its own queued statements sent one by one (with their counts) and continues
unbatched until it returns, so a count it holds is always known or its statement unsent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from cqrskit.errors import PersistenceError
from cqrskit.projections.api import ProjectionContext
from cqrskit.projections.db import Row, Session

__all__ = ["RUN", "BatchContext", "BatchSession"]

RUN = 3
"""Consecutive statements of one SQL text from this many on are sent as one executemany;
shorter runs go with the other statements (one round trip on PostgreSQL either way, but
an executemany is planned once)."""


class _Unbatch(BaseException):
    """The running handler needs what a queued statement cannot give: run it unbatched."""


class _Queued:
    """A queued statement; also the stand-in for its row count (see the module docstring)."""

    __slots__ = ("sql", "args", "many", "count", "batch")

    def __init__(self, sql: str, args: Any, many: bool, batch: BatchSession) -> None:
        self.sql = sql
        self.args = args  # the parameters, or a list of parameter rows when many
        self.many = many
        self.count: int | None = None  # None while queued
        self.batch = batch

    def _value(self) -> int:
        count = self.count
        if count is None:
            self.batch._unbatch(self)  # raises
            raise AssertionError  # pragma: no cover
        return count

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(count, int) is a use as well
        self._value()
        return int


def _forward(name: str) -> Callable[..., Any]:
    op = getattr(int, name)

    def method(self: _Queued, *args: Any) -> Any:
        return op(self._value(), *args)

    method.__name__ = name
    return method


_INT_METHODS = (
    "__int__ __index__ __bool__ __float__ __hash__ __repr__ __str__ __format__ "
    "__eq__ __ne__ __lt__ __le__ __gt__ __ge__ __neg__ __pos__ __abs__ "
    "__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __floordiv__ __rfloordiv__ "
    "__truediv__ __rtruediv__ __mod__ __rmod__ __pow__ __rpow__ __and__ __rand__ "
    "__or__ __ror__ __xor__ __rxor__ __lshift__ __rlshift__ __rshift__ __rrshift__ "
    "__divmod__ __rdivmod__ __invert__ __round__ __trunc__ __floor__ __ceil__"
)
for _name in _INT_METHODS.split():
    setattr(_Queued, _name, _forward(_name))


def _resolved(params: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row count passed on as a parameter is used: it must be known."""
    return tuple(p._value() if type(p) is _Queued else p for p in params)


class BatchSession(Session):
    """A :class:`Session` that queues writes and sends them together (see the module).

    Args:
        session: the real session, inside the transaction the statements belong to.
        unbatched: handlers known to need statements executed at once (shared by the
            batches of one applier, so a handler is run twice at most once).
    """

    __slots__ = (
        "_session",
        "_pending",
        "_own",
        "_direct",
        "_wanted",
        "_failed",
        "unbatched",
        "dialect",
        "flavor",
    )

    def __init__(self, session: Session, unbatched: set[Any] | None = None) -> None:
        self._session = session
        self.dialect = session.dialect
        self.flavor = session.flavor
        self._pending: list[_Queued] = []
        # index in _pending where the running handler's statements start (-1: none runs)
        self._own = -1
        self._direct = False  # the running handler's statements run at once
        self._wanted = False  # the running handler asked for what a queued statement lacks
        self._failed: BaseException | None = None  # a send failed: the batch is lost
        self.unbatched: set[Any] = set() if unbatched is None else unbatched

    # -- running handlers ----------------------------------------------------------------

    async def call(self, handler: Any, event: Any, ctx: Any) -> None:
        """Run ``handler(event, ctx)``, its writes queued (or at once, see the module)."""
        if handler in self.unbatched:
            await self._call_direct(handler, event, ctx)
            return
        self._own = len(self._pending)
        try:
            await handler(event, ctx)
        except _Unbatch:
            pass
        except BaseException:
            if self._wanted:
                self.unbatched.add(handler)
            self._wanted = self._direct = False
            self._own = -1
            if self._failed is not None:
                raise self._failed  # noqa: B904 - the send's own error, whatever the handler did
            raise
        if self._failed is not None:
            raise self._failed  # the handler swallowed a failed send
        if not self._wanted:
            self._own = -1
            self._direct = False
            return
        # nothing this handler queued was sent (see _unbatch): drop it and run it again
        del self._pending[self._own :]
        self._wanted = False
        self._own = -1
        self.unbatched.add(handler)
        await self._call_direct(handler, event, ctx)

    async def _call_direct(self, handler: Any, event: Any, ctx: Any) -> None:
        await self.flush()
        self._direct = True
        try:
            await handler(event, ctx)
        finally:
            self._direct = False
        if self._failed is not None:
            raise self._failed

    def _unbatch(self, queued: _Queued) -> None:
        own = self._own
        if own < 0 or not any(q is queued for q in self._pending[own:]):
            # a count kept past its handler: sent in a group, or not sent yet
            raise PersistenceError(
                "the row count of a statement was used after the handler that ran it "
                "returned; statements of a projector batch are sent together, so it is not "
                "known.",
                hint="use the value returned by ctx.execute inside the handler that ran it.",
            )
        self._wanted = True
        raise _Unbatch

    # -- Session -------------------------------------------------------------------------

    @property
    def connection(self) -> Any:
        """The driver connection; while writes are queued, the running handler first goes
        unbatched (statements sent behind the queue's back would overtake it)."""
        if self._pending:
            if self._own < 0:
                raise PersistenceError("queued statements must be flushed before this.")
            self._wanted = True
            raise _Unbatch
        return self._session.connection

    def qualify(self, name: str) -> str:
        """See :meth:`Session.qualify`."""
        return self._session.qualify(name)

    async def execute(self, sql: str, *params: Any) -> int:
        """Queue one statement; return a stand-in for its row count (see the module)."""
        if self._direct:
            return await self._session.execute(sql, *params)
        for p in params:
            if type(p) is _Queued:
                params = _resolved(params)
                break
        queued = _Queued(sql, params, False, self)
        self._pending.append(queued)
        return queued  # type: ignore[return-value] # an int when used (see the module)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Queue one statement per parameter row."""
        if self._direct:
            await self._session.executemany(sql, rows)
            return
        self._pending.append(_Queued(sql, list(rows), True, self))

    async def fetchall(self, sql: str, *params: Any) -> list[Row]:
        """Send what is queued, then run the query."""
        if self._pending:
            await self.flush()
        return await self._session.fetchall(sql, *params)

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        """Send what is queued, then run the query."""
        if self._pending:
            await self.flush()
        return await self._session.fetchone(sql, *params)

    async def fetchval(self, sql: str, *params: Any) -> Any:
        """Send what is queued, then run the query."""
        if self._pending:
            await self.flush()
        return await self._session.fetchval(sql, *params)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """Send what is queued; inside the block statements run at once (errors are raised
        where they are issued), and so they do for the rest of the running handler."""
        if self._pending:
            await self.flush()
        direct = self._direct
        self._direct = True
        try:
            async with self._session.savepoint():
                yield
        finally:
            # what ran in the block was sent: the running handler must not run again
            self._direct = direct or self._own >= 0

    # -- sending -------------------------------------------------------------------------

    async def flush(self) -> None:
        """Send every queued statement, in order.

        Runs of one SQL text from handlers that returned go as one ``executemany``; the
        running handler's own statements go one by one (their counts become known) and the
        handler continues unbatched. A failure is kept: every later use of this batch
        raises it again (the caller rolls the transaction back).
        """
        if self._failed is not None:
            raise self._failed
        pending = self._pending
        if not pending:
            return
        self._pending = []
        try:
            await self._send(pending)
        except BaseException as exc:
            self._failed = exc
            raise

    async def _send(self, pending: list[_Queued]) -> None:
        own = self._own
        split = len(pending) if own < 0 else own
        if own >= 0:
            self._own = 0
        session = self._session
        others: list[tuple[str, Sequence[Any]]] = []
        i = 0
        while i < split:
            first = pending[i]
            sql, args = first.sql, first.args
            rows: list[Sequence[Any]] = list(args) if first.many else [args]
            j = i + 1
            while j < split and (q := pending[j]).sql == sql:
                if q.many:
                    rows.extend(q.args)
                else:
                    rows.append(q.args)
                j += 1
            if len(rows) >= RUN:
                if others:
                    await session.execute_all(others)
                    others = []
                await session.executemany(sql, rows)
            else:
                others.extend((sql, row) for row in rows)
            i = j
        if others:
            await session.execute_all(others)
        if split < len(pending):
            self._direct = True
            for q in pending[split:]:
                if q.many:
                    await session.executemany(q.sql, q.args)
                else:
                    q.count = await session.execute(q.sql, *q.args)


class BatchContext(ProjectionContext):
    """The context handlers get when their writes are batched: ``execute`` queues on the
    :class:`BatchSession` directly (one coroutine per statement, the per-event hot path);
    everything else goes through the session as in :class:`ProjectionContext`."""

    __slots__ = ("_batch",)

    def __init__(self, batch: BatchSession, generation: int, tables: Mapping[str, str]) -> None:
        super().__init__(batch, generation, tables)
        self._batch = batch

    async def execute(self, sql: str, *params: Any) -> int:
        """Queue a statement (``?`` placeholders); see :meth:`BatchSession.execute`."""
        batch = self._batch
        if batch._direct:
            return await batch._session.execute(sql, *params)
        for p in params:
            if type(p) is _Queued:
                params = _resolved(params)
                break
        queued = _Queued(sql, params, False, batch)
        batch._pending.append(queued)
        return queued  # type: ignore[return-value] # an int when used (see the module)
