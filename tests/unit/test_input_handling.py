"""Input handling (#10 §4): identifiers are matched whole, bad names are refused before
anything is opened, rejected values are never echoed, long keys are shortened."""

from __future__ import annotations

from typing import Any

import pytest

from cqrskit.errors import ConfigurationError
from cqrskit.eventlog import validate_identifier
from cqrskit.projections import Projection
from cqrskit.projections.db import check_identifier

NEWLINE_NAMES = ["x\n", "events\n", "a\r\n", "x\nx"]


@pytest.mark.parametrize("name", NEWLINE_NAMES)
def test_identifiers_with_a_newline_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError):
        validate_identifier(name, "schema name")
    with pytest.raises(ConfigurationError):
        check_identifier(name, "schema name")
    with pytest.raises(ConfigurationError):
        Projection(name, tables={})
    with pytest.raises(ConfigurationError):
        Projection("ok", tables={name: ()})


@pytest.mark.parametrize("name", NEWLINE_NAMES)
def test_postgres_names_with_a_newline_are_refused(name: str) -> None:
    pytest.importorskip("asyncpg")
    from cqrskit.postgres import PostgresReadDatabase, postgres_ddl, postgres_idempotency_ddl

    with pytest.raises(ConfigurationError):
        postgres_ddl(schema=name)
    with pytest.raises(ConfigurationError):
        postgres_ddl(table=name)
    with pytest.raises(ConfigurationError):
        postgres_idempotency_ddl(schema=name)
    with pytest.raises(ConfigurationError):
        PostgresReadDatabase("postgresql://127.0.0.1:1/none", schema=name)


@pytest.mark.parametrize("field", ["schema", "table"])
async def test_postgres_open_refuses_a_bad_name_before_creating_a_pool(
    field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    from cqrskit.postgres import PostgresEventStore

    pools: list[Any] = []

    async def create_pool(*args: Any, **kwargs: Any) -> Any:
        pools.append((args, kwargs))
        raise AssertionError("a pool must not be created for an invalid name")

    monkeypatch.setattr(asyncpg, "create_pool", create_pool)
    with pytest.raises(ConfigurationError, match=f"{field} name"):
        await PostgresEventStore.open("postgresql://127.0.0.1:1/none", **{field: "x\n"})
    assert pools == []


def test_sqlite_names_with_a_newline_are_refused(tmp_path: Any) -> None:
    from cqrskit.sqlite import SqliteEventStore, sqlite_ddl

    with pytest.raises(ConfigurationError):
        sqlite_ddl("x\n")
    with pytest.raises(ConfigurationError):
        SqliteEventStore(tmp_path / "a.db", table="x\n")
    assert not (tmp_path / "a.db").exists()
