"""The PostgreSQL driver passes the conformance kit; plus DDL, literals and the token path."""

from __future__ import annotations

import asyncio
import json
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from cqrskit.errors import ConcurrencyError, ConfigurationError, PersistenceError
from cqrskit.eventlog import EventStore, UnitOfWork
from cqrskit.messages import Metadata
from cqrskit.postgres import PostgresEventStore, PostgresUnitOfWork, postgres_ddl
from cqrskit.postgres._sql import _literal
from cqrskit.testing.eventlog import Deposited, EventStoreConformance, Opened, wait_visible

pytestmark = pytest.mark.postgres


class TestPostgresEventStore(EventStoreConformance):
    @pytest.fixture(autouse=True)
    def _db(self, postgres_dsn: str, pg_schema: str) -> None:
        self.dsn = postgres_dsn
        self.schema = pg_schema

    async def make_store(self) -> EventStore:
        store = await PostgresEventStore.open(self.dsn, schema=self.schema, max_size=8)
        async with store.pool.acquire() as conn:
            await conn.execute(f'CREATE TABLE "{self.schema}".state (key text NOT NULL)')
        return store

    async def close_store(self, store: EventStore) -> None:
        assert isinstance(store, PostgresEventStore)
        await store.close()

    async def write_state(self, uow: UnitOfWork, key: str) -> None:
        assert isinstance(uow, PostgresUnitOfWork)
        await uow.connection.execute(f'INSERT INTO "{self.schema}".state VALUES ($1)', key)

    async def state_keys(self, store: EventStore) -> set[str]:
        assert isinstance(store, PostgresEventStore)
        async with store.pool.acquire() as conn:
            rows = await conn.fetch(f'SELECT key FROM "{self.schema}".state')
        return {r[0] for r in rows}


async def test_one_round_trip_path_stores_tricky_literals(
    postgres_dsn: str, pg_schema: str
) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema)
    try:
        tricky = 'o\'brien \\ $$ ; COMMIT; -- \u00e9\u2603 "q"'
        uow = await store.begin(positions=False)
        uow.record(tricky, Opened(tricky, tricky), expected_version=0)
        uow.record("s2", Deposited("s2", -5))
        assert await uow.commit() is None
        async with store.pool.acquire() as conn:
            await wait_visible(
                store,
                await conn.fetchval(f'SELECT max(position) FROM "{pg_schema}".cqrskit_events'),
            )
        events = await store.read_after(0)
        assert [(e.stream, e.version) for e in events] == [(tricky, 1), ("s2", 1)]
        assert json.loads(events[0].data) == {"account": tricky, "owner": tricky}
        assert events[0].position < events[1].position
        bad = await store.begin(positions=False)
        bad.record("nul\x00", Opened("x", "y"))
        with pytest.raises(PersistenceError, match="NUL"):
            await bad.commit()
        conflict = await store.begin(positions=False)
        conflict.record(tricky, Opened(tricky, "again"), expected_version=0)
        with pytest.raises(ConcurrencyError) as info:
            await conflict.commit()
        assert (info.value.stream, info.value.expected_version) == (tricky, 0)
        assert info.value.actual_version == 1
        assert [e.version for e in await store.read_stream(tricky)] == [1]
    finally:
        await store.close()


async def test_literals_stay_literal_when_a_session_turns_off_standard_strings(
    postgres_dsn: str, pg_schema: str
) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema)
    try:
        sneaky = "ends with a backslash \\"
        uow = await store.begin(positions=False)
        assert isinstance(uow, PostgresUnitOfWork)
        # a handler may change the session: the rendering must not depend on it
        await uow.connection.execute("SET LOCAL standard_conforming_strings = off")
        uow.record(sneaky, Opened(sneaky, "x'); DROP TABLE t; --"), expected_version=0)
        assert await uow.commit() is None
        async with store.pool.acquire() as conn:
            await wait_visible(
                store,
                await conn.fetchval(f'SELECT max(position) FROM "{pg_schema}".cqrskit_events'),
            )
        [event] = await store.read_after(0)
        assert event.stream == sneaky
        assert json.loads(event.data) == {"account": sneaky, "owner": "x'); DROP TABLE t; --"}
        with pytest.raises(PersistenceError, match="cannot store a int"):
            _literal(42)  # type: ignore[arg-type]
        with pytest.raises(PersistenceError, match="lone surrogate"):
            _literal("\ud800")
    finally:
        await store.close()


class Sneaky(str):
    """A str subclass: its text could differ from what formatting it produces."""


def test_a_literal_is_plain_only_when_nothing_needs_escaping() -> None:
    assert _literal("acc-1") == "'acc-1'"
    assert _literal('{"a": [1, "$$ ; --"]}') == """'{"a": [1, "$$ ; --"]}'"""
    assert _literal("o'brien") == "E'o''brien'"
    assert _literal("a\\b") == "E'a\\\\b'"
    assert _literal("caf\u00e9") == "E'caf\u00e9'"
    with pytest.raises(PersistenceError, match="NUL"):
        _literal("a\x00b")
    with pytest.raises(PersistenceError, match="cannot store a Sneaky"):
        _literal(Sneaky("plain"))


TRICKY = ["plain", "o'brien", "back\\slash", "caf\u00e9 \u2603", "x'); DROP TABLE t; --", "\\'"]


@pytest.mark.parametrize("where", ["stream", "data", "ids"])
async def test_a_one_event_commit_stores_every_value_exactly(
    postgres_dsn: str, pg_schema: str, where: str
) -> None:
    # one event takes the prepared statement's path, with its own rendering of the values;
    # every other command turns standard_conforming_strings off in its session
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema)
    try:
        for i, value in enumerate(TRICKY):
            stream = value if where == "stream" else f"s{i}"
            ids = Metadata(message_id=value, correlation_id=value + "!") if where == "ids" else None
            uow = await store.begin(ids, positions=False)
            assert isinstance(uow, PostgresUnitOfWork)
            if i % 2:
                await uow.connection.execute("SET LOCAL standard_conforming_strings = off")
            uow.record(stream, Opened(value if where == "data" else "a", "o"), expected_version=0)
            assert await uow.commit() is None
            [event] = await store.read_stream(stream)
            assert event.stream == stream
            assert json.loads(event.data)["account"] == (value if where == "data" else "a")
            if where == "ids":
                assert event.metadata["message_id"] == value + "-0"
                assert event.metadata["correlation_id"] == value + "!"
                assert event.metadata["causation_id"] == value
        refused = await store.begin(positions=False)
        refused.record(Sneaky("s-sneaky"), Opened("a", "o"), expected_version=0)
        with pytest.raises(PersistenceError, match="cannot store a Sneaky"):
            await refused.commit()
        assert await store.read_stream("s-sneaky") == []
    finally:
        await store.close()


async def test_positions_derive_from_the_transaction_id(postgres_dsn: str, pg_schema: str) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema)
    try:
        uow = await store.begin()
        assert isinstance(uow, PostgresUnitOfWork)
        xid = int(await uow.connection.fetchval("SELECT pg_current_xact_id()::text"))
        uow.record("a", Opened("a", "x"), Deposited("a", 1))
        uow.record("b", Opened("b", "x"))
        last = await uow.commit()
        assert last is not None
        await wait_visible(store, last)
        events = await store.read_after(0)
        assert [e.position for e in events] == [xid << 20, (xid << 20) + 1, (xid << 20) + 2]
        assert last == (xid << 20) + 2
    finally:
        await store.close()


def test_ddl_names_are_validated_and_quoted() -> None:
    ddl = postgres_ddl("app", "events")
    assert 'CREATE TABLE IF NOT EXISTS "app"."events"' in ddl
    assert "UNIQUE INDEX" in ddl
    for schema, table in [("App", "events"), ("app", "ev; drop"), ("1a", "x")]:
        with pytest.raises(ConfigurationError):
            postgres_ddl(schema, table)


async def test_own_migrations_then_no_create(postgres_dsn: str, pg_schema: str) -> None:
    with pytest.raises(ConfigurationError, match="postgres_ddl"):
        await PostgresEventStore.open(postgres_dsn, schema=pg_schema, create_tables=False)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(postgres_ddl(pg_schema, "own_events"))
    finally:
        await conn.close()
    store = await PostgresEventStore.open(
        postgres_dsn, schema=pg_schema, table="own_events", create_tables=False
    )
    try:
        uow = await store.begin()
        uow.record("s", Opened("s", "x"))
        last = await uow.commit()
        assert last is not None
        await wait_visible(store, last)
        assert last == await store.head()
    finally:
        await store.close()


async def test_notify_wakes_a_reader_of_another_store(postgres_dsn: str, pg_schema: str) -> None:
    """With notify=True, a reader in another process (here: another store) wakes at once."""
    writer = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, notify=True)
    reader = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, notify=True)
    try:
        assert await reader.wait_for(0, 0.01) is False  # starts the listener
        waiting = asyncio.ensure_future(reader.wait_for(0, 30))
        uow = await writer.begin(positions=False)
        uow.record("n", Opened("n", "x"))
        await uow.commit()
        assert await asyncio.wait_for(waiting, 30) is True
    finally:
        await writer.close()
        await reader.close()


async def test_write_connections_queue_and_recover(postgres_dsn: str, pg_schema: str) -> None:
    """With one write connection, a second unit of work waits; a broken one is replaced."""
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, max_size=1)
    try:
        first = await store.begin()
        second = asyncio.ensure_future(store.begin())
        await asyncio.sleep(0)
        assert not second.done()
        first.record("q", Opened("q", "1"))
        await first.commit()
        uow = await asyncio.wait_for(second, 10)
        assert isinstance(uow, PostgresUnitOfWork)
        assert uow.connection is first.connection  # reused, not reopened
        third = asyncio.ensure_future(store.begin())
        await asyncio.sleep(0)
        uow.connection.terminate()  # the server connection is lost mid-transaction
        await uow.rollback()
        replacement = await asyncio.wait_for(third, 10)
        assert replacement.connection is not uow.connection
        replacement.record("q", Deposited("q", 2))
        assert await replacement.commit() is not None
        assert [e.version for e in await store.read_stream("q")] == [1, 2]
    finally:
        await store.close()


async def test_one_round_trip_path_writes_what_the_returning_path_writes(
    postgres_dsn: str, pg_schema: str
) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema)
    try:
        for round_ in (1, 2):
            for positions in (True, False):
                md = Metadata(message_id=f"it's {round_} {positions}", correlation_id="c'o")
                uow = await store.begin(md, positions=positions)
                a, b = f"a-{positions}", f"b-{positions}"
                if round_ == 1:
                    uow.record(a, Opened(a, "o"), expected_version=0)
                    uow.record(a, Deposited(a, 1), Deposited(a, 2))
                    uow.record(b, Deposited(b, 3))
                else:  # existing streams: an expected version, then none
                    uow.record(a, Deposited(a, 4), expected_version=3)
                    uow.record(b, Deposited(b, 5), Deposited(b, 6))
                await uow.commit()
        await wait_visible(store, await store.last_position())
        by_path: dict[bool, list[tuple[object, ...]]] = {True: [], False: []}
        for e in await store.read_after(0):
            path = e.stream.endswith("True")
            md = dict(e.metadata)
            assert md.pop("message_id").startswith("it's ")
            assert md.pop("timestamp")
            assert md.pop("causation_id").endswith(str(path))
            data = json.loads(e.data)
            data["account"] = data["account"][:1]
            by_path[path].append((e.stream[:1], e.version, e.type, e.schema_version, data, md))
        assert by_path[True] == by_path[False]
        assert [row[:2] for row in by_path[False]] == [
            ("a", 1),
            ("a", 2),
            ("a", 3),
            ("b", 1),
            ("a", 4),
            ("b", 2),
            ("b", 3),
        ]
        for e in await store.read_after(0):
            suffix = "True" if e.stream.endswith("True") else "False"
            assert e.metadata["correlation_id"] == "c'o"
            assert e.metadata["message_id"] in {
                f"it's {r} {suffix}-{n}" for r in (1, 2) for n in range(4)
            }
    finally:
        await store.close()


async def test_positions_come_back_with_the_commit(
    postgres_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the transaction id arrives as a NOTICE in the COMMIT round trip, even when the
    # session raised client_min_messages; nothing is read back afterwards
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema)

    async def no_read_back(uow: PostgresUnitOfWork) -> int:
        raise AssertionError("the positions were read back")

    monkeypatch.setattr(store, "_find_last", no_read_back)
    try:
        for quiet in (False, True):
            uow = await store.begin()
            assert isinstance(uow, PostgresUnitOfWork)
            if quiet:
                await uow.connection.execute("SET client_min_messages = warning")
            xid = int(await uow.connection.fetchval("SELECT pg_current_xact_id()::text"))
            uow.record(f"s{quiet}", Opened("a", "x"), Deposited("a", 1))
            assert await uow.commit() == (xid << 20) + 1
            assert [e.position for e in await store.read_stream(f"s{quiet}")] == [
                xid << 20,
                (xid << 20) + 1,
            ]
    finally:
        await store.close()


async def test_a_store_on_an_application_pool_reads_positions_back(
    postgres_dsn: str, pg_schema: str
) -> None:
    # its connections carry no notice listener: positions come from INSERT ... RETURNING on
    # the unit of work's own connection (a second connection from a pool of one would
    # never come: two tracked commits at once must not wait for each other for ever)
    opened = await PostgresEventStore.open(postgres_dsn, schema=pg_schema)
    await opened.close()
    pool = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=1)
    store = PostgresEventStore(pool, schema=pg_schema)

    async def tracked(stream: str) -> int | None:
        uow = await store.begin()
        uow.record(stream, Opened(stream, "x"), Deposited(stream, 1))
        return await uow.commit()

    try:
        first, second = await asyncio.wait_for(
            asyncio.gather(tracked("a"), tracked("b")), timeout=10
        )
        for stream, last in (("a", first), ("b", second)):
            [*_, event] = await store.read_stream(stream)
            assert last == event.position
    finally:
        await pool.close()


async def test_tracked_commits_work_for_a_role_without_plpgsql(postgres_dsn: str) -> None:
    # hardened servers revoke USAGE on plpgsql from PUBLIC: the role can call the log's
    # functions (EXECUTE) but may not run a DO block, so positions come from RETURNING
    suffix = uuid.uuid4().hex[:12]
    db, role, schema = f"cqrskit_t_{suffix}", f"cqrskit_r_{suffix}", "app"
    admin = await asyncpg.connect(postgres_dsn)
    await admin.execute(f'CREATE DATABASE "{db}"')
    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    url = urlsplit(postgres_dsn)
    owner_dsn = urlunsplit(url._replace(path=f"/{db}"))
    host = url.netloc.rpartition("@")[2]
    role_dsn = urlunsplit(url._replace(netloc=f"{role}@{host}", path=f"/{db}"))
    try:
        setup = await PostgresEventStore.open(owner_dsn, schema=schema)  # tables by the owner
        await setup.close()
        owner = await asyncpg.connect(owner_dsn)
        try:
            await owner.execute(
                "REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC; "
                f'GRANT USAGE ON SCHEMA {schema} TO "{role}"; '
                f'GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA {schema} TO "{role}"; '
                f'GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO "{role}"'
            )
        finally:
            await owner.close()
        store = await PostgresEventStore.open(role_dsn, schema=schema, create_tables=False)
        try:
            assert not store._xid_notices
            for stream in ("a", "b"):
                uow = await store.begin()  # positions=True, as send_tracked asks
                uow.record(stream, Opened(stream, "x"), Deposited(stream, 1))
                last = await uow.commit()
                [*_, event] = await store.read_stream(stream)
                assert last == event.position
            plain = await store.begin(positions=False)
            plain.record("c", Opened("c", "x"))
            assert await plain.commit() is None
        finally:
            await store.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


async def test_single_event_commits_use_the_prepared_insert(
    postgres_dsn: str, pg_schema: str
) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema)
    tricky = "o'brien \\ $$ ; COMMIT; -- \u00e9"

    async def one(expected: int | None, positions: bool = False) -> int | None:
        uow = await store.begin(Metadata(message_id=f"m'{expected}"), positions=positions)
        assert isinstance(uow, PostgresUnitOfWork)
        uow.record(tricky, Deposited(tricky, 1), expected_version=expected)
        sql = store._render_insert(uow)
        assert sql.startswith("EXECUTE cqrskit_append1(")
        return await uow.commit()

    try:
        await one(0)
        await one(1)
        last = await one(None, positions=True)
        with pytest.raises(ConcurrencyError) as stale:
            await one(1)
        assert (stale.value.expected_version, stale.value.actual_version) == (1, 3)
        with pytest.raises(ConcurrencyError):
            await one(0)  # the stream exists: the unique index refuses version 1
        events = await store.read_stream(tricky)
        assert [e.version for e in events] == [1, 2, 3]
        assert events[-1].position == last
        assert [e.metadata["message_id"] for e in events] == ["m'0-0", "m'1-0", "m'None-0"]
        assert json.loads(events[0].data) == {"account": tricky, "amount": 1}
    finally:
        await store.close()


async def test_a_handler_that_deallocates_the_prepared_insert_gets_a_clear_error(
    postgres_dsn: str, pg_schema: str
) -> None:
    store = await PostgresEventStore.open(postgres_dsn, schema=pg_schema, max_size=1)
    try:
        uow = await store.begin(positions=False)
        assert isinstance(uow, PostgresUnitOfWork)
        await uow.connection.execute("DEALLOCATE ALL")
        uow.record("a", Opened("a", "x"), expected_version=0)
        with pytest.raises(PersistenceError, match="DISCARD ALL or DEALLOCATE"):
            await uow.commit()
        assert await store.read_stream("a") == []
        again = await store.begin(positions=False)  # a new connection, prepared again
        again.record("a", Opened("a", "x"), expected_version=0)
        await again.commit()
        assert [e.version for e in await store.read_stream("a")] == [1]
    finally:
        await store.close()
