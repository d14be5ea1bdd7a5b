"""Wiring: the event store, the read databases, the behaviors and the mediator.

This is the only module that knows which database runs the bank and which projection runs
inline or asynchronously::

    async with open_sqlite_bank(Path("data")) as bank:
        with acting_as(Customer("ada")):
            account = await bank.mediator.send(OpenAccount("ada"))

Moving ``history`` from async to inline (or ``balances`` the other way) means moving it
between the two lists in :func:`_assemble`; no handler changes. Moving ``history`` from the
log projector to a broker consumer (mode 3: a relay publishes the event log, a consumer
applies it, split into partitions) is ``history_via="broker"`` — the same projection
object, the same handlers::

    async with open_sqlite_bank(Path("data"), history_via="broker") as bank: ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cqrskit import Dependencies, Mediator
from cqrskit.eventlog import EventStore
from cqrskit.messaging import Consumer, InMemoryTransport, Relay, Source, Transport
from cqrskit.pipeline import AuthorizationBehavior, ValidationBehavior, for_queries
from cqrskit.projections import (
    ConsistencyGate,
    InlineProjections,
    Projector,
    ReadDatabase,
    Signal,
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
        projector: runs ``history`` from the event log (``history_via="log"``).
        relay, consumer: run ``history`` through a broker instead (``history_via="broker"``).
        signal: wakes consistency waits when ``history`` moved on.
        gate: the consistency gate (queries wait for tokens here).
        description: where the data lives, for humans.
    """

    mediator: Mediator
    store: EventStore
    write_db: ReadDatabase
    read_db: ReadDatabase
    projector: Projector | None
    gate: ConsistencyGate
    inline: InlineProjections
    description: str
    signal: Signal
    relay: Relay | None = None
    consumer: Consumer | None = None
    _close: list[Any] = field(default_factory=list)

    async def start(self) -> None:
        """Create the read models' tables and start the async side."""
        await self.inline.setup()
        self.inline.attach(self.store)
        for part in (self.projector, self.relay, self.consumer):
            if part is not None:
                await part.start()

    async def stop(self) -> None:
        """Stop the async side and close every connection."""
        for part in (self.consumer, self.relay, self.projector):
            if part is not None:
                await part.stop()
        for close in reversed(self._close):
            result = close()
            if result is not None:
                await result

    async def __aenter__(self) -> Bank:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


PARTITIONS = 4


def _assemble(
    store: EventStore,
    write_db: ReadDatabase,
    read_db: ReadDatabase,
    description: str,
    *,
    batch_size: int = 100,
    history_via: str = "log",
    broker: tuple[Transport, Source] | None = None,
) -> Bank:
    serializer = JsonSerializer(event_types)
    inline = InlineProjections(write_db, [balances], serializer)
    projector: Projector | None = None
    relay: Relay | None = None
    consumer: Consumer | None = None
    if history_via == "log":
        projector = Projector(store, read_db, [history], serializer, batch_size=batch_size)
        signal = projector.signal
    elif history_via == "broker":
        if broker is None:
            memory = InMemoryTransport()
            broker = (memory, memory.source())
        transport, source = broker
        # the relay keeps its bookkeeping in the write database, the consumer its
        # checkpoints (one per partition) in the read database, with the read model
        relay = Relay(store, write_db, transport, partitions=PARTITIONS, batch_size=batch_size)
        consumer = Consumer(
            source, read_db, [history], serializer, partitions=PARTITIONS, batch_size=batch_size
        )
        signal = consumer.signal
    else:
        raise ValueError(f"history_via must be 'log' or 'broker', not {history_via!r}")
    gate = ConsistencyGate(store, read_db, signal=signal)
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
    return Bank(
        mediator,
        store,
        write_db,
        read_db,
        projector,
        gate,
        inline,
        description,
        signal,
        relay,
        consumer,
    )


def open_sqlite_bank(
    directory: Path,
    *,
    batch_size: int = 100,
    history_via: str = "log",
    broker: tuple[Transport, Source] | None = None,
) -> Bank:
    """The embedded default: ``bank.db`` (events + ``balances``), ``read.db`` (``history``).

    ``history_via="broker"`` runs ``history`` through a relay and a partitioned broker
    consumer (``broker``: a transport and its source; default: the in-memory broker)."""
    from cqrskit.sqlite import SqliteEventStore

    directory.mkdir(parents=True, exist_ok=True)
    serializer = JsonSerializer(event_types)
    store = SqliteEventStore(directory / "bank.db", encoder=serializer.encode)
    write_db = SqliteReadDatabase(str(directory / "bank.db"))
    read_db = SqliteReadDatabase(str(directory / "read.db"))
    bank = _assemble(
        store,
        write_db,
        read_db,
        f"SQLite files in {directory}",
        batch_size=batch_size,
        history_via=history_via,
        broker=broker,
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
