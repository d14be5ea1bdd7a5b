"""Wiring: the event store, the read databases, the behaviors and the mediator.

This is the only module that knows which database runs the bank and which projection runs
inline or asynchronously::

    async with open_sqlite_bank(Path("data")) as bank:
        with acting_as(Customer("ada")):
            account = await bank.mediator.send(OpenAccount("ada"))

Moving ``history`` from async to inline (or ``balances`` the other way) means moving it
between the two lists in :func:`_assemble`; no handler changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cqrskit import Dependencies, Mediator
from cqrskit.eventlog import EventStore
from cqrskit.pipeline import AuthorizationBehavior, ValidationBehavior, for_queries
from cqrskit.projections import (
    ConsistencyGate,
    InlineProjections,
    Projector,
    ReadDatabase,
)
from cqrskit.serialization import JsonSerializer
from cqrskit.sqlite import SqliteReadDatabase
from examples.bank.domain import current_customer, event_types
from examples.bank.handlers import (
    VALIDATORS,
    Accounts,
    BalanceReader,
    HistoryReader,
    Policies,
    registry,
)
from examples.bank.projections import balances, history


@dataclass
class Bank:
    """A running bank: dispatch through ``mediator``; start and stop with ``async with``.

    Attributes:
        mediator: where commands and queries go.
        store: the event log.
        write_db: the read database on the write database (holds ``balances``, inline).
        read_db: the read database of the async projections (holds ``history``).
        projector: runs ``history`` asynchronously.
        gate: the consistency gate (queries wait for tokens here).
        description: where the data lives, for humans.
    """

    mediator: Mediator
    store: EventStore
    write_db: ReadDatabase
    read_db: ReadDatabase
    projector: Projector
    gate: ConsistencyGate
    inline: InlineProjections
    description: str
    _close: list[Any] = field(default_factory=list)

    async def start(self) -> None:
        """Create the read models' tables and start the projector."""
        await self.inline.setup()
        self.inline.attach(self.store)
        await self.projector.start()

    async def stop(self) -> None:
        """Stop the projector and close every connection."""
        await self.projector.stop()
        for close in reversed(self._close):
            result = close()
            if result is not None:
                await result

    async def __aenter__(self) -> Bank:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _assemble(
    store: EventStore,
    write_db: ReadDatabase,
    read_db: ReadDatabase,
    description: str,
    *,
    batch_size: int = 100,
) -> Bank:
    serializer = JsonSerializer(event_types)
    inline = InlineProjections(write_db, [balances], serializer)
    projector = Projector(store, read_db, [history], serializer, batch_size=batch_size)
    gate = ConsistencyGate(store, read_db, signal=projector.signal)
    balance_reader = BalanceReader(write_db)
    deps = Dependencies()
    deps.singleton(Accounts, Accounts(store, serializer))
    deps.singleton(BalanceReader, balance_reader)
    deps.singleton(HistoryReader, HistoryReader(read_db))
    mediator = Mediator(
        registry,
        behaviors=[
            AuthorizationBehavior(
                Policies(balance_reader).table(),  # type: ignore[arg-type]
                principal=current_customer,
            ),
            ValidationBehavior(VALIDATORS),  # type: ignore[arg-type]
            store.transaction(),
            for_queries(gate.behavior),
        ],
        resolver=[store.resolver(), deps],
    )
    return Bank(mediator, store, write_db, read_db, projector, gate, inline, description)


def open_sqlite_bank(directory: Path, *, batch_size: int = 100) -> Bank:
    """The embedded default: ``bank.db`` (events + ``balances``), ``read.db`` (``history``)."""
    from cqrskit.sqlite import SqliteEventStore

    directory.mkdir(parents=True, exist_ok=True)
    serializer = JsonSerializer(event_types)
    store = SqliteEventStore(directory / "bank.db", encoder=serializer.encode)
    write_db = SqliteReadDatabase(str(directory / "bank.db"))
    read_db = SqliteReadDatabase(str(directory / "read.db"))
    bank = _assemble(
        store, write_db, read_db, f"SQLite files in {directory}", batch_size=batch_size
    )
    bank._close += [store.close, write_db.close, read_db.close]
    return bank


async def open_postgres_bank(
    dsn: str, schema: str, *, batch_size: int = 100, replicas: Sequence[str] = ()
) -> Bank:
    """The same bank on PostgreSQL: event log, ``balances`` and ``history`` in ``schema``.

    With ``replicas`` (streaming replicas of ``dsn``), ``history`` is read on them through a
    :class:`~cqrskit.postgres.replica.PostgresReplicaRouter` (mode 4): a request with a
    consistency token reads a replica that has replayed it. ``balances`` stays on the
    primary: ``GetBalance`` and the authorization checks declare no ``@reads`` and must see
    the caller's writes at once.
    """
    from cqrskit.postgres import PostgresEventStore, PostgresReadDatabase

    serializer = JsonSerializer(event_types)
    store = await PostgresEventStore.open(dsn, schema=schema, encoder=serializer.encode)
    write_db = PostgresReadDatabase(dsn, schema=schema)
    read_db: ReadDatabase = write_db
    where = f"PostgreSQL schema {schema!r}"
    closers: list[Any] = [store.close, write_db.close]
    if replicas:
        from cqrskit.postgres.replica import PostgresReplicaRouter

        read_db = PostgresReplicaRouter(
            PostgresReadDatabase(dsn, schema=schema), list(replicas), store=store
        )
        where += f", history read on {len(replicas)} replica(s)"
        closers.append(read_db.close)
    bank = _assemble(store, write_db, read_db, where, batch_size=batch_size)
    bank._close += closers
    return bank
