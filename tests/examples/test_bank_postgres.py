"""The same bank and demo on PostgreSQL, in a schema of its own."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from examples.bank.app import Bank, open_postgres_bank
from examples.bank.demo import run_demo
from examples.bank.domain import Customer, Deposit, GetBalance, OpenAccount, Withdraw, acting_as

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[2]


async def _drop(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def pg_bank(postgres_dsn: str) -> AsyncIterator[Bank]:
    schema = f"cqrskit_t_{uuid.uuid4().hex}"
    bank = await open_postgres_bank(postgres_dsn, schema, batch_size=20)
    try:
        async with bank:
            yield bank
    finally:
        await _drop(postgres_dsn, schema)


async def test_same_handlers_on_postgres(pg_bank: Bank) -> None:
    ada = Customer("ada")
    with acting_as(ada):
        account = await pg_bank.mediator.send(OpenAccount("ada"))
        await pg_bank.mediator.send(Deposit(account, 1_000))
        assert await pg_bank.mediator.send(Withdraw(account, 400)) == 600
        assert (await pg_bank.mediator.ask(GetBalance(account))).balance == 600


async def test_demo_on_postgres(pg_bank: Bank) -> None:
    out = io.StringIO()
    outcome = await run_demo(pg_bank, operations=60, seed=5, out=out)
    assert outcome.ok, out.getvalue()
    assert "PostgreSQL schema" in out.getvalue()


def test_command_line_drops_its_schema(postgres_dsn: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "examples.bank", "--postgres", postgres_dsn, "--operations", "30"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    schema = proc.stdout.split("PostgreSQL schema '", 1)[1].split("'", 1)[0]
    assert schema.startswith("cqrskit_demo_")

    async def exists() -> bool:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            found = await conn.fetchval(
                "SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1", schema
            )
        finally:
            await conn.close()
        return bool(found)

    assert not asyncio.run(exists())
