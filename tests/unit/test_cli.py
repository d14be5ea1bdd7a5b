"""The ``cqrskit`` CLI as a user meets it: help on every option, aligned tables with and
without rich, the whole application graph, empty results and unknown names said plainly,
the CLI's own hint for a missing event log, and one register call per command group."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from cqrskit.cli import GROUPS, build_parser, main, register_group
from cqrskit.cli._output import Progress, Reporter, render_table
from cqrskit.projections import PartitionedProjector, Projector
from cqrskit.sqlite import SqliteReadDatabase
from tests.support.bank import Deposited, balances, serializer
from tests.support.sqlite_log import SqliteTestLog


def _parsers(parser: argparse.ArgumentParser, path: str = "cqrskit") -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.extend(_parsers(child, f"{path} {name}"))
    return found


def test_every_command_and_option_has_help() -> None:
    parsers = _parsers(build_parser())
    assert len(parsers) >= 8  # routes, graph, ddl, projections and its four commands
    missing = []
    for path, parser in parsers:
        for action in parser._actions:  # type: ignore[attr-defined]
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            if not action.help:
                missing.append(f"{path} {action.option_strings or action.dest}")
    assert missing == []
    top = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    for choice in top._choices_actions:  # type: ignore[attr-defined]
        assert choice.help, choice.dest


def test_tables_are_aligned_in_plain_text_and_with_rich() -> None:
    rows = [["balances", 12, 3], ["history-of-everything", 1234567, 0]]
    plain = render_table(["projection", "checkpoint", "dead"], rows, right=[1, 2], rich=False)
    lines = plain.splitlines()
    assert lines[0].split() == ["projection", "checkpoint", "dead"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    # right-aligned numbers end in the same column
    assert lines[2].index("12") + 2 == lines[3].index("1234567") + 7
    assert len({len(line) for line in lines[2:]}) == 1
    pytest.importorskip("rich")
    fancy = render_table(["projection", "checkpoint", "dead"], rows, right=[1, 2], rich=True)
    body = [line.rstrip() for line in fancy.splitlines() if "balances" in line or "history" in line]
    assert body[0].index("12") + 2 == body[1].index("1234567") + 7
    assert "─" in fancy  # rich's rule under the header


def test_plain_is_chosen_without_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CQRSKIT_PLAIN", "1")
    assert "─" not in render_table(["a"], [["x"]])


def test_plain_text_when_rich_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from cqrskit.cli._output import has_rich

    monkeypatch.delenv("CQRSKIT_PLAIN", raising=False)
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich -> ImportError
    assert not has_rich()
    assert render_table(["a", "n"], [["x", 1]], right=[1]) == "a  n\n-  -\nx  1\n"


def test_progress_off_a_terminal_writes_sparse_lines(tmp_path: Path) -> None:
    with (tmp_path / "out.txt").open("w+") as out:
        progress = Progress("rebuilding", out=out, every=3600)
        for done in range(0, 101, 10):
            progress.update(done, 100)
        progress.finish("done")
        out.seek(0)
        lines = out.read().splitlines()
    assert lines == ["rebuilding: 0/100 (0%)", "rebuilding: 100/100 (100%)", "done"]


def test_reporter_json_lines(tmp_path: Path) -> None:
    with (tmp_path / "log.txt").open("w+") as out:
        reporter = Reporter(json_lines=True, out=out)
        reporter.say("caught-up", "balances: caught up at position 7", name="balances")
        reporter.close()
        out.seek(0)
        [line] = out.read().splitlines()
    record = json.loads(line)
    assert record["event"] == "caught-up"
    assert record["name"] == "balances"
    assert record["message"] == "balances: caught up at position 7"
    assert record["level"] == "info"


def test_graph_shows_the_whole_application(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "examples.bank.app:registry"]) == 0
    out = capsys.readouterr().out
    handlers = "examples.bank.handlers"
    assert f"OpenAccount -> {handlers}.open_account (handler)" in out  # command
    assert f"GetBalance -> {handlers}.get_balance (handler)" in out  # query
    assert "AccountOpened -> history (projection)" in out  # event read by a projection
    assert "Deposited -> balances (projection)" in out
    assert "history -[read by]-> " in out  # the query that reads the async read model
    assert "-[writes]-> " in out  # projection tables
    assert main(["graph", "examples.bank.app:registry", "--mermaid"]) == 0
    mermaid = capsys.readouterr().out
    assert mermaid.startswith("flowchart LR")
    assert '[["projection: history"]]' in mermaid


def test_graph_with_named_projections(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["graph", "tests.unit.appfixture:registry", "--projection", "tests.support.bank:balances"]
    )
    assert code == 0
    assert "Deposited -> balances (projection)" in capsys.readouterr().out


def _set_up(tmp_path: Path) -> tuple[str, str]:
    async def run() -> None:
        log = SqliteTestLog(tmp_path / "write.db")
        db = SqliteReadDatabase(str(tmp_path / "read.db"))
        [last] = await log.append("a", Deposited("a", 1))
        async with Projector(log, db, [balances], serializer) as p:
            for _ in range(200):  # bounded: 10 s at most
                if p.checkpoint("balances") >= last.position:
                    break
                await p.signal.wait(0.05)
        await db.close()
        log.close()

    asyncio.run(run())
    return f"sqlite:///{tmp_path / 'write.db'}", f"sqlite:///{tmp_path / 'read.db'}"


def test_empty_results_say_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, read = _set_up(tmp_path)
    assert main(["projections", "dead-letters", "--read", read, "balances"]) == 0
    assert capsys.readouterr().out == "balances: no dead letters\n"
    assert main(["projections", "dead-letters", "--read", read, "balances", "--retry"]) == 0
    assert capsys.readouterr().out == "balances: no dead letters to retry\n"
    empty = f"sqlite:///{tmp_path / 'fresh.db'}"
    SqliteReadDatabase(str(tmp_path / "fresh.db"))
    assert main(["projections", "status", "--store", store, "--read", read]) == 0
    table = capsys.readouterr().out
    assert "balances" in table
    assert "checkpoint" in table
    code = main(["projections", "status", "--store", store, "--read", empty])
    assert code == 2
    assert "no projection was ever set up" in capsys.readouterr().err

    async def bookkeeping_only() -> None:  # the tables exist, no projection registered yet
        from cqrskit.projections import schema

        db = SqliteReadDatabase(str(tmp_path / "fresh.db"))
        async with db.transaction() as session:
            await schema.install(session)
        await db.close()

    asyncio.run(bookkeeping_only())
    assert main(["projections", "status", "--store", store, "--read", empty]) == 0
    assert capsys.readouterr().out == "no projections are set up in this read database yet\n"


def test_unknown_projection_names_are_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, read = _set_up(tmp_path)
    assert main(["projections", "dead-letters", "--read", read, "balancez"]) == 2
    err = capsys.readouterr().err
    assert "unknown projection 'balancez'" in err
    assert "this read database has: balances" in err
    assert main(["projections", "status", "--store", store, "--read", read, "nope"]) == 2
    assert "unknown projection 'nope'" in capsys.readouterr().err
    assert main(["projections", "status", "--store", store, "--read", read, "balances"]) == 0


def test_a_missing_event_log_names_the_cli_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, read = _set_up(tmp_path)
    store = f"sqlite:///{tmp_path / 'nothing-here.db'}"
    assert main(["projections", "status", "--store", store, "--read", read]) == 2
    err = capsys.readouterr().err
    assert "--create-tables" in err
    assert "cqrskit ddl sqlite" in err
    assert "create_tables=True" not in err
    code = main(["projections", "status", "--store", store, "--read", read, "--create-tables"])
    assert code == 0


@pytest.mark.parametrize(
    "store",
    [
        "host=db user=app password=canary-s3cret dbname=app",  # a libpq key=value DSN
        "redis://:canary-s3cret@127.0.0.1:6379/0",  # not a store URL; 'redis' imports
        "mysql://app:canary-s3cret@db/app",
        "env:APP_DSN",
    ],
)
def test_a_store_location_that_is_no_store_is_not_echoed(
    store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APP_DSN", "host=db password=canary-s3cret")
    _, read = _set_up(tmp_path)
    assert main(["projections", "status", "--store", store, "--read", read]) == 2
    err = capsys.readouterr().err
    assert "canary-s3cret" not in err
    assert "package.module:attribute" in err, err


def test_a_command_group_is_one_register_call(capsys: pytest.CaptureFixture[str]) -> None:
    module = "tests.unit.cli_group_fixture"
    register_group(module)
    try:
        assert main(["hello", "--name", "ada"]) == 0
        assert capsys.readouterr().out == "hello ada\n"
    finally:
        GROUPS.remove(module)


def test_a_group_whose_extra_is_missing_fails_only_when_used(
    capsys: pytest.CaptureFixture[str],
) -> None:
    register_group("tests.unit.no_such_group_module")
    try:
        assert main(["ddl", "sqlite"]) == 0
        capsys.readouterr()
        assert main(["no_such_group_module", "x"]) == 2
        assert "No module named" in capsys.readouterr().err
    finally:
        GROUPS.remove("tests.unit.no_such_group_module")


def test_partition_tables_stay_aligned_with_postgresql_sized_positions(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cqrskit.cli.consume import print_partitions
    from cqrskit.projections.partitions import PartitionStatus

    monkeypatch.setenv("CQRSKIT_PLAIN", "1")
    big = 3_000_000 << 20  # a PostgreSQL position: transaction id << 20, 16 digits
    rows = [
        PartitionStatus("balances", 0, 2, "web-1:42:0badcafe", 1, big, 0, 0, None, None, 0.0),
        PartitionStatus("balances", 1, 2, None, 1, 7, 12, None, 13, 4.2, 0.0),
    ]
    print_partitions(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["partition", "position", "sequence", "lag", "owner", "gap"]
    first, second = lines[2], lines[3]
    # right-aligned numbers end in the same column, whatever their width
    assert first.index(str(big)) + len(str(big)) == second.index(" 7 ") + 2
    assert first.split()[:5] == ["0/2", str(big), "0", "0", "web-1:42:0badcafe"]
    assert second.split() == ["1/2", "7", "12", "-", "-", "at", "13", "(4", "s)"]


def test_stop_timeout_with_partitions_reaches_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a PartitionedProjector takes a stop timeout too: the option is handed over, not
    # refused (as it was before the worker had one) nor silently dropped
    seen: list[float] = []

    class Recording(PartitionedProjector):
        async def run(self) -> None:
            seen.append(self.stop_timeout)

    monkeypatch.setattr("cqrskit.cli.projections.PartitionedProjector", Recording)
    store, read = _set_up(tmp_path)
    args = ["projections", "run", "--store", store, "--read", read, "--partitions", "2"]
    args += [
        "--projection",
        "tests.support.bank:balances",
        "--decoder",
        "tests.support.bank:serializer",
    ]
    assert main([*args, "--stop-timeout", "30"]) == 0
    assert seen == [30.0]
