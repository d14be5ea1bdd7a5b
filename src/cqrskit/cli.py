"""The ``cqrskit`` command line: describe an application, print DDL, projection status.

Subcommands:

* ``cqrskit routes module:registry`` — every route as text;
* ``cqrskit graph module:registry`` — the same as a Mermaid flowchart;
* ``cqrskit ddl sqlite|postgres [--schema S] [--table T]`` — the event log's DDL;
* further subcommands are contributed by drivers and the read side (``ddl``,
  ``projections``) when their modules are importable.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cqrskit.describe import describe_mermaid, describe_text
from cqrskit.errors import ConfigurationError
from cqrskit.registry import Registry

__all__ = ["load_object", "main"]

Command = Callable[[argparse.Namespace], int]


def load_object(spec: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute.

    Raises:
        ConfigurationError: the spec is malformed, or the module or attribute is missing.
    """
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


def _registry(spec: str) -> Registry:
    obj = load_object(spec)
    registry = getattr(obj, "registry", obj)
    if not isinstance(registry, Registry):
        raise ConfigurationError(
            f"{spec!r} is a {type(obj).__name__}, not a Registry or Mediator.",
            hint="point at the Registry your handlers are registered in.",
        )
    return registry


def _routes(args: argparse.Namespace) -> int:
    sys.stdout.write(describe_text(_registry(args.target)))
    return 0


def _graph(args: argparse.Namespace) -> int:
    sys.stdout.write(describe_mermaid(_registry(args.target)))
    return 0


def _ddl(args: argparse.Namespace) -> int:
    if args.driver == "sqlite":
        from cqrskit.sqlite import sqlite_ddl

        sys.stdout.write(sqlite_ddl(args.table).rstrip() + "\n")
    else:
        from cqrskit.postgres import postgres_ddl

        sys.stdout.write(postgres_ddl(args.schema, args.table).rstrip() + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with every available subcommand."""
    parser = argparse.ArgumentParser(prog="cqrskit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    routes = sub.add_parser("routes", help="list every route of a registry as text")
    routes.add_argument("target", help="module:registry (or module:mediator)")
    routes.set_defaults(run=_routes)
    graph = sub.add_parser("graph", help="print the application graph as Mermaid")
    graph.add_argument("target", help="module:registry (or module:mediator)")
    graph.set_defaults(run=_graph)
    ddl = sub.add_parser("ddl", help="print the event log's DDL, for your own migrations")
    ddl.add_argument("driver", choices=["sqlite", "postgres"])
    ddl.add_argument("--schema", default="public", help="PostgreSQL schema (default public)")
    ddl.add_argument("--table", default="cqrskit_events", help="event log table name")
    ddl.set_defaults(run=_ddl)
    for module_name in ("cqrskit.ddl_cli", "cqrskit.projections.cli"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        register = getattr(module, "register_cli", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for usage and configuration errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Command = args.run
    try:
        return run(args)
    except ConfigurationError as exc:
        print(f"cqrskit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
