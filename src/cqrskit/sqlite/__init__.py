"""SQLite, everything of it: the embedded default event log and unit of work, DDL, the
idempotency backend and the read database (standard library ``sqlite3``; no extra).

* :class:`SqliteEventStore` / :class:`SqliteUnitOfWork` — :mod:`cqrskit.sqlite.eventlog`,
  and its background :class:`WalCheckpointer`;
* :class:`SqliteReadDatabase` / :class:`SqliteSession` — :mod:`cqrskit.sqlite.readdb`;
* :class:`SqliteIdempotencyBackend` and :func:`sqlite_idempotency_ddl` —
  :mod:`cqrskit.sqlite.idempotency`.
"""

from cqrskit.sqlite._checkpoint import WalCheckpointer
from cqrskit.sqlite.eventlog import SCHEMA_VERSION, SqliteEventStore, SqliteUnitOfWork, sqlite_ddl
from cqrskit.sqlite.idempotency import SqliteIdempotencyBackend, sqlite_idempotency_ddl
from cqrskit.sqlite.readdb import SqliteReadDatabase, SqliteSession

__all__ = [
    "SCHEMA_VERSION",
    "SqliteEventStore",
    "SqliteIdempotencyBackend",
    "SqliteReadDatabase",
    "SqliteSession",
    "SqliteUnitOfWork",
    "WalCheckpointer",
    "sqlite_ddl",
    "sqlite_idempotency_ddl",
]
