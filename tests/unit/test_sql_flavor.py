"""The SQL each database's flavor gives the side-neutral read side (projections/db.py).

The statements below are the ones the bookkeeping sent before the flavor existed, when
``schema.py`` branched on the database's name: the flavor must not change a byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from cqrskit.postgres.readdb import PostgresFlavor, PostgresReadDatabase, PostgresSession
from cqrskit.postgres.replica import PostgresReplicaRouter
from cqrskit.projections import schema
from cqrskit.projections.db import SqlFlavor
from cqrskit.sqlite.readdb import SqliteFlavor, SqliteReadDatabase, SqliteSession


class _Recorder:
    """Enough of a session for the bookkeeping functions: records each statement."""

    def __init__(self, flavor: SqlFlavor) -> None:
        self.flavor = flavor
        self.sent: list[tuple[str, Sequence[Any]]] = []

    async def execute(self, sql: str, *params: Any) -> int:
        self.sent.append((sql, params))
        return 1

    async def fetchone(self, sql: str, *params: Any) -> tuple[int]:
        self.sent.append((sql, params))
        return (1,)


def test_each_technology_carries_its_flavor_on_sessions_and_databases() -> None:
    assert isinstance(PostgresSession.flavor, PostgresFlavor)
    assert PostgresReadDatabase.flavor is PostgresSession.flavor
    assert PostgresReplicaRouter.flavor is PostgresSession.flavor
    assert isinstance(SqliteSession.flavor, SqliteFlavor)
    assert SqliteReadDatabase.flavor is SqliteSession.flavor


def test_the_postgres_flavor() -> None:
    f = PostgresFlavor()
    assert (f.greatest, f.for_share, f.for_update, f.for_no_key_update, f.skip_locked) == (
        "GREATEST",
        " FOR SHARE",
        " FOR UPDATE",
        " FOR NO KEY UPDATE",
        " FOR UPDATE SKIP LOCKED",
    )
    assert f.batches_statements is True
    assert f.advisory_lock(7263541) == "SELECT pg_advisory_xact_lock(7263541)"
    expr = "set_config('idle_in_transaction_session_timeout', ?, true)"
    assert f.idle_limit(2.5) == (expr, "2500")
    assert f.idle_limit(0.0001) == (expr, "1")  # never 0, which would mean no limit


def test_the_sqlite_flavor() -> None:
    f = SqliteFlavor()
    assert (f.greatest, f.for_share, f.for_update, f.for_no_key_update, f.skip_locked) == (
        "max",
        "",
        "",
        "",
        None,
    )
    assert f.batches_statements is False
    assert f.advisory_lock(7263541) is None
    assert f.idle_limit(2.5) is None


_FENCE = "FROM cqrskit_projections WHERE name = ? AND lease_epoch = ?"
_BEAT = (
    "UPDATE cqrskit_projections SET lease_beat = lease_beat + 1 WHERE name = ? AND lease_epoch = ?"
)
_IDLE = "set_config('idle_in_transaction_session_timeout', ?, true)"


@pytest.mark.parametrize(
    ("flavor", "hold", "beat", "expected"),
    [
        (PostgresFlavor(), 1.5, True, (f"{_BEAT} RETURNING {_IDLE}", ("p", 3, "1500"))),
        (PostgresFlavor(), None, True, (_BEAT, ("p", 3))),
        (
            PostgresFlavor(),
            1.5,
            False,
            (f"SELECT {_IDLE} {_FENCE} FOR NO KEY UPDATE", ("1500", "p", 3)),
        ),
        (PostgresFlavor(), None, False, (f"SELECT 1 {_FENCE} FOR NO KEY UPDATE", ("p", 3))),
        (SqliteFlavor(), 1.5, True, (_BEAT, ("p", 3))),
        (SqliteFlavor(), None, False, (f"SELECT 1 {_FENCE}", ("p", 3))),
        (SqliteFlavor(), 1.5, False, (f"SELECT 1 {_FENCE}", ("p", 3))),
    ],
)
async def test_the_fence_statements_are_unchanged(
    flavor: SqlFlavor, hold: float | None, beat: bool, expected: tuple[str, Sequence[Any]]
) -> None:
    s = _Recorder(flavor)
    assert await schema.fence(s, "p", 3, hold=hold, beat=beat)  # type: ignore[arg-type]
    assert s.sent == [expected]


@pytest.mark.parametrize(
    ("flavor", "lock", "greatest"),
    [
        (PostgresFlavor(), ["SELECT pg_advisory_xact_lock(7263541)"], "GREATEST"),
        (SqliteFlavor(), [], "max"),
    ],
)
async def test_install_and_the_checkpoint_statements_are_unchanged(
    flavor: SqlFlavor, lock: list[str], greatest: str
) -> None:
    s = _Recorder(flavor)
    await schema.install(s)  # type: ignore[arg-type]
    sent = [sql for sql, _ in s.sent]
    assert sent[: len(lock)] == lock
    assert len(sent) == len(lock) + len(schema.DDL)
    s.sent.clear()
    await schema.set_checkpoint(s, "p", 2, 9)  # type: ignore[arg-type]
    assert s.sent[0][0] == (
        f"UPDATE cqrskit_checkpoints SET position = {greatest}(position, ?), updated_at = ? "
        "WHERE projection = ? AND generation = ?"
    )
