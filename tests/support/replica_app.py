"""A small application in replication mode for the replica router's tests and benchmark.

Commands (``Deposit``) run on the primary; the ``balances`` projection of
:mod:`tests.support.bank` runs inline (its rows replicated with the events) or in a
projector; ``GetAccount`` reads it through the router, with a token when asked with one.
The same query code as in modes 1–3: only the wiring in :func:`open_replica_app` differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.support.bank import Deposited, balances, serializer

from cqrskit import Command, Dependencies, Mediator, Query, Registry
from cqrskit.eventlog import UnitOfWork
from cqrskit.pipeline import for_queries
from cqrskit.postgres import PostgresEventStore, PostgresReadDatabase
from cqrskit.postgres.replica import PostgresReplicaRouter
from cqrskit.projections import (
    ConsistencyGate,
    InlineProjections,
    Projector,
    ReadSession,
    reads,
)

registry = Registry()


@dataclass(frozen=True, slots=True)
class Deposit(Command[None]):
    account: str
    amount: int


@reads("balances", policy="wait", timeout=5.0)
@dataclass(frozen=True, slots=True)
class GetAccount(Query["tuple[int, int] | None"]):
    """(balance, events applied) of an account, or ``None``."""

    account: str


@registry.handler
async def deposit(cmd: Deposit, uow: UnitOfWork) -> None:
    uow.record(f"acct-{cmd.account}", Deposited(cmd.account, cmd.amount))


@registry.handler
async def get_account(q: GetAccount, db: ReadSession) -> tuple[int, int] | None:
    row = await db.fetchone("SELECT balance, applied FROM accounts WHERE id = ?", q.account)
    return None if row is None else (int(row[0]), int(row[1]))


@dataclass
class ReplicaApp:
    mediator: Mediator
    store: PostgresEventStore
    router: PostgresReplicaRouter
    gate: ConsistencyGate
    projector: Projector | None = None
    closers: list[Any] = field(default_factory=list)

    async def close(self) -> None:
        if self.projector is not None:
            await self.projector.stop()
        await self.router.close()
        await self.store.close()


async def open_replica_app(
    primary_dsn: str,
    replicas: Sequence[str] | Mapping[str, str],
    schema: str,
    *,
    mode: str = "inline",
    max_timeout: float = 30.0,
    store_check: bool = True,
    **router_options: Any,
) -> ReplicaApp:
    """The app on ``schema`` of the primary, queries on ``replicas``.

    ``mode="inline"``: ``balances`` applied in each command's transaction (the router gets
    ``store=`` unless ``store_check=False``); ``mode="async"``: applied by a projector into
    the same schema.
    """
    store = await PostgresEventStore.open(primary_dsn, schema=schema, encoder=serializer.encode)
    primary = PostgresReadDatabase(primary_dsn, schema=schema)
    projector: Projector | None = None
    if mode == "inline":
        inline = InlineProjections(primary, [balances], serializer)
        await inline.setup()
        inline.attach(store)
        router = PostgresReplicaRouter(
            primary, replicas, store=store if store_check else None, **router_options
        )
    else:
        router = PostgresReplicaRouter(primary, replicas, **router_options)
        projector = Projector(store, router, [balances], serializer, batch_size=200)
        await projector.start()
    gate = ConsistencyGate(store, router, max_timeout=max_timeout)
    deps = Dependencies()
    deps.scoped(ReadSession, router.session)
    mediator = Mediator(
        registry,
        behaviors=[store.transaction(), for_queries(gate.behavior)],
        resolver=[store.resolver(), deps],
    )
    return ReplicaApp(mediator, store, router, gate, projector)
