from __future__ import annotations

from dataclasses import dataclass

import pytest

from cqrskit import ConfigurationError
from cqrskit.cli import load_object, main
from cqrskit.describe import describe_mermaid, describe_text, graph_of
from tests.unit.appfixture import AccountOpened, GetAccount, OpenAccount, registry


@dataclass
class FakeProjection:
    name: str = "accounts"
    event_types: tuple[type, ...] = (AccountOpened,)
    tables: tuple[str, ...] = ("account_view",)


def test_graph_links_commands_events_projections_and_queries() -> None:
    graph = graph_of(
        registry,
        projections=[FakeProjection()],
        emits={OpenAccount: [AccountOpened]},
        reads={GetAccount: ["accounts"]},
    )
    labels = {(graph.nodes[a][1], graph.nodes[b][1], label) for a, b, label in graph.edges}
    assert ("OpenAccount", "tests.unit.appfixture.open_account", "") in labels
    assert ("tests.unit.appfixture.open_account", "AccountOpened", "records") in labels
    assert ("AccountOpened", "tests.unit.appfixture.welcome", "") in labels
    assert ("AccountOpened", "accounts", "") in labels
    assert ("accounts", "account_view", "writes") in labels
    assert ("accounts", "tests.unit.appfixture.get_account", "read by") in labels
    kinds = {graph.nodes[n][0] for n in graph.nodes}
    assert kinds == {"command", "query", "event", "handler", "projection", "table"}


def test_text_and_mermaid_render_every_edge() -> None:
    text = describe_text(registry)
    assert "OpenAccount -> tests.unit.appfixture.open_account (handler)" in text
    assert "GetAccount -> tests.unit.appfixture.get_account (handler)" in text
    mermaid = describe_mermaid(registry, emits={OpenAccount: [AccountOpened]})
    assert mermaid.startswith("flowchart LR\n")
    assert "-->|records|" in mermaid
    assert mermaid.count("-->") == len(
        graph_of(registry, emits={OpenAccount: [AccountOpened]}).edges
    )


def test_cli_routes_and_graph(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["routes", "tests.unit.appfixture:registry"]) == 0
    lines = capsys.readouterr().out.splitlines()
    [row] = [line for line in lines if "OpenAccount" in line]
    assert row.split()[:3] == ["command", "OpenAccount", "tests.unit.appfixture.open_account"]
    assert main(["graph", "tests.unit.appfixture:registry"]) == 0
    assert "OpenAccount -> tests.unit.appfixture.open_account (handler)" in (
        capsys.readouterr().out
    )
    assert main(["graph", "tests.unit.appfixture:registry", "--mermaid"]) == 0
    assert capsys.readouterr().out.startswith("flowchart LR")


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("no_colon", "expected 'package.module:attribute'"),
        ("tests.unit.missing_module:registry", "cannot import module"),
        ("tests.unit.appfixture:nothing", "has no attribute"),
        ("tests.unit.appfixture:not_a_registry", "not a Registry or Mediator"),
    ],
)
def test_cli_reports_bad_targets(
    target: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["routes", target]) == 2
    assert fragment in capsys.readouterr().err


def test_load_object_raises_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_object("tests.unit.appfixture:nothing")
    assert info.value.hint


def test_cli_prints_ddl(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ddl", "sqlite"]) == 0
    assert "CREATE TABLE IF NOT EXISTS" in capsys.readouterr().out
    assert main(["ddl", "postgres", "--schema", "app"]) == 0
    out = capsys.readouterr().out
    assert 'CREATE SCHEMA IF NOT EXISTS "app"' in out


def test_cli_ddl_refuses_bad_identifiers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ddl", "postgres", "--schema", "app; drop table x"]) == 2
    assert "invalid schema name" in capsys.readouterr().err
