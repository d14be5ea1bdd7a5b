"""Loading the objects an operator names on the command line (``module:attribute``)."""

from __future__ import annotations

import importlib
import re
from typing import Any

from cqrskit.errors import ConfigurationError

__all__ = ["load_object"]

_SPEC = re.compile(r"[A-Za-z0-9_.:]+")


def load_object(spec: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute.

    Raises:
        ConfigurationError: the spec is malformed, or the module or attribute is missing.
    """
    if not _SPEC.fullmatch(spec):
        # not even shaped like one: likely a DSN or URL (--store takes both), which may
        # hold a password, so it is not repeated
        raise ConfigurationError(
            "cannot load the value given: expected 'package.module:attribute' (the value "
            "is not shown, as it may hold a password).",
            hint="a store or read database is sqlite:///path or postgresql://...; other "
            "objects are named like myapp.handlers:registry",
        )
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(
            f"cannot load {spec!r}: expected 'package.module:attribute'.",
            hint="for example: cqrskit routes myapp.handlers:registry",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import module {module_name!r}: {exc}.",
            hint="run from the project root or set PYTHONPATH.",
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigurationError(
                f"module {module_name!r} has no attribute {attr!r}.",
                hint="name the Registry (or Mediator) object defined in that module.",
            ) from exc
    return obj
