"""A writer process for the concurrent-writers test: ``python pg_writer_proc.py DSN SCHEMA ID N``.

Sends N commands through the mediator with the PostgreSQL transaction behavior; each writes
one state row and one event, half to the process's own stream (with expected versions),
half to 4 shared hot streams (no expected version; ConcurrencyError is retried). Prints one
acknowledged command id per line.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

from cqrskit import Command, Event, Mediator, Registry
from cqrskit.errors import ConcurrencyError
from cqrskit.eventlog import UnitOfWork
from cqrskit.postgres import PostgresEventStore, PostgresUnitOfWork


@dataclass(frozen=True, slots=True)
class Write(Command[None]):
    cmd_id: str
    stream: str
    expected: int | None


@dataclass(frozen=True, slots=True)
class Written(Event):
    cmd_id: str


async def main(dsn: str, schema: str, proc: int, n: int) -> None:
    store = await PostgresEventStore.open(dsn, schema=schema, max_size=2)
    registry = Registry()

    @registry.handler
    async def write(cmd: Write, uow: PostgresUnitOfWork) -> None:
        await uow.connection.execute(f'INSERT INTO "{schema}".state VALUES ($1)', cmd.cmd_id)
        uow.record(cmd.stream, Written(cmd.cmd_id), expected_version=cmd.expected)

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    own = 0
    try:
        for i in range(n):
            cmd_id = f"p{proc}-{i}"
            if i % 2 == 0:
                cmd = Write(cmd_id, f"own-{proc}", own)
            else:
                cmd = Write(cmd_id, f"hot-{(i // 2) % 4}", None)
            for _attempt in range(200):
                try:
                    if i % 3 == 0:
                        await mediator.send_tracked(cmd)
                    else:
                        await mediator.send(cmd)
                    break
                except ConcurrencyError:
                    continue
            else:
                raise SystemExit(f"{cmd_id}: 200 conflicts in a row")
            if i % 2 == 0:
                own += 1
            print(cmd_id, flush=True)
    finally:
        await store.close()


if __name__ == "__main__":
    del UnitOfWork
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
