"""SQLAlchemy integration, synchronous: a ``Session`` on SQLite with the SyncMediator."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from cqrskit.dependencies import Dependencies
from cqrskit.errors import ConcurrencyError, ConfigurationError, DependencyError
from cqrskit.eventlog import InMemoryEventStore, UnitOfWork
from cqrskit.messages import Command, Event, Query
from cqrskit.registry import Registry
from cqrskit.sqlalchemy import SyncSqlAlchemyStore, SyncSqlAlchemyUnitOfWork
from cqrskit.sqlite import SqliteEventStore
from cqrskit.sync import SyncMediator


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    owner: Mapped[str] = mapped_column(String)


@dataclass(frozen=True, slots=True)
class OpenAccount(Command[str]):
    account_id: str
    owner: str
    fail: bool = False
    stream: str | None = None


@dataclass(frozen=True, slots=True)
class OpenTwo(Command[None]):
    first: str
    second: str


@dataclass(frozen=True, slots=True)
class CountAccounts(Query[int]):
    pass


@dataclass(frozen=True, slots=True)
class AccountOpened(Event):
    account_id: str
    owner: str


class Boom(Exception):
    pass


@dataclass
class App:
    path: Path
    mediator: SyncMediator
    sessions: sessionmaker[Session]
    published: list[AccountOpened] = field(default_factory=list)

    def owners(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Account.owner).order_by(Account.owner)).all())

    def events(self) -> list[tuple[int, str, int, str]]:
        with closing(sqlite3.connect(self.path)) as conn:
            return conn.execute(
                "SELECT position, stream, version, type FROM cqrskit_events ORDER BY position"
            ).fetchall()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    path = tmp_path / "app.db"
    log = SqliteEventStore(path)
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine)
    store = SyncSqlAlchemyStore(log, sessions)
    registry = Registry()
    published: list[AccountOpened] = []

    @registry.handler
    def open_account(cmd: OpenAccount, session: Session, uow: UnitOfWork) -> str:
        session.add(Account(id=cmd.account_id, owner=cmd.owner))
        uow.record(
            cmd.stream or f"account-{cmd.account_id}",
            AccountOpened(cmd.account_id, cmd.owner),
            expected_version=0,
        )
        if cmd.fail:
            raise Boom("handler failed")
        return cmd.account_id

    @registry.handler
    def open_two(cmd: OpenTwo, mediator: SyncMediator, uow: SyncSqlAlchemyUnitOfWork) -> None:
        mediator.send(OpenAccount(cmd.first, "x"))
        mediator.send(OpenAccount(cmd.second, "y"))
        assert len(uow.session.scalars(select(Account)).all()) == 2  # one session

    @registry.handler
    def on_opened(e: AccountOpened) -> None:
        published.append(e)

    mediator = SyncMediator(
        registry, behaviors=[store.transaction()], resolver=[store.resolver(), Dependencies()]
    )
    try:
        yield App(path, mediator, sessions, published)
    finally:
        engine.dispose()
        log.close()


def test_orm_row_and_event_commit_together(app: App) -> None:
    receipt = app.mediator.send_tracked(OpenAccount("1", "ada"))
    assert receipt.result == "1"
    assert app.owners() == ["ada"]
    [(position, stream, version, type_)] = app.events()
    assert (stream, version, type_) == ("account-1", 1, "AccountOpened")
    assert receipt.token == position
    assert app.published == [AccountOpened("1", "ada")]


def test_failing_handler_rolls_back_both(app: App) -> None:
    with pytest.raises(Boom):
        app.mediator.send(OpenAccount("1", "ada", fail=True))
    assert app.owners() == []
    assert app.events() == []
    assert app.published == []


def test_stream_conflict_rolls_back_the_orm_change(app: App) -> None:
    app.mediator.send(OpenAccount("1", "ada"))
    with pytest.raises(ConcurrencyError) as info:
        app.mediator.send(OpenAccount("2", "bob", stream="account-1"))
    assert info.value.stream == "account-1"
    assert info.value.actual_version == 1
    assert app.owners() == ["ada"]
    assert len(app.events()) == 1


def test_nested_commands_share_the_session_and_positions_follow_commits(app: App) -> None:
    receipt = app.mediator.send_tracked(OpenTwo("a", "b"))
    app.mediator.send(OpenAccount("c", "z"))
    assert app.owners() == ["x", "y", "z"]
    rows = app.events()
    assert [r[1] for r in rows] == ["account-a", "account-b", "account-c"]
    assert receipt.token == rows[1][0]
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)


def test_wrong_store_and_no_session_outside_commands(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="SqliteEventStore"):
        SyncSqlAlchemyStore(InMemoryEventStore(), sessionmaker())  # type: ignore[arg-type]
    log = SqliteEventStore(tmp_path / "q.db")
    try:
        store = SyncSqlAlchemyStore(log, sessionmaker(create_engine("sqlite://")))
        registry = Registry()

        @registry.handler
        def count(q: CountAccounts, session: Session) -> int:
            return 0

        mediator = SyncMediator(registry, resolver=store.resolver())
        with pytest.raises(DependencyError, match="no session"):
            mediator.ask(CountAccounts())
    finally:
        log.close()
