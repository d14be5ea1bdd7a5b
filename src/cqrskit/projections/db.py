"""The read-database port: sessions (one connection inside a transaction) and databases.

Projection handlers, the projector's bookkeeping and query handlers all talk to a read
database through a :class:`Session`. SQL uses ``?`` placeholders everywhere; the PostgreSQL
adapter rewrites them to ``$1, $2 ...`` (once per distinct statement), so the same
projection code runs on SQLite and PostgreSQL. What the bookkeeping needs beyond portable
SQL (row locks, an advisory lock, the two-argument maximum ...) each database spells in its
:class:`SqlFlavor`, which its sessions carry (``session.flavor``): the side-neutral code
asks the flavor, never the database's name.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, Literal, Self

from cqrskit.errors import ConfigurationError

__all__ = [
    "Dialect",
    "ReadDatabase",
    "Session",
    "SqlFlavor",
    "check_identifier",
    "quote",
    "to_dollar",
]

Dialect = Literal["sqlite", "postgres"]
# the built-in databases' names (kept for imports of earlier releases): ``dialect`` is any
# ``str`` naming the database, for messages; what differs in its SQL is its SqlFlavor
Row = Sequence[Any]

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # fullmatch: "$" accepts a final newline
_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?")
_dollar_cache: dict[str, str] = {}


def check_identifier(name: str, what: str = "identifier") -> str:
    """Return ``name`` if it is a safe SQL identifier (``^[a-z_][a-z0-9_]{0,62}$``).

    Raises:
        ConfigurationError: the name would need quoting tricks or is too long.
    """
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        raise ConfigurationError(
            f"invalid {what} {name!r}.",
            hint="use lowercase letters, digits and '_' only, starting with a letter or '_', "
            "at most 63 characters.",
        )
    return name


def quote(name: str) -> str:
    """Quote a validated identifier for SQL."""
    return f'"{check_identifier(name)}"'


def to_dollar(sql: str) -> str:
    """Rewrite ``?`` placeholders (outside quoted text) to PostgreSQL's ``$n``."""
    out = _dollar_cache.get(sql)
    if out is not None:
        return out
    counter = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal counter
        if m.group(0) != "?":
            return m.group(0)
        counter += 1
        return f"${counter}"

    out = _TOKENS.sub(repl, sql)
    if len(_dollar_cache) < 4096:
        _dollar_cache[sql] = out
    return out


class SqlFlavor(ABC):
    """How one database spells what the read side's bookkeeping needs beyond portable SQL.

    A technology package supplies one (``cqrskit.postgres.readdb.PostgresFlavor``,
    ``cqrskit.sqlite.readdb.SqliteFlavor``) as the ``flavor`` of its :class:`Session` and
    :class:`ReadDatabase`; the side-neutral modules (checkpoints, leases, partitions, the
    rebuild's switch) build their statements from it. A row-lock suffix is appended to a
    ``SELECT``; it is ``""`` on a database whose write transaction already holds every lock
    a statement could take (SQLite's ``BEGIN IMMEDIATE`` holds the file's write lock).
    """

    __slots__ = ()

    greatest: ClassVar[str]
    """The SQL function returning the larger of two values (``GREATEST``, SQLite's ``max``)."""

    for_share: ClassVar[str]
    """Suffix locking the selected rows against writers until the transaction ends
    (``" FOR SHARE"``), or ``""``."""

    for_update: ClassVar[str]
    """Suffix locking the selected rows for an update (``" FOR UPDATE"``), or ``""``."""

    for_no_key_update: ClassVar[str]
    """Suffix locking the selected rows for an update that changes no key (``" FOR NO KEY
    UPDATE"``: foreign-key checks of other transactions are not blocked), or ``""``."""

    skip_locked: ClassVar[str | None]
    """Suffix locking the selected rows for an update and leaving out the rows another
    transaction holds a lock on (``" FOR UPDATE SKIP LOCKED"``); ``None`` where a row
    cannot be locked by another transaction while this one writes (the statements are
    then written without the sub-select it needs)."""

    batches_statements: ClassVar[bool]
    """Whether sending a transaction's statements together saves round trips (a server):
    inline projections then queue their handlers' writes (see
    :mod:`cqrskit.projections.batch`); in-process SQLite runs them as issued."""

    @abstractmethod
    def advisory_lock(self, key: int) -> str | None:
        """A statement taking the transaction-scoped lock ``key`` (held until the
        transaction ends; serializes, say, concurrent installs of the bookkeeping tables),
        or ``None`` where the write transaction is already exclusive."""

    @abstractmethod
    def idle_limit(self, hold: float) -> tuple[str, str] | None:
        """A SQL expression with one ``?`` and its parameter which, evaluated in a
        transaction, has the server end the session if the transaction then sits idle for
        ``hold`` seconds (for this transaction only); ``None``: no such setting."""


class Session(ABC):
    """One read-database connection inside a transaction.

    Statements use ``?`` placeholders. Rows are sequences indexable by column position.
    A session that wraps another copies its ``dialect`` and ``flavor``.
    """

    dialect: str
    flavor: SqlFlavor

    @property
    @abstractmethod
    def connection(self) -> Any:
        """The driver connection (``sqlite3.Connection`` or ``asyncpg.Connection``)."""

    @abstractmethod
    async def execute(self, sql: str, *params: Any) -> int:
        """Run one statement; return the number of rows it changed (``-1`` if unknown)."""

    @abstractmethod
    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per parameter row."""

    async def execute_all(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Run ``(sql, params)`` statements in order, their row counts unused. A driver may
        send them together (the PostgreSQL session: one round trip)."""
        for sql, params in statements:
            await self.execute(sql, *params)

    @abstractmethod
    async def fetchall(self, sql: str, *params: Any) -> list[Row]:
        """Run a query and return every row."""

    async def fetchone(self, sql: str, *params: Any) -> Row | None:
        """Run a query and return its first row, or ``None``."""
        rows = await self.fetchall(sql, *params)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *params: Any) -> Any:
        """Run a query and return the first column of its first row, or ``None``."""
        row = await self.fetchone(sql, *params)
        return None if row is None else row[0]

    def qualify(self, name: str) -> str:
        """The quoted name of read-model table ``name`` (schema-qualified on PostgreSQL)."""
        return quote(name)

    @abstractmethod
    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """A nested transaction: rolled back alone if the block raises."""


class ReadDatabase(ABC):
    """A database holding read models, checkpoints, leases and dead letters.

    It may be the write database itself (another connection to the same SQLite file or
    PostgreSQL database) or a separate one. Its sessions have its ``dialect`` and
    ``flavor``.
    """

    dialect: str
    flavor: SqlFlavor
    routes_tokens: ClassVar[bool] = False
    """``True`` for a database that chooses the server of each read-only session (a
    replica router): the :class:`~cqrskit.projections.ConsistencyGate` then hands it the
    query's resolved :class:`~cqrskit.projections.consistency.TokenRequest` (in the
    context's ``ReadAfter.request``) instead of waiting itself."""

    @abstractmethod
    def transaction(
        self, *, lock_timeout: float | None = None, hold: float | None = None
    ) -> AbstractAsyncContextManager[Session]:
        """A read-write transaction (committed when the block exits normally).

        ``lock_timeout``: the longest its statements wait for another transaction's lock
        (seconds; ``None``: the database's default), after which they raise the driver's
        lock error — which :func:`~cqrskit.projections.apply.infrastructure_fault` knows.

        ``hold``: the longest the transaction may sit idle between statements (seconds;
        ``None``: no limit). A holder that freezes mid-transaction (SIGSTOP, a stalled
        host) then cannot keep its row locks: the server ends its session and the
        transaction never commits. PostgreSQL only (``idle_in_transaction_session_timeout``
        for this transaction); databases without such a setting ignore it.
        """

    @abstractmethod
    def read_only(self) -> AbstractAsyncContextManager[Session]:
        """A read-only transaction for queries: a statement that writes fails loudly."""

    @abstractmethod
    def inline(self, connection: Any) -> Session:
        """Wrap a write-side driver connection that is already inside a transaction."""

    @abstractmethod
    async def close(self) -> None:
        """Close every connection this object opened."""

    async def __aenter__(self) -> Self:
        """``async with read_db:`` closes it when the block ends (an application's lifespan)."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def end_frozen_writer(self, host: str, pid: int) -> bool:
        """The last resort against a lease holder that froze holding the write lock.

        Called by a projector once a lease expired and its own attempt to take it could not
        get the database's write lock. Where one process's lock blocks every writer
        (SQLite's file lock) and process ``pid`` on ``host`` (this one's host) is the
        holder, end that process and return ``True``. The default does nothing: a server
        database ends such a session itself (see :func:`cqrskit.projections.schema.fence`).
        """
        return False

    async def session(self) -> AsyncIterator[Session]:
        """A scoped-dependency factory: a read-only session per dispatch.

        Register it with ``deps.scoped(ReadSession, read_db.session)``.
        """
        async with self.read_only() as s:
            yield s
