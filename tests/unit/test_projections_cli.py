"""The projections CLI: status, rebuild and dead-letters on SQLite (run is tested with
real processes in tests/integration/sqlite/test_projector_process.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cqrskit.cli.projections import main
from cqrskit.projections import PartitionedProjector, Projector
from cqrskit.sqlite import SqliteReadDatabase
from tests.support.bank import Deposited, Poison, balances, serializer
from tests.support.sqlite_log import SqliteTestLog


def prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    flag = tmp_path / "poison.flag"
    flag.touch()
    monkeypatch.setenv("CQRSKIT_TEST_POISON_FLAG", str(flag))

    async def run() -> None:
        log = SqliteTestLog(tmp_path / "write.db")
        db = SqliteReadDatabase(str(tmp_path / "read.db"))
        await log.append("a", Deposited("a", 1))
        await log.append("a", Poison("a"))
        [last] = await log.append("b", Deposited("b", 2))
        async with Projector(log, db, [balances], serializer) as p:
            for _ in range(200):  # bounded: 10 s at most
                if p.checkpoint("balances") >= last.position:
                    break
                await p.signal.wait(0.05)
            assert p.checkpoint("balances") >= last.position
        await log.append("b", Deposited("b", 3))
        await db.close()
        log.close()

    asyncio.run(run())
    return f"sqlite:///{tmp_path / 'write.db'}", f"sqlite:///{tmp_path / 'read.db'}"


def test_status_dead_letters_and_rebuild(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store, read = prepare(tmp_path, monkeypatch)
    assert main(["status", "--store", store, "--read", read, "--json"]) == 0
    [status] = json.loads(capsys.readouterr().out)
    assert status["name"] == "balances"
    assert (status["lag_events"], status["dead_letters"], status["mode"]) == (1, 1, "async")

    assert main(["status", "--store", store, "--read", read]) == 0
    assert "balances" in capsys.readouterr().out

    assert main(["dead-letters", "--read", read, "balances", "--json"]) == 0
    [letter] = json.loads(capsys.readouterr().out)
    assert (letter["stream"], letter["type"], letter["attempts"]) == ("a", "bank.poison", 3)

    assert main(["dead-letters", "--read", read, "balances", "--retry", "--stream", "a"]) == 0
    assert "1 parked event(s) flagged" in capsys.readouterr().out

    assert main(["rebuild", "--read", read, "--projection", "tests.support.bank:balances"]) == 0
    assert "generation 2" in capsys.readouterr().out


def test_bad_arguments_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dead-letters", "--read", "mysql://x", "balances"]) == 2
    assert "--read must be" in capsys.readouterr().err
    code = main(["rebuild", "--read", f"sqlite:///{tmp_path}/r.db", "--projection", "nocolon"])
    assert code == 2
    assert "module:attribute" in capsys.readouterr().err


def test_contributes_to_the_cqrskit_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cqrskit.cli import main as cqrskit_main

    store, read = prepare(tmp_path, monkeypatch)
    assert cqrskit_main(["projections", "status", "--store", store, "--read", read, "--json"]) == 0
    [status] = json.loads(capsys.readouterr().out)
    assert status["dead_letters"] == 1


def test_locations_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a DSN on the command line is visible in `ps`: the CLI reads it from the environment
    store, read = prepare(tmp_path, monkeypatch)
    monkeypatch.setenv("CQRSKIT_STORE", store)
    monkeypatch.setenv("CQRSKIT_READ", read)
    assert main(["status", "--json"]) == 0
    [status] = json.loads(capsys.readouterr().out)
    assert status["name"] == "balances"
    monkeypatch.delenv("CQRSKIT_READ")
    monkeypatch.setenv("MY_READ_DB", read)
    assert main(["dead-letters", "--read", "env:MY_READ_DB", "balances", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


def test_missing_locations_are_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CQRSKIT_STORE", raising=False)
    monkeypatch.delenv("CQRSKIT_READ", raising=False)
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    assert main(["status", "--read", "sqlite:///x.db"]) == 2
    assert "--store is missing and CQRSKIT_STORE is not set" in capsys.readouterr().err
    assert main(["dead-letters", "--read", "env:NOT_SET_HERE", "balances"]) == 2
    assert "the variable NOT_SET_HERE is not set" in capsys.readouterr().err


def test_rebuild_of_a_partitioned_projection_with_another_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"sqlite:///{tmp_path / 'write.db'}"
    read = f"sqlite:///{tmp_path / 'read.db'}"
    spec = "tests.support.bank:balances"

    async def serve() -> None:
        log = SqliteTestLog(tmp_path / "write.db")
        db = SqliteReadDatabase(str(tmp_path / "read.db"))
        [last] = await log.append("a", Deposited("a", 1))
        async with PartitionedProjector(
            log, db, [balances], serializer, partitions=2, lease_ttl=0.5
        ) as p:
            for _ in range(200):  # bounded: 10 s at most
                if p.checkpoint("balances") >= last.position and len(p.owned("balances")) == 2:
                    break
                await p.signal.wait(0.05)
            assert p.checkpoint("balances") >= last.position
        await db.close()
        log.close()

    asyncio.run(serve())
    assert main(["rebuild", "--read", read, "--projection", spec, "--cancel"]) == 0
    assert "no rebuild is pending" in capsys.readouterr().out
    assert main(["rebuild", "--read", read, "--projection", spec, "--partitions", "3"]) == 0
    out = capsys.readouterr().out
    assert "rebuilding into generation 2 (3 partitions)" in out
    assert "start workers with --partitions 3" in out
    assert "those with --partitions 2 keep serving" in out
    assert main(["status", "--store", store, "--read", read]) == 0
    out = capsys.readouterr().out
    assert "gen" in out
    assert "balances partitions of generation 2 (rebuilding):" in out
    assert main(["status", "--store", store, "--read", read, "--json"]) == 0
    [status] = json.loads(capsys.readouterr().out)
    assert [p["partitions"] for p in status["rebuilding_partitions"]] == [3, 3, 3]
    assert [p["generation"] for p in status["partitions"]] == [1, 1]
    # another number while one is pending: refused
    assert main(["rebuild", "--read", read, "--projection", spec, "--partitions", "4"]) == 2
    assert "already being rebuilt into generation 2 with 3" in capsys.readouterr().err
    assert main(["rebuild", "--read", read, "--projection", spec, "--cancel"]) == 0
    assert "generation 2 was cancelled" in capsys.readouterr().out


def test_rebuild_with_partitions_of_a_one_process_projection_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _store, read = prepare(tmp_path, monkeypatch)
    spec = "tests.support.bank:balances"
    assert main(["rebuild", "--read", read, "--projection", spec, "--partitions", "4"]) == 2
    err = capsys.readouterr().err
    assert "not partitioned (mode async)" in err
    assert "--partitions 4" in err
