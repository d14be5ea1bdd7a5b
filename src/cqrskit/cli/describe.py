"""``cqrskit routes``, ``cqrskit graph`` and ``cqrskit ddl``: see the application.

``graph`` shows the whole application — commands and queries with their handlers, events
with their handlers, projections with the events they read and the tables they write, and
the queries that read each projection (from their ``@reads(...)``) — as text, or as a
Mermaid flowchart with ``--mermaid``. Projections are found in the target's package (every
module-level :class:`~cqrskit.projections.Projection` in a module of that package that is
imported), or named with ``--projection``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cqrskit.cli._load import load_object
from cqrskit.cli._output import render_table
from cqrskit.describe import describe_mermaid, describe_text
from cqrskit.errors import ConfigurationError
from cqrskit.errors import describe as qualname
from cqrskit.projections.api import Projection
from cqrskit.projections.consistency import read_spec
from cqrskit.registry import Registry

__all__ = ["find_projections", "register_cli"]


def _registry(spec: str) -> Registry:
    obj = load_object(spec)
    registry = getattr(obj, "registry", obj)
    if not isinstance(registry, Registry):
        raise ConfigurationError(
            f"{spec!r} is a {type(obj).__name__}, not a Registry or Mediator.",
            hint="point at the Registry your handlers are registered in.",
        )
    return registry


def find_projections(spec: str) -> list[Projection]:
    """Module-level projections in the loaded modules of ``spec``'s top-level package."""
    package = spec.partition(":")[0].split(".")[0]
    found: dict[str, Projection] = {}
    for name, module in sorted(sys.modules.items()):
        if module is None or not (name == package or name.startswith(package + ".")):
            continue
        for value in list(vars(module).values()):
            items = value if isinstance(value, list | tuple) else [value]
            for item in items:
                if isinstance(item, Projection):
                    found.setdefault(item.name, item)
    return [found[n] for n in sorted(found)]


def _options(args: argparse.Namespace, registry: Registry) -> dict[str, Any]:
    if args.projection:
        projections: list[Projection] = []
        for spec in args.projection:
            obj = load_object(spec)
            for item in obj if isinstance(obj, list | tuple) else [obj]:
                if not isinstance(item, Projection):
                    raise ConfigurationError(f"--projection {spec!r} is not a Projection.")
                projections.append(item)
    else:
        projections = find_projections(args.target)
    reads: dict[type, list[str]] = {}
    for query_type in registry.queries():
        spec = read_spec(query_type)
        if spec is not None:
            reads[query_type] = list(spec.projections)
    return {"projections": projections, "reads": reads}


def _routes(args: argparse.Namespace) -> int:
    registry = _registry(args.target)
    rows: list[list[str]] = []
    for kind, table in (("command", registry.commands()), ("query", registry.queries())):
        for mtype, spec in sorted(table.items(), key=lambda kv: kv[0].__qualname__):
            rows.append([kind, mtype.__qualname__, qualname(spec.owner)])
    for mtype, specs in sorted(registry.events().items(), key=lambda kv: kv[0].__qualname__):
        for spec in specs:
            rows.append(["event", mtype.__qualname__, qualname(spec.owner)])
    if not rows:
        print(f"{args.target}: no handlers are registered")
        return 0
    sys.stdout.write(render_table(["kind", "message", "handler"], rows))
    return 0


def _graph(args: argparse.Namespace) -> int:
    registry = _registry(args.target)
    options = _options(args, registry)
    if args.mermaid:
        sys.stdout.write(describe_mermaid(registry, **options))
        return 0
    text = describe_text(registry, **options)
    sys.stdout.write(text or f"{args.target}: no handlers are registered\n")
    return 0


def _ddl(args: argparse.Namespace) -> int:
    if args.driver == "sqlite":
        from cqrskit.sqlite import sqlite_ddl

        sys.stdout.write(sqlite_ddl(args.table).rstrip() + "\n")
    else:
        from cqrskit.postgres import postgres_ddl

        sys.stdout.write(postgres_ddl(args.schema, args.table).rstrip() + "\n")
    return 0


def register_cli(sub: Any) -> None:
    """Add ``routes``, ``graph`` and ``ddl`` to the ``cqrskit`` CLI."""
    target_help = "module:attribute naming your Registry (or Mediator)"
    routes = sub.add_parser(
        "routes",
        help="list every message and its handler(s)",
        description="Every command, query and event with its handler(s), as a table.",
    )
    routes.add_argument("target", help=target_help)
    routes.set_defaults(run=_routes)
    graph = sub.add_parser(
        "graph",
        help="show the whole application: messages, handlers, events, projections, reads",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    graph.add_argument("target", help=target_help)
    graph.add_argument(
        "--projection",
        action="append",
        metavar="MODULE:ATTR",
        help="a projection (or list) to include; repeat for more (default: the projections "
        "defined in the target's package)",
    )
    graph.add_argument(
        "--mermaid",
        action="store_true",
        help="print a Mermaid flowchart (paste into Markdown) instead of text",
    )
    graph.set_defaults(run=_graph)
    ddl = sub.add_parser(
        "ddl",
        help="print the event log's DDL, for your own migrations",
        description="Print the event log's DDL (tables, indexes, the schema version row).",
    )
    ddl.add_argument("driver", choices=["sqlite", "postgres"], help="the database")
    ddl.add_argument("--schema", default="public", help="PostgreSQL schema (default: public)")
    ddl.add_argument(
        "--table", default="cqrskit_events", help="event log table (default: cqrskit_events)"
    )
    ddl.set_defaults(run=_ddl)
