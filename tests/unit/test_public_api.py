"""The public surface: a sorted, complete ``__all__`` and a docstring on every public name."""

import importlib
import inspect
import pkgutil
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
