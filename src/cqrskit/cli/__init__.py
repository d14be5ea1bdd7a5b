"""The ``cqrskit`` command line: describe an application, print DDL, projection status.

Subcommands:

* ``cqrskit routes module:registry`` — every route as text;
* ``cqrskit graph module:registry`` — the same as a Mermaid flowchart;
* ``cqrskit ddl sqlite|postgres [--schema S] [--table T]`` — the event log's DDL;
* ``cqrskit projections run|status|rebuild|dead-letters ...`` — see
  :mod:`cqrskit.cli.projections`;
* ``cqrskit relay run|status ...`` — the outbox relay, see :mod:`cqrskit.cli.relay`;
* ``cqrskit consume run|status ...`` — broker consumers, see :mod:`cqrskit.cli.consume`.

The CLI sits above every technology package: it is what picks one from a URL.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from cqrskit.cli._load import load_object
from cqrskit.describe import describe_mermaid, describe_text
from cqrskit.errors import ConfigurationError
from cqrskit.registry import Registry

__all__ = ["load_object", "main"]

Command = Callable[[argparse.Namespace], int]


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


def _cwd_on_path() -> None:
    # ``python -m`` puts the working directory first on the import path; the console
    # script does not, so ``cqrskit routes myapp:registry`` run from the project root
    # would not find ``myapp`` without this
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


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
    from cqrskit.cli.consume import register_cli as register_consume
    from cqrskit.cli.projections import register_cli
    from cqrskit.cli.relay import register_cli as register_relay

    register_cli(sub)
    register_relay(sub)
    register_consume(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for usage and configuration errors)."""
    _cwd_on_path()
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
