"""Former home of ``SqliteReadDatabase`` and ``SqliteSession``, which live in
:mod:`cqrskit.sqlite` now (one package per technology). This alias keeps the import path of
earlier releases working without the side-neutral ``cqrskit.projections`` package importing
a driver up front."""

import importlib
from typing import Any

__all__: list[str] = []  # nothing new is defined here

_MOVED = ("SqliteReadDatabase", "SqliteSession")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module("cqrskit.sqlite.readdb"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
