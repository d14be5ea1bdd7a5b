"""The projection API: a named set of event handlers maintaining read-model tables.

The same :class:`Projection` runs inline (inside the command's transaction) or
asynchronously (a projector tails the event log); the mode is configuration, not code.
Handlers receive the decoded event and a :class:`ProjectionContext`::

    balances = Projection("balances", tables={"accounts": (
        "CREATE TABLE {accounts} (id TEXT PRIMARY KEY, balance INTEGER NOT NULL)",
    )})

    @balances.on
    async def deposited(e: Deposited, ctx: ProjectionContext) -> None:
        await ctx.execute(
            f"INSERT INTO {ctx.table('accounts')} (id, balance) VALUES (?, ?) "
            "ON CONFLICT (id) DO UPDATE SET balance = balance + excluded.balance",
            e.account_id, e.amount,
        )

Tables are created per *generation* (``accounts__g1``, ``accounts__g2`` after a rebuild) and
a view named after the logical table (``accounts``) points at the active generation, so
queries read ``accounts`` and never notice a rebuild switching over.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, overload

from cqrskit.errors import RegistrationError, describe
from cqrskit.eventlog import StoredEvent
from cqrskit.messages import Event
from cqrskit.projections.db import Row, Session, check_identifier, quote

__all__ = ["Decoder", "Projection", "ProjectionContext", "physical_table"]

E = TypeVar("E", bound=Event)
Handler = Callable[[Any, "ProjectionContext"], Awaitable[None]]
F = TypeVar("F", bound=Callable[..., Awaitable[None]])

Decoder = Callable[[StoredEvent], Event]
"""Turns a stored event into an event object (e.g. ``serializer.decode_stored``)."""


def physical_table(table: str, generation: int) -> str:
    """The name of ``table``'s physical table in ``generation`` (``accounts__g2``)."""
    return f"{table}__g{generation}"


class ProjectionContext:
    """What a projection handler gets besides the event: the session and where it is.

    Attributes:
        session: the read-database session (inside the batch's or command's transaction).
        stored: the stored event being applied (``position``, ``stream``, ``version`` ...).
        generation: the generation being written.
    """

    __slots__ = ("session", "stored", "generation", "_tables")

    def __init__(self, session: Session, generation: int, tables: Mapping[str, str]) -> None:
        self.session = session
        self.generation = generation
        self._tables = tables
        self.stored: StoredEvent | None = None

    def table(self, name: str) -> str:
        """The quoted physical name of the projection's logical table ``name``."""
        try:
            return self._tables[name]
        except KeyError:
            raise RegistrationError(
                f"the projection has no table {name!r}; declared: {sorted(self._tables)}.",
                hint="declare it in Projection(..., tables={...}).",
            ) from None

    @property
    def connection(self) -> Any:
        """The driver connection, for what the session does not cover."""
        return self.session.connection

    def execute(self, sql: str, *params: Any) -> Awaitable[int]:
        """Run a statement (``?`` placeholders); see :meth:`Session.execute`.

        In a projector batch the statement is queued and sent with others (reads see it;
        see :mod:`cqrskit.projections.batch`); the row count returned becomes the number
        when used, and then the handler runs unbatched for that event and after."""
        return self.session.execute(sql, *params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Awaitable[None]:
        """See :meth:`Session.executemany`."""
        return self.session.executemany(sql, rows)

    def fetchall(self, sql: str, *params: Any) -> Awaitable[list[Row]]:
        """See :meth:`Session.fetchall`."""
        return self.session.fetchall(sql, *params)

    def fetchone(self, sql: str, *params: Any) -> Awaitable[Row | None]:
        """See :meth:`Session.fetchone`."""
        return self.session.fetchone(sql, *params)


class Projection:
    """A named set of event handlers that maintain read-model tables.

    Args:
        name: the projection's name (a SQL identifier); checkpoints are kept under it.
        tables: logical table name -> DDL statements; ``{table}`` placeholders in a
            statement (e.g. ``{accounts}``) become that generation's quoted physical name.
        ordered_streams: when an event is parked as poison, park the later events of its
            stream too (their handlers may rely on it); ``False`` parks only that event.
    """

    def __init__(
        self,
        name: str,
        *,
        tables: Mapping[str, Sequence[str]],
        ordered_streams: bool = True,
    ) -> None:
        self.name = check_identifier(name, "projection name")
        for table in tables:
            check_identifier(table, f"table name of projection {name!r}")
            check_identifier(physical_table(table, 999_999), "physical table name")
        self.tables: dict[str, tuple[str, ...]] = {t: tuple(d) for t, d in tables.items()}
        self.ordered_streams = ordered_streams
        self._handlers: dict[type, Handler] = {}

    def __repr__(self) -> str:
        return f"Projection({self.name!r})"

    @overload
    def on(self, handler: F, /) -> F: ...
    @overload
    def on(self, event_type: type[E], /) -> Callable[[F], F]: ...

    def on(self, target: Any, /) -> Any:
        """Register a handler ``async def h(event: SomeEvent, ctx: ProjectionContext)``.

        Use bare (the event type comes from the first parameter's annotation) or as
        ``@projection.on(SomeEvent)``. Handlers of base event types also receive subclasses.
        """
        if isinstance(target, type):
            event_type = target

            def register(func: F) -> F:
                self._add(event_type, func)
                return func

            return register
        self._add(self._event_type_of(target), target)
        return target

    def _event_type_of(self, func: Callable[..., Any]) -> type:
        params = list(inspect.signature(func).parameters.values())
        hints = typing.get_type_hints(func) if params else {}
        event_type = hints.get(params[0].name) if params else None
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            raise RegistrationError(
                f"projection {self.name!r}: handler {describe(func)} must annotate its first "
                "parameter with an Event subclass.",
                handler=func,
                hint="write: async def h(event: MyEvent, ctx: ProjectionContext) -> None",
            )
        return event_type

    def _add(self, event_type: type, func: Callable[..., Any]) -> None:
        if not inspect.iscoroutinefunction(func):
            raise RegistrationError(
                f"projection {self.name!r}: handler {describe(func)} must be an async def.",
                handler=func,
                hint="declare it with 'async def'.",
            )
        if event_type in self._handlers:
            raise RegistrationError(
                f"projection {self.name!r} already has a handler for {describe(event_type)}.",
                message_type=event_type,
                handler=func,
                hint="one handler per event type per projection; combine the two.",
            )
        self._handlers[event_type] = func

    def handler_for(self, event_type: type) -> Handler | None:
        """The handler applying ``event_type`` (or its nearest registered base), if any."""
        handler = self._handlers.get(event_type)
        if handler is None:
            for base in event_type.__mro__[1:]:
                handler = self._handlers.get(base)
                if handler is not None:
                    break
        return handler

    @property
    def event_types(self) -> tuple[type, ...]:
        """The event types with a handler."""
        return tuple(self._handlers)

    def physical_tables(
        self, generation: int, qualify: Callable[[str], str] = quote
    ) -> dict[str, str]:
        """Logical table name -> quoted (and qualified) physical name in ``generation``."""
        return {t: qualify(physical_table(t, generation)) for t in self.tables}

    def ddl(self, generation: int, qualify: Callable[[str], str] = quote) -> list[str]:
        """The DDL statements creating ``generation``'s tables."""
        names = self.physical_tables(generation, qualify)
        return [stmt.format(**names) for stmts in self.tables.values() for stmt in stmts]
