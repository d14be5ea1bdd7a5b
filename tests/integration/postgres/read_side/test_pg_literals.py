"""PostgresSession.execute_all writes several statements as one string of typed literals:
what the server stores must equal what it stores from bound parameters, value for value,
and what cannot be written as a literal must behave exactly as through asyncpg."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from cqrskit.postgres import PostgresReadDatabase
from cqrskit.postgres.readdb import PostgresSession

pytestmark = pytest.mark.postgres

COLUMNS = {
    "i2": "int2",
    "i4": "int4",
    "i8": "int8",
    "f8": "float8",
    "num": "numeric",
    "b": "bool",
    "t": "text",
    "vc": "varchar(40)",
    "ch": "char(5)",
    "j": "json",
    "jb": "jsonb",
    "u": "uuid",
    "by": "bytea",
    "d": "date",
    "ts": "timestamp",
    "tz": "timestamptz",
}
UTC = dt.UTC
ROWS: list[dict[str, Any]] = [
    {
        "i2": -32768,
        "i4": 2**31 - 1,
        "i8": -(2**63),
        "f8": 0.1,
        "num": Decimal("-12345678901234567890.000000000123"),
        "b": True,
        "t": "it's \\ a 'quote' -- not a comment /* nor this */ $1 ? $$ é 😀",
        "vc": "",
        "ch": "ab",
        "j": '{"a": [1, 2, "x\'y"]}',
        "jb": '{"k": "v\\\\n"}',
        "u": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "by": b"\x00\x01'\\\xff",
        "d": dt.date(1999, 12, 31),
        "ts": dt.datetime(2024, 2, 29, 23, 59, 59, 999999),
        "tz": dt.datetime(
            2024, 1, 1, 12, 0, 0, 1, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))
        ),
    },
    {
        "i2": 7,
        "i4": -1,
        "i8": 2**63 - 1,
        "f8": float("inf"),
        "num": 10**30,
        "b": False,
        "t": "\n\t\r",
        "vc": "x" * 40,
        "ch": "abcde",
        "j": "null",
        "jb": "[]",
        "u": uuid.uuid4(),
        "by": b"",
        "d": dt.date(1, 1, 1),
        "ts": dt.datetime(1970, 1, 1),
        "tz": dt.datetime(2000, 6, 1, tzinfo=UTC),
    },
    dict.fromkeys(COLUMNS) | {"i8": 3, "f8": float("-inf")},
    dict.fromkeys(COLUMNS) | {"i8": 4, "f8": float("nan")},
    dict.fromkeys(COLUMNS) | {"i8": 5, "f8": 1e-310, "num": 0},  # subnormal
    dict.fromkeys(COLUMNS) | {"i8": 6, "f8": 12345678901234567891},  # int to float8
]


@pytest.fixture
async def session_factory(
    postgres_dsn: str, schemas: Callable[[str], str]
) -> AsyncIterator[PostgresReadDatabase]:
    db = PostgresReadDatabase(postgres_dsn, schema=schemas("lit"))
    cols = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
    async with db.transaction() as s:
        for table in ("bound", "literal"):
            await s.execute(f"CREATE TABLE {table} (seq serial, {cols})")
    yield db
    await db.close()


def insert(table: str, row: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
    names = list(COLUMNS)
    sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"
    return sql, tuple(row.get(n) for n in names)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


async def test_literals_store_what_parameters_store(session_factory: PostgresReadDatabase) -> None:
    db = session_factory
    async with db.transaction() as s:
        assert isinstance(s, PostgresSession)
        for row in ROWS:
            sql, params = insert("bound", row)
            await s.execute(sql, *params)
        # interleaved with another statement so that nothing groups: one string
        script = []
        for row in ROWS:
            script.append(insert("literal", row))
            script.append(("SELECT 1 WHERE ? > 0", (1,)))
        sent: list[str] = []
        real_execute = s._conn.execute

        async def spy(query: str, *args: Any) -> Any:
            sent.append(query)
            return await real_execute(query, *args)

        s._conn = _Spy(s._conn, spy)
        await s.execute_all(script)
    # everything above went as one string of literals
    assert len(sent) == 1
    assert sent[0].count("INSERT INTO") == len(ROWS)
    async with db.read_only() as s:
        cols = ", ".join(COLUMNS)
        bound = await s.fetchall(f"SELECT {cols} FROM bound ORDER BY seq")
        literal = await s.fetchall(f"SELECT {cols} FROM literal ORDER BY seq")
    assert len(bound) == len(literal) == len(ROWS)
    for b, lit in zip(bound, literal, strict=True):
        for name, x, y in zip(COLUMNS, b, lit, strict=True):
            assert same(x, y), (name, x, y)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("tz", dt.datetime(2024, 1, 1, 12)),  # naive for timestamptz: asyncpg's own rule
        ("ts", dt.datetime(2024, 1, 1, tzinfo=UTC)),  # aware for timestamp: refused
        ("t", 5),  # int for text: refused by asyncpg
        ("t", "a\x00b"),  # NUL: refused by the server
        ("i4", 2**40),  # out of range
        ("i8", True),  # bool for int8: asyncpg takes it as 1
        ("d", dt.datetime(2024, 1, 1, 9)),  # datetime for date: asyncpg takes the date
        ("u", "12345678-1234-5678-1234-567812345678"),  # str for uuid
        ("num", 1.5),  # float for numeric
    ],
)
async def test_values_without_a_literal_behave_as_through_asyncpg(
    session_factory: PostgresReadDatabase, column: str, value: Any
) -> None:
    db = session_factory
    row = {"i8": 1, column: value}

    async def outcome(table: str, together: bool) -> Any:
        try:
            async with db.transaction() as s:
                # not UTC: a naive datetime read in the session's zone would show
                await s.execute("SET LOCAL TIME ZONE 'Asia/Kolkata'")
                if together:
                    await s.execute_all([insert(table, row), ("SELECT 1 WHERE ? > 0", (1,))])
                else:
                    sql, params = insert(table, row)
                    await s.execute(sql, *params)
            async with db.read_only() as s:
                return ("stored", tuple(await s.fetchone(f"SELECT {column} FROM {table}") or ()))
        except Exception as exc:  # the outcome compared is the error's type
            return ("error", type(exc).__name__)

    assert await outcome("literal", True) == await outcome("bound", False)


async def test_statement_errors_are_the_servers_own(session_factory: PostgresReadDatabase) -> None:
    db = session_factory
    with pytest.raises(asyncpg.NumericValueOutOfRangeError):
        async with db.transaction() as s:
            await s.execute_all(
                [
                    insert("literal", {"i8": 1}),
                    ("SELECT 1 / (? - 1)::int2 * 100000", (2,)),
                    ("SELECT (? * 1000)::int2", (1000,)),
                ]
            )


class _Spy:
    """Forwards to an asyncpg connection, except ``execute``."""

    def __init__(self, conn: Any, execute: Any) -> None:
        self._conn = conn
        self.execute = execute

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)
