"""The readable horizon of the PostgreSQL event log: the SQL of the appender lock and of the
reads that stop below the horizon. The proof that no row below it can still appear is in
the docstring of :mod:`cqrskit.postgres.eventlog`.

Appenders take a shared transaction-level advisory lock, keyed by the log's schema and table,
as the first statement of every transaction that may append (it rides in the ``BEGIN``
string, so it costs no round trip). Readers never take it: they look at ``pg_locks``, once
per read, and only when the snapshot lists running transactions at all.
"""

from __future__ import annotations

import zlib

# the first half of the advisory key: "CQRS" in ASCII; the second half is derived from the
# log's schema and table. Another lock with the same pair only makes readers wait longer.
_LOCK_CLASS = 0x43515253


def lock_key(schema: str, table: str) -> tuple[int, int]:
    """The advisory lock key of one event log: two int4 halves, both non-negative."""
    return _LOCK_CLASS, zlib.crc32(f"{schema}.{table}".encode()) & 0x7FFFFFFF


def lock_sql(key: tuple[int, int]) -> str:
    """The statement every appending transaction runs first (before it has an xid)."""
    return f"SELECT pg_advisory_xact_lock_shared({key[0]}, {key[1]})"


def _holds(alias: str, key: tuple[int, int]) -> str:
    return (
        f"{alias}.locktype = 'advisory' AND {alias}.classid = {key[0]} "
        f"AND {alias}.objid = {key[1]} AND {alias}.objsubid = 2 AND {alias}.database = "
        "(SELECT d.oid FROM pg_database d WHERE d.datname = current_database())"
    )


def horizon_cte(key: tuple[int, int], proven: str, server: str) -> str:
    """``WITH ... h(used, proven, server)``: ``used`` is the xid below which this statement
    may read: the snapshot's xmin, or ``proven`` (a bigint parameter: the horizon proven by
    an earlier statement) when that was proven on this very server (``server``, a
    timestamptz parameter compared with ``pg_postmaster_start_time()``: after a restart or
    a failover the xids an earlier statement saw may be handed out again) and does not
    exceed the snapshot's xmax. ``proven`` is the horizon this statement proves for the
    statements that start after it (see the proof in :mod:`cqrskit.postgres.eventlog`);
    ``server`` identifies the server that proved it.

    ``foreign_xids`` lists the transactions that hold an xid and not the appender lock;
    the lock table is read once (a materialized CTE), and only if the snapshot lists a
    running transaction. A standby shows no locks of the primary's transactions: there,
    the snapshot's xmin is the horizon, as before.
    """
    return (
        "WITH s AS MATERIALIZED (SELECT pg_is_in_recovery() AS standby, "
        "pg_postmaster_start_time() AS server, "
        "pg_snapshot_xmin(z.snap)::text::bigint AS xmin, "
        "pg_snapshot_xmax(z.snap)::text::bigint AS xmax, z.snap "
        "FROM (SELECT pg_current_snapshot() AS snap) z), "
        "l AS MATERIALIZED (SELECT locktype, virtualtransaction, transactionid, classid, "
        "objid, objsubid, database FROM pg_locks "
        "WHERE granted AND locktype IN ('transactionid', 'advisory')), "
        "foreign_xids AS (SELECT t.transactionid::text::bigint AS x FROM l t "
        "WHERE t.locktype = 'transactionid' AND NOT EXISTS (SELECT 1 FROM l a "
        f"WHERE a.virtualtransaction = t.virtualtransaction AND {_holds('a', key)})), "
        f"h AS (SELECT CASE WHEN {server} = s.server AND {proven} <= s.xmax "
        f"THEN greatest({proven}, s.xmin) ELSE s.xmin END AS used, "
        "CASE WHEN s.standby THEN s.xmin ELSE coalesce((SELECT min(x::text::bigint) "
        "FROM pg_snapshot_xip(s.snap) AS x WHERE (x::text::bigint % 4294967296) "
        "NOT IN (SELECT f.x FROM foreign_xids f)), s.xmax) END AS proven, s.server FROM s) "
    )


def appenders_sql(key: tuple[int, int]) -> str:
    """The sessions holding the appender lock and an xid, oldest xid first."""
    return (
        "SELECT a.pid, sa.backend_xid::text::bigint, "
        "extract(epoch FROM clock_timestamp() - sa.xact_start)::float8, sa.state "
        "FROM pg_locks a JOIN pg_stat_activity sa ON sa.pid = a.pid "
        f"WHERE a.granted AND {_holds('a', key)} AND sa.backend_xid IS NOT NULL "
        "ORDER BY age(sa.backend_xid) DESC, a.pid"
    )
