"""Idempotent commands on the in-memory and SQLite stores (the shared kit), plus the API."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from contextlib import closing
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from cqrskit.dependencies import Dependencies
from cqrskit.errors import CommitOutcomeUnknownError, ConfigurationError
from cqrskit.eventlog import (
    EventStore,
    InMemoryEventStore,
    InMemoryUnitOfWork,
    StoredEvent,
    UnitOfWork,
)
from cqrskit.idempotency import (
    Idempotency,
    current_idempotency_key,
    idempotency_key,
    principal_scope,
    sqlite_idempotency_ddl,
)
from cqrskit.mediator import Mediator
from cqrskit.messages import Command, Event
from cqrskit.pipeline import AuthorizationBehavior, allow_all
from cqrskit.pipeline.retry import is_transient
from cqrskit.registry import Registry
from cqrskit.sqlite import SqliteEventStore, SqliteUnitOfWork
from cqrskit.testing.idempotency import Deposit, IdempotencyConformance, Probe


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (bounded) until ``predicate()`` holds, checking between short waits."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.001)


class TestInMemoryIdempotency(IdempotencyConformance):
    async def make_store(self) -> EventStore:
        return InMemoryEventStore()

    async def close_store(self, store: EventStore) -> None:
        return None

    async def write_state(self, uow: UnitOfWork, key: str) -> None:
        assert isinstance(uow, InMemoryUnitOfWork)
        uow.changes[f"state:{key}"] = key

    async def state_keys(self, store: EventStore) -> list[str]:
        assert isinstance(store, InMemoryEventStore)
        return sorted(v for k, v in store.state.items() if k.startswith("state:"))

    async def wait_blocked(self, idem: Idempotency, store: EventStore) -> None:
        await until(lambda: idem._backend.waiting >= 1)


class TestSqliteIdempotency(IdempotencyConformance):
    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    async def make_store(self) -> EventStore:
        store = SqliteEventStore(self.tmp / "idem.db")
        store._writer.execute("CREATE TABLE IF NOT EXISTS state (key TEXT NOT NULL)")
        return store

    async def close_store(self, store: EventStore) -> None:
        assert isinstance(store, SqliteEventStore)
        store.close()

    async def write_state(self, uow: UnitOfWork, key: str) -> None:
        assert isinstance(uow, SqliteUnitOfWork)
        uow.connection.execute("INSERT INTO state (key) VALUES (?)", (key,))

    async def state_keys(self, store: EventStore) -> list[str]:
        assert isinstance(store, SqliteEventStore)
        with closing(sqlite3.connect(store.path)) as conn:
            return sorted(r[0] for r in conn.execute("SELECT key FROM state"))

    async def wait_blocked(self, idem: Idempotency, store: EventStore) -> None:
        assert isinstance(store, SqliteEventStore)
        lock = store._write_lock
        await until(lambda: bool(getattr(lock, "_waiters", None)))


def test_context_key_is_scoped_and_nests() -> None:
    assert current_idempotency_key() is None
    with idempotency_key("outer"):
        assert current_idempotency_key() == "outer"
        with idempotency_key("inner"):
            assert current_idempotency_key() == "inner"
        assert current_idempotency_key() == "outer"
    assert current_idempotency_key() is None


@dataclass(frozen=True, slots=True)
class MakeSet(Command[set[int]]):
    n: int


class ForeignStore(EventStore):
    """Stands for a third-party store: not one Idempotency knows."""

    unit_of_work_type = InMemoryUnitOfWork

    async def begin(self, metadata: object = None, *, positions: bool = True) -> UnitOfWork:
        raise NotImplementedError

    async def read_after(self, position: int, limit: int = 1000) -> list[StoredEvent]:
        return []

    async def head(self) -> int:
        return 0

    async def read_stream(self, stream: str, after_version: int = 0) -> list[StoredEvent]:
        return []


def test_unserializable_result_type_fails_at_check() -> None:
    registry = Registry()

    @registry.handler
    async def make(cmd: MakeSet) -> set[int]:
        return {cmd.n}

    idem = Idempotency(InMemoryEventStore())
    with pytest.raises(ConfigurationError, match="MakeSet") as info:
        idem.check(registry)
    assert info.value.message_type is MakeSet
    assert "JSON-serializable" in str(info.value)


def test_unsupported_store_and_bad_table_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="table name"):
        Idempotency(InMemoryEventStore(), table="Bad Name")
    with pytest.raises(ConfigurationError, match="ForeignStore"):
        Idempotency(ForeignStore())
    assert 'CREATE TABLE IF NOT EXISTS "my_keys"' in sqlite_idempotency_ddl("my_keys")


async def test_sqlite_purge_and_tables_for_migrations(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "own.db")
    conn.executescript(sqlite_idempotency_ddl())
    conn.close()
    store = SqliteEventStore(tmp_path / "own.db")
    store._writer.execute("CREATE TABLE state (key TEXT NOT NULL)")
    idem = await Idempotency.open(store, create_tables=False)
    try:
        kit = TestSqliteIdempotency()
        kit.tmp = tmp_path
        mediator = kit.app(store, idem, Probe())
        with idempotency_key("p"):
            await mediator.send(Deposit("a", 1))
        assert await idem.lookup("p") is not None
        assert await idem.purge(timedelta(hours=1)) == 0
        assert await idem.purge(timedelta(seconds=-1)) == 1
        assert await idem.lookup("p") is None
    finally:
        idem.close()
        store.close()


async def test_memory_purge() -> None:
    store = InMemoryEventStore()
    idem = await Idempotency.open(store)
    mediator = TestInMemoryIdempotency().app(store, idem, Probe())
    with idempotency_key("p"):
        await mediator.send(Deposit("a", 1))
    assert await idem.purge(timedelta(hours=1)) == 0
    assert await idem.purge(timedelta(seconds=-1)) == 1
    assert await idem.lookup("p") is None


def test_retry_predicate_retries_unknown_commits_only_when_keyed() -> None:
    err = CommitOutcomeUnknownError("lost during COMMIT")
    err.__cause__ = ConnectionResetError("reset by peer")  # transient on its own
    assert not is_transient(err)
    err.retry_safe = True
    assert is_transient(err)


@dataclass(frozen=True, slots=True)
class Later(Command["LaterResult"]):
    n: int


@dataclass(frozen=True, slots=True)
class LaterResult:
    doubled: int


async def test_forward_referenced_result_type_is_resolved_and_decoded() -> None:
    store = InMemoryEventStore()
    idem = Idempotency(store)
    registry = Registry()
    runs: list[int] = []

    @registry.handler
    async def later(cmd: Later) -> LaterResult:
        runs.append(cmd.n)
        return LaterResult(cmd.n * 2)

    idem.check(registry)
    mediator = Mediator(registry, behaviors=[idem.transaction()], resolver=store.resolver())
    with idempotency_key("fw"):
        first = await mediator.send(Later(4))
    with idempotency_key("fw"):
        again = await mediator.send(Later(4))
    assert first == again == LaterResult(8)
    assert type(again) is LaterResult
    assert runs == [4]


@dataclass(frozen=True)
class OpenThing(Command[str]):
    name: str


@dataclass(frozen=True)
class ThingOpened(Event):
    name: str


@dataclass(frozen=True)
class Welcome(Command[str]):
    name: str


async def test_commands_sent_after_commit_do_not_inherit_the_key() -> None:
    store = InMemoryEventStore()
    idem = await Idempotency.open(store)
    registry = Registry()
    welcomed: list[str] = []

    @registry.handler
    async def open_thing(cmd: OpenThing, uow: UnitOfWork) -> str:
        uow.record(f"thing-{cmd.name}", ThingOpened(cmd.name))
        return cmd.name

    @registry.handler
    async def on_opened(event: ThingOpened, mediator: Mediator) -> None:
        await mediator.send(Welcome(event.name))  # a follow-up command of another type

    @registry.handler
    async def welcome(cmd: Welcome, uow: UnitOfWork) -> str:
        welcomed.append(cmd.name)
        return cmd.name

    errors: list[Exception] = []
    mediator = Mediator(
        registry,
        behaviors=[idem.transaction(on_publish_error=lambda e, exc: errors.append(exc))],
        resolver=store.resolver(),
    )
    with idempotency_key("k-1"):
        assert await mediator.send(OpenThing("a")) == "a"
        assert current_idempotency_key() == "k-1"
    assert errors == []
    assert welcomed == ["a"]
    with idempotency_key("k-1"):  # the retry replays; the follow-up does not run again
        assert await mediator.send(OpenThing("a")) == "a"
    assert welcomed == ["a"]


@dataclass(frozen=True, slots=True)
class _User:
    id: int
    tenant_id: str | None = None
    roles: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Nameless:
    name: str


def test_principal_scope_identifies_the_caller_and_tenant() -> None:
    assert principal_scope(None, None) is None
    assert principal_scope("alice", None) == '[null, "alice"]'
    assert principal_scope(7, None) == '[null, "7"]'
    # roles are not identity: a retry after a role change still finds the key
    assert principal_scope(_User(7), None) == principal_scope(_User(7, roles=("admin",)), None)
    assert principal_scope(_User(7, "acme"), None) == '["acme", "7"]'
    assert principal_scope(_User(7, "acme"), None) != principal_scope(_User(7, "other"), None)
    assert principal_scope({"sub": "u1", "tenant": "t"}, None) == '["t", "u1"]'
    # no way to confuse a tenant/id pair with a plain id that looks like one
    assert principal_scope('["acme", "7"]', None) != principal_scope(_User(7, "acme"), None)
    with pytest.raises(ConfigurationError, match="_Nameless") as info:
        principal_scope(_Nameless("x"), None)
    assert info.value.hint is not None
    assert "scope=" in info.value.hint


async def test_a_bad_scope_hook_result_is_a_configuration_error() -> None:
    store = InMemoryEventStore()
    probe = Probe()
    for bad in (42, "x" * 2000, "a\x00b"):
        idem = Idempotency(store, scope=lambda principal, command, bad=bad: bad)
        mediator = TestInMemoryIdempotency().app(store, idem, probe)
        with pytest.raises(ConfigurationError, match="scope hook"), idempotency_key("k"):
            await mediator.send(Deposit("a", 1))
    assert probe.calls == 0
    with pytest.raises(ConfigurationError, match="wait_timeout"):
        Idempotency(store, wait_timeout=float("nan"))
    with pytest.raises(ConfigurationError, match="wait_timeout"):
        Idempotency(store, wait_timeout=0)


async def test_an_anonymous_caller_uses_unscoped_keys() -> None:
    store = InMemoryEventStore()
    idem = Idempotency(store)
    probe = Probe()
    user: ContextVar[str | None] = ContextVar("user", default=None)
    registry = TestInMemoryIdempotency().app(store, idem, probe).registry
    authz = AuthorizationBehavior({Command: allow_all}, principal=user)
    mediator = Mediator(
        registry,
        behaviors=[authz, idem.transaction()],
        resolver=[store.resolver(), Dependencies()],
    )
    with idempotency_key("k"):
        await mediator.send(Deposit("a", 1))  # anonymous: the key is unscoped
    assert await idem.lookup("k") is not None
    token = user.set("alice")
    try:
        with idempotency_key("k"):
            await mediator.send(Deposit("a", 1))  # alice's own "k"
    finally:
        user.reset(token)
    with idempotency_key("k"):
        await mediator.send(Deposit("a", 1))  # anonymous retry: replayed
    assert probe.calls == 2
    assert await idem.lookup("k", scope=principal_scope("alice", None)) is not None
