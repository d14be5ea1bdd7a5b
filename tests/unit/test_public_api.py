"""The public surface: a sorted, complete ``__all__`` and a docstring on every public name."""

import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import cqrskit


def public_modules() -> list[ModuleType]:
    modules = [cqrskit]
    for info in pkgutil.walk_packages(cqrskit.__path__, prefix="cqrskit."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except ImportError as exc:  # a driver whose extra is missing is not a public-API bug
            if not isinstance(exc, cqrskit.MissingExtraError):
                raise
    return modules


MODULES = public_modules()


def own_doc(obj: Any) -> str | None:
    """The object's own docstring; a dataclass's generated signature does not count."""
    doc = obj.__doc__ if isinstance(obj, type) else inspect.getdoc(obj)
    if isinstance(obj, type) and doc and doc.startswith(obj.__name__ + "("):
        return None
    return doc.strip() if doc else None


def test_all_is_sorted() -> None:
    assert cqrskit.__all__ == sorted(cqrskit.__all__)


def test_all_has_no_duplicates_and_every_name_resolves() -> None:
    assert len(set(cqrskit.__all__)) == len(cqrskit.__all__)
    for name in cqrskit.__all__:
        assert getattr(cqrskit, name) is not None, name


def test_top_level_exports_the_core_contract() -> None:
    for name in ("Command", "Query", "Event", "Registry", "Mediator", "handler"):
        assert name in cqrskit.__all__
    assert cqrskit.__version__


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_module_declares_all_and_has_a_docstring(module: ModuleType) -> None:
    assert own_doc(module), f"{module.__name__} has no docstring"
    names = getattr(module, "__all__", None)
    assert names is not None, f"{module.__name__} has no __all__"
    for name in names:
        assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name!r}"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_public_names_have_docstrings(module: ModuleType) -> None:
    missing: list[str] = []
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # constants and type aliases cannot carry their own docstring
        if not own_doc(obj):
            missing.append(f"{module.__name__}.{name}")
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if attr.startswith("_"):
                    continue
                target = value.fget if isinstance(value, property) else value
                if isinstance(target, (staticmethod, classmethod)):
                    target = target.__func__
                if inspect.isfunction(target) and not inspect.getdoc(target):
                    missing.append(f"{module.__name__}.{name}.{attr}")
    assert missing == []


# -- import paths users write ---------------------------------------------------------------

_ROOT = Path(__file__).resolve().parents[2]
_FROM_IMPORT = re.compile(r"from (cqrskit[\w.]*) import ")
_MODULE_IMPORT = re.compile(r"(?<![\w.])import (cqrskit[\w.]*)")


def _imports_in(text: str) -> set[tuple[str, str | None]]:
    """``(module, name)`` for every ``from cqrskit... import name`` in ``text`` — one line,
    parenthesized over several lines, after ``>>>``, in prose backticks, with comments —
    and ``(module, None)`` for every ``import cqrskit....``."""
    found: set[tuple[str, str | None]] = set()
    for match in _FROM_IMPORT.finditer(text):
        rest = text[match.end() :]
        if rest.startswith("("):
            body = rest[1 : rest.index(")")]
        else:
            body = re.split(r"[`\n#;]", rest, maxsplit=1)[0]
        body = re.sub(r"#[^\n]*", "", body)
        for item in body.split(","):
            name = item.split(" as ")[0].strip()
            if name:
                found.add((match.group(1), name))
    for match in _MODULE_IMPORT.finditer(text):
        found.add((match.group(1), None))
    return found


def _documented_imports() -> set[tuple[str, str | None]]:
    """Every ``from cqrskit... import name`` and ``import cqrskit...`` in the README, docs
    and examples."""
    found: set[tuple[str, str | None]] = set()
    sources = [
        _ROOT / "README.md",
        *(_ROOT / "docs").glob("*.md"),
        *(_ROOT / "examples").rglob("*.py"),
    ]
    for path in sources:
        found |= _imports_in(path.read_text())
    return found


def test_the_import_scan_reads_every_form() -> None:
    text = """
from cqrskit import Mediator
from cqrskit.projections import (
    Projection,  # a comment
    Projector as Runner,
)
>>> from cqrskit.sqlite import SqliteEventStore  # the default
Use `from cqrskit.postgres import PostgresEventStore` for PostgreSQL.
# for PostgreSQL: from cqrskit.postgres import postgres_ddl; print(postgres_ddl("app"))
import cqrskit.testing.eventlog
"""
    assert _imports_in(text) == {
        ("cqrskit", "Mediator"),
        ("cqrskit.projections", "Projection"),
        ("cqrskit.projections", "Projector"),
        ("cqrskit.sqlite", "SqliteEventStore"),
        ("cqrskit.postgres", "PostgresEventStore"),
        ("cqrskit.postgres", "postgres_ddl"),
        ("cqrskit.testing.eventlog", None),
    }


# Import paths of earlier releases, kept working when definitions moved (issue #9 layout).
_LEGACY = [
    ("cqrskit.projections", "SqliteReadDatabase", "cqrskit.sqlite"),
    ("cqrskit.projections.sqlite", "SqliteReadDatabase", "cqrskit.sqlite"),
    ("cqrskit.projections.postgres", "PostgresReadDatabase", "cqrskit.postgres"),
    ("cqrskit.idempotency", "sqlite_idempotency_ddl", "cqrskit.sqlite"),
    ("cqrskit.idempotency", "postgres_idempotency_ddl", "cqrskit.postgres"),
    ("cqrskit.testing_eventlog", "EventStoreConformance", "cqrskit.testing.eventlog"),
    ("cqrskit.postgres", "PostgresEventStore", "cqrskit.postgres.eventlog"),
    ("cqrskit.postgres", "postgres_ddl", "cqrskit.postgres._sql"),
    ("cqrskit.sqlite", "SqliteEventStore", "cqrskit.sqlite.eventlog"),
    ("cqrskit.sqlite", "sqlite_ddl", "cqrskit.sqlite.eventlog"),
]


def test_every_documented_import_works() -> None:
    imports = _documented_imports()
    assert len(imports) > 50  # the scan found the docs' imports
    broken = []
    # the messaging and replication pages are read too (their imports are in the set)
    assert ("cqrskit.messaging", "Relay") in imports
    assert ("cqrskit.postgres.replica", "PostgresReplicaRouter") in imports
    for module, name in sorted(imports, key=str):
        try:
            imported = importlib.import_module(module)
            if name is not None:
                getattr(imported, name)
        except (ImportError, AttributeError) as exc:
            broken.append(f"from {module} import {name}: {exc}")
    assert broken == []


@pytest.mark.parametrize(("old", "name", "new"), _LEGACY)
def test_moved_names_keep_their_old_import_path(old: str, name: str, new: str) -> None:
    assert getattr(importlib.import_module(old), name) is getattr(
        importlib.import_module(new), name
    )
