"""``SqliteEventStore.write_connection()``: your own statements outside a command."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from cqrskit import Command, Event, Mediator, Registry
from cqrskit.sqlite import SqliteEventStore, SqliteUnitOfWork


@dataclass(frozen=True)
class Add(Command[None]):
    name: str


@dataclass(frozen=True)
class Added(Event):
    name: str


registry = Registry()


@registry.handler
async def add(cmd: Add, uow: SqliteUnitOfWork) -> None:
    uow.connection.execute("INSERT INTO names VALUES (?)", (cmd.name,))
    uow.record("names", Added(cmd.name))


async def test_commits_on_exit_and_rolls_back_on_error(tmp_path: Path) -> None:
    async with SqliteEventStore(tmp_path / "a.db") as store:
        async with store.write_connection() as conn:
            conn.execute("CREATE TABLE names (name TEXT)")

        async def fails() -> None:
            async with store.write_connection() as conn:
                conn.execute("INSERT INTO names VALUES ('lost')")
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await fails()
        mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
        await mediator.send(Add("kept"))
        async with store.write_connection() as conn:
            assert conn.execute("SELECT name FROM names").fetchall() == [("kept",)]


async def test_commands_wait_while_the_block_runs(tmp_path: Path) -> None:
    async with SqliteEventStore(tmp_path / "a.db") as store:
        async with store.write_connection() as conn:
            conn.execute("CREATE TABLE names (name TEXT)")
        mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
        async with store.write_connection() as conn:
            sending = asyncio.ensure_future(mediator.send(Add("after")))
            for _ in range(5):
                await asyncio.sleep(0)  # give the command every chance to run
            assert not sending.done()
            conn.execute("INSERT INTO names VALUES ('first')")
        await asyncio.wait_for(sending, 10)
        async with store.write_connection() as conn:
            rows = conn.execute("SELECT name FROM names ORDER BY rowid").fetchall()
        assert rows == [("first",), ("after",)]
