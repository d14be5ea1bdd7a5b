"""PostgreSQL, everything of it: the event log and unit of work, write connections, DDL, the
idempotency backend and the read database. Needs the ``postgres`` extra (asyncpg).

* :class:`PostgresEventStore` / :class:`PostgresUnitOfWork` — :mod:`cqrskit.postgres.eventlog`
  (the unit of work's commit in ``_unitofwork``, write connections in ``_connections``, the
  readable horizon's SQL in ``_horizon``, SQL text and DDL in ``_sql``);
* :class:`PostgresReadDatabase` / :class:`PostgresSession` — :mod:`cqrskit.postgres.readdb`;
* :class:`PostgresIdempotencyBackend` and :func:`postgres_idempotency_ddl` —
  :mod:`cqrskit.postgres.idempotency`;
* :class:`PostgresReplicaRouter` (queries on streaming replicas, mode 4) —
  :mod:`cqrskit.postgres.replica` (probes and pools in ``_replica_nodes``, token routing in
  ``_replica_tokens``).
"""

from cqrskit.postgres._sql import SCHEMA_VERSION, postgres_ddl
from cqrskit.postgres.eventlog import PostgresEventStore, PostgresUnitOfWork
from cqrskit.postgres.idempotency import (
    PostgresIdempotencyBackend,
    SessionIdempotencyBackend,
    postgres_idempotency_ddl,
)
from cqrskit.postgres.readdb import PostgresReadDatabase, PostgresSession
from cqrskit.postgres.replica import PostgresReplicaRouter, ReplicaStatus, RouterStatus

__all__ = [
    "SCHEMA_VERSION",
    "PostgresEventStore",
    "PostgresIdempotencyBackend",
    "PostgresReadDatabase",
    "PostgresReplicaRouter",
    "PostgresSession",
    "PostgresUnitOfWork",
    "ReplicaStatus",
    "RouterStatus",
    "SessionIdempotencyBackend",
    "postgres_ddl",
    "postgres_idempotency_ddl",
]
