"""Every public parameter an operator sets is documented with its default: in the
callable's docstring and in docs/operations.md's parameter reference."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from cqrskit import Idempotency
from cqrskit.fastapi import install
from cqrskit.messaging import Consumer
from cqrskit.pipeline import recommended
from cqrskit.postgres import PostgresEventStore, PostgresReadDatabase
from cqrskit.projections import PartitionedProjector, Projector
from cqrskit.sqlite import SqliteEventStore, SqliteReadDatabase

OPERATIONS = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()

CALLABLES: list[tuple[str, Any, Any]] = [
    ("Projector", Projector, Projector),
    ("Idempotency.open", Idempotency.open, Idempotency.open),
    ("install", install, install),
    ("recommended", recommended, recommended),
    ("PostgresReadDatabase", PostgresReadDatabase, PostgresReadDatabase),
    ("PostgresEventStore.open", PostgresEventStore.open, PostgresEventStore.open),
    ("SqliteEventStore", SqliteEventStore, SqliteEventStore),
    ("SqliteReadDatabase", SqliteReadDatabase, SqliteReadDatabase),
    ("PartitionedProjector", PartitionedProjector, PartitionedProjector),
    ("Consumer", Consumer, Consumer),
]


@pytest.mark.parametrize(("name", "target", "doc_of"), CALLABLES, ids=[c[0] for c in CALLABLES])
def test_every_keyword_parameter_is_documented(name: str, target: Any, doc_of: Any) -> None:
    signature = inspect.signature(target)
    doc = inspect.getdoc(doc_of) or ""
    if name == "Idempotency.open":
        doc += inspect.getdoc(Idempotency) or ""
    if name == "PartitionedProjector":  # "Arguments are the Projector's, plus: ..."
        assert "Arguments are the :class:`~cqrskit.projections.Projector`'s" in doc
        doc += inspect.getdoc(Projector) or ""
    keywords = [p for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert keywords, name
    for param in keywords:
        assert f"{param.name}:" in doc or f"``{param.name}``" in doc, (name, param.name)
        assert param.name in OPERATIONS, (name, param.name)


def test_projector_defaults_in_the_reference_match_the_code() -> None:
    for param in inspect.signature(Projector).parameters.values():
        if param.kind is not param.KEYWORD_ONLY or param.default is None:
            continue
        default = param.default
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        row = next(line for line in OPERATIONS.splitlines() if line.startswith(f"| `{param.name}`"))
        assert shown in row, (param.name, row)


@pytest.mark.parametrize("cls", [PartitionedProjector, Consumer], ids=lambda c: c.__name__)
def test_the_stop_timeout_of_the_partitioned_workers_is_documented(cls: Any) -> None:
    """Their own docstring and the reference's paragraph on them give ``stop_timeout``
    with the code's default, and ``stop(timeout=None)``."""
    default = inspect.signature(cls).parameters["stop_timeout"].default
    assert default == 10.0
    assert "stop_timeout:" in (inspect.getdoc(cls) or "")
    assert "default 10" in (inspect.getdoc(cls) or "")
    assert list(inspect.signature(cls.stop).parameters) == ["self", "timeout"]
    reference = OPERATIONS[OPERATIONS.index("## Parameters and defaults") :]
    start = reference.index(f"`{cls.__name__}(")
    paragraph = reference[start : reference.index("\n\n", start)]
    assert "stop_timeout" in paragraph, paragraph
    assert f"{default:g}" in paragraph, paragraph
    assert "stop(timeout=None)" in paragraph, paragraph


def test_the_lease_owner_format_and_leading_are_documented() -> None:
    doc = inspect.getdoc(Projector) or ""
    assert "<hostname>:<pid>:<8 hex digits>" in doc
    assert "stands by" in (inspect.getdoc(Projector.leading) or "")
    assert "``None`` when no command" in (inspect.getdoc(Idempotency.lookup) or "")
    assert "outside a command" in (inspect.getdoc(SqliteEventStore.write_connection) or "")


def _shown(default: object) -> str:
    return f'"{default}"' if isinstance(default, str) else repr(default)


@pytest.mark.parametrize(
    ("name", "target"),
    [(n, t) for n, t, _ in CALLABLES if n not in ("Projector", "PartitionedProjector")],
    ids=[n for n, _, _ in CALLABLES if n not in ("Projector", "PartitionedProjector")],
)
def test_signatures_in_the_reference_show_the_real_defaults(name: str, target: Any) -> None:
    """The reference gives these as signatures, ``name=default``: each default as in the
    code (a changed default fails here until the reference says so)."""
    reference = OPERATIONS[OPERATIONS.index("## Parameters and defaults") :]
    reference = reference[: reference.index("\n## ")]
    start = reference.index(f"`{name}(")
    shown = " ".join(reference[start : reference.index(")`", start)].split())
    for param in inspect.signature(target).parameters.values():
        if param.kind is not param.KEYWORD_ONLY:
            continue
        if param.default is param.empty:
            assert f" {param.name}," in shown or f" {param.name})" in shown, (name, param.name)
        elif isinstance(param.default, str | int | float | bool | None):
            assert f"{param.name}={_shown(param.default)}" in shown, (name, param.name, shown)
