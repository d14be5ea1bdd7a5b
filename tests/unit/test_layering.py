"""Which way the imports of ``src/cqrskit`` point (docs/architecture.md, "The layers").

Read from the source with :mod:`ast`, so every import counts: at module level, inside a
function, under ``TYPE_CHECKING`` and ``importlib.import_module("cqrskit....")``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

_SRC = Path(__file__).resolve().parents[2] / "src"
_PACKAGE = _SRC / "cqrskit"

TECHNOLOGIES = {"postgres", "sqlite", "nats", "rabbitmq", "redis"}
# what picks a technology from a URL or a setting, and the kits, which sit on top
PICKERS = {"cli", "fastapi", "sqlalchemy", "__main__"}
KITS = {"testing", "testing_eventlog"}
# the import paths of earlier releases: thin aliases that load the new home on first use
LEGACY_ALIASES = {
    ("cqrskit.projections", "cqrskit.sqlite"),
    ("cqrskit.projections.postgres", "cqrskit.postgres.readdb"),
    ("cqrskit.projections.sqlite", "cqrskit.sqlite.readdb"),
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module
    names: tuple[str, ...]
    lazy: bool  # inside a function (runs when called, not when the module is imported)
    line: int

    def __str__(self) -> str:
        names = f" ({', '.join(self.names)})" if self.names else ""
        return f"{self.source}:{self.line} -> {self.target}{names}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(_SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports_of(path: Path) -> list[Import]:
    module = _module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".")
                    if path.name != "__init__.py":
                        base = base[:-1]
                    base = base[: len(base) - child.level + 1]
                    target = ".".join([*base, child.module] if child.module else base)
                else:
                    target = child.module or ""
                names = tuple(a.name for a in child.names)
                found.append(Import(module, target, names, inner, child.lineno))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, alias.name, (), inner, child.lineno))
            elif (
                isinstance(child, ast.Call)
                and ast.unparse(child.func).endswith("import_module")
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
            ):
                found.append(Import(module, child.args[0].value, (), inner, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return [i for i in found if i.target == "cqrskit" or i.target.startswith("cqrskit.")]


def _all_imports() -> list[Import]:
    return [i for path in sorted(_PACKAGE.rglob("*.py")) for i in _imports_of(path)]


IMPORTS = _all_imports()


def _room(module: str) -> str:
    """The first name below ``cqrskit``: a package or a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> str:
    """The room, or ``__main__`` for an entry point (``python -m cqrskit.projections``)."""
    return "__main__" if module.endswith(".__main__") else _room(module)


def _targets(imp: Import) -> set[str]:
    """The rooms an import reaches (``from cqrskit import postgres`` reaches ``postgres``)."""
    room = _room(imp.target)
    return {room} if room else set(imp.names)


def test_the_scan_reads_the_package() -> None:
    rooms = {_room(i.source) for i in IMPORTS}
    assert TECHNOLOGIES | {"cli", "projections", "messaging", "_dispatch"} <= rooms
    assert len(IMPORTS) > 300


def test_a_technology_imports_ports_never_a_picker_a_kit_or_another_technology() -> None:
    wrong = [
        str(i)
        for i in IMPORTS
        if _room(i.source) in TECHNOLOGIES
        and any(
            t in PICKERS | KITS or (t in TECHNOLOGIES and t != _room(i.source)) for t in _targets(i)
        )
    ]
    assert wrong == []


def test_side_neutral_modules_import_no_technology_picker_or_kit() -> None:
    upper = TECHNOLOGIES | PICKERS | KITS
    wrong = [
        str(i)
        for i in IMPORTS
        if _layer(i.source) not in upper
        and (i.source, i.target) not in LEGACY_ALIASES
        and _targets(i) & upper
    ]
    assert wrong == []


def test_legacy_aliases_load_their_new_home_lazily() -> None:
    aliases = [i for i in IMPORTS if (i.source, i.target) in LEGACY_ALIASES]
    assert {(i.source, i.target) for i in aliases} == LEGACY_ALIASES
    assert all(i.lazy for i in aliases)


def test_pickers_import_a_technology_only_when_they_pick_it() -> None:
    # ``cqrskit --help`` and ``import cqrskit.fastapi`` load no driver nobody asked for
    eager = [
        str(i)
        for i in IMPORTS
        if _layer(i.source) in PICKERS and not i.lazy and _targets(i) & TECHNOLOGIES
    ]
    # annotations only (``if TYPE_CHECKING:`` blocks) do not run
    eager = [e for e in eager if not _under_type_checking(e)]
    assert eager == []


def _under_type_checking(row: str) -> bool:
    module, line = row.split(" -> ")[0].rsplit(":", 1)
    path = _SRC / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            end = node.body[-1].end_lineno or node.lineno
            if node.lineno <= int(line) <= end:
                return True
    return False


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("projections", "messaging"),  # the read side sits below messaging mode
        ("pipeline", "mediator"),  # behaviors sit below the mediator that folds them
        ("pipeline", "_dispatch"),
        ("pipeline", "sync"),
        ("_dispatch", "mediator"),  # the compiler serves both front-ends
        ("_dispatch", "sync"),
    ],
)
def test_lower_layer_never_imports_upper(lower: str, upper: str) -> None:
    wrong = [str(i) for i in IMPORTS if _room(i.source) == lower and upper in _targets(i)]
    assert wrong == []


def test_technologies_pickers_and_kits_use_only_public_modules_of_the_core() -> None:
    upper = TECHNOLOGIES | PICKERS | KITS
    private = [
        str(i)
        for i in IMPORTS
        if _layer(i.source) in upper
        and _room(i.target) not in upper
        and _room(i.target) != _room(i.source)
        and any(part.startswith("_") for part in i.target.split(".")[2:])
    ]
    assert private == []


@pytest.mark.parametrize("owner", ["serialization", "mediator"])
def test_idempotency_uses_only_public_names_of(owner: str) -> None:
    private = [
        str(i)
        for i in IMPORTS
        if i.source == "cqrskit.idempotency"
        and _room(i.target) == owner
        and (
            any(part.startswith("_") for part in i.target.split(".")[2:])
            or any(n.startswith("_") for n in i.names)
        )
    ]
    assert private == []
    assert any(_room(i.target) == owner for i in IMPORTS if i.source == "cqrskit.idempotency")


def test_importing_the_read_side_loads_no_messaging_and_no_technology() -> None:
    code = (
        "import sys, pkgutil, importlib, cqrskit.projections as p\n"
        "for m in pkgutil.iter_modules(p.__path__):\n"
        "    if m.name not in ('__main__', 'postgres', 'sqlite'):\n"
        "        importlib.import_module('cqrskit.projections.' + m.name)\n"
        "import cqrskit.eventlog, cqrskit.idempotency, cqrskit.mediator, cqrskit.sync\n"
        "print(sorted({n.split('.')[1] for n in sys.modules\n"
        "              if n.startswith('cqrskit.') and n.count('.') >= 1}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(_SRC)},
    ).stdout
    loaded = set(ast.literal_eval(out))
    assert "projections" in loaded
    assert loaded.isdisjoint(TECHNOLOGIES | PICKERS | KITS | {"messaging"})


def _side_neutral_sources() -> list[tuple[str, ast.Module]]:
    upper = TECHNOLOGIES | PICKERS | KITS
    found = []
    for path in sorted(_PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if _layer(module) not in upper:
            found.append((module, ast.parse(path.read_text(), str(path))))
    return found


def test_side_neutral_modules_never_branch_on_the_database_name() -> None:
    # what differs between databases is the session's SqlFlavor (projections/db.py)
    wrong = [
        f"{module}:{node.lineno}"
        for module, tree in _side_neutral_sources()
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and any(
            isinstance(side, ast.Attribute | ast.Name)
            and (side.attr if isinstance(side, ast.Attribute) else side.id) == "dialect"
            for side in (node.left, *node.comparators)
        )
    ]
    assert wrong == []


# SQL one database has and the other lacks: only a technology's SqlFlavor spells it
_DATABASE_ONLY_SQL = ("pg_", "set_config", "FOR UPDATE", "FOR SHARE", "FOR NO KEY", "SKIP LOCKED")


def test_side_neutral_modules_hold_no_database_specific_sql() -> None:
    wrong = []
    for module, tree in _side_neutral_sources():
        # text standing alone (docstrings, attribute docs) is prose, not a statement
        docstrings = {
            id(node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        }
        wrong += [
            f"{module}:{node.lineno}: {node.value!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and any(token in node.value for token in _DATABASE_ONLY_SQL)
        ]
    assert wrong == []


def test_the_sqlalchemy_wrappers_use_only_public_members_of_the_store_they_wrap() -> None:
    # each wrapper holds its PostgreSQL or SQLite store as ``events``; it writes through the
    # store's public seam (append_statement / append_through, translate_error,
    # commit_timeout, encoder, notify_committed), never through its internals
    path = _PACKAGE / "sqlalchemy.py"
    tree = ast.parse(path.read_text(), str(path))
    reached = [
        f"sqlalchemy.py:{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and ast.unparse(node.value).split(".")[-1] in {"events", "pg"}
    ]
    uses = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and ast.unparse(node.value).endswith("events")
    }
    assert reached == []
    assert {"append_statement", "append_through", "translate_error", "notify_committed"} <= uses


def test_no_source_module_is_over_800_lines() -> None:
    """The layout's size rule (#9): a module past 800 lines is split by concern."""
    root = Path(__file__).resolve().parents[2] / "src" / "cqrskit"
    sizes = {
        str(p.relative_to(root)): len(p.read_text(encoding="utf-8").splitlines())
        for p in root.rglob("*.py")
    }
    assert len(sizes) > 50
    assert {name: n for name, n in sizes.items() if n > 800} == {}
