"""Cost of idempotency on the SQLite write path (1 state row + 1 event per command).

* I1: ``idem.transaction()`` for commands *without* a key vs ``store.transaction()``
  (the price every command pays for having the feature wired in);
* I2: a command *with* a key (a new key each time: lookup + insert of the key row) vs the
  same command without a key through ``store.transaction()``;
* I3: a retried key (the stored result is returned, the handler does not run) vs a keyed
  first attempt.

    python benchmarks/idempotency.py [--rounds 15] [--n 2000] [--json out.json]
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from _harness import Result, measure_async, parse_args, report

from cqrskit import Command, Event, Mediator, Registry
from cqrskit.idempotency import Idempotency, idempotency_key
from cqrskit.sqlite import SqliteEventStore, SqliteUnitOfWork


@dataclass(frozen=True, slots=True)
class Deposit(Command[int]):
    account: str
    amount: int


@dataclass(frozen=True, slots=True)
class Deposited(Event):
    account: str
    amount: int


registry = Registry()


@registry.handler
async def deposit(cmd: Deposit, uow: SqliteUnitOfWork) -> int:
    uow.connection.execute("INSERT INTO state VALUES (?, ?)", (cmd.account, cmd.amount))
    uow.record(f"acc-{cmd.account}", Deposited(cmd.account, cmd.amount))
    return cmd.amount


async def main() -> None:
    args = parse_args(__doc__ or "")
    n = min(args.n, 5000)
    store = SqliteEventStore(Path(tempfile.mkdtemp()) / "bench.db")
    store._writer.execute("CREATE TABLE state (account TEXT, amount INTEGER)")
    idem = await Idempotency.open(store)
    plain = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    keyed = Mediator(registry, behaviors=[idem.transaction()], resolver=store.resolver())
    counter = itertools.count()

    async def plain_send(k: int) -> None:
        for _ in range(k):
            await plain.send(Deposit("a", 1))

    async def keyed_no_key(k: int) -> None:
        for _ in range(k):
            await keyed.send(Deposit("a", 1))

    async def keyed_new_key(k: int) -> None:
        for _ in range(k):
            with idempotency_key(f"k{next(counter)}"):
                await keyed.send(Deposit("a", 1))

    with idempotency_key("retried"):
        await keyed.send(Deposit("a", 1))

    async def keyed_retry(k: int) -> None:
        for _ in range(k):
            with idempotency_key("retried"):
                await keyed.send(Deposit("a", 1))

    rounds = args.rounds
    results = [
        await measure_async(
            Result("I1", "no key: idem.transaction() vs store.transaction()", "≤ 1.05×"),
            plain_send,
            keyed_no_key,
            n,
            rounds,
        ),
        await measure_async(
            Result("I2", "new key vs no key (store.transaction())", "reported"),
            plain_send,
            keyed_new_key,
            n,
            rounds,
        ),
        await measure_async(
            Result("I3", "retried key (stored result) vs new key", "< 1×"),
            keyed_new_key,
            keyed_retry,
            n,
            rounds,
        ),
    ]
    idem.close()
    store.close()
    report("Idempotency (SQLite, ns per command)", results, args.json)


if __name__ == "__main__":
    asyncio.run(main())
