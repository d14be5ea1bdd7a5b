"""The ``cqrskit`` command line: see an application, print DDL, operate projections.

Commands::

    cqrskit routes module:registry        every message and its handler(s), as a table
    cqrskit graph module:registry         the whole application (text, or --mermaid)
    cqrskit ddl sqlite|postgres           the event log's DDL, for your own migrations
    cqrskit projections run|status|rebuild|dead-letters ...   (cqrskit.cli.projections)
    cqrskit relay run|status ...          the outbox relay to a broker (cqrskit.cli.relay)
    cqrskit consume run|status ...        broker consumers (cqrskit.cli.consume)

``python -m cqrskit`` is the same. Both put the working directory on the import path, so
``module:registry`` is found from the project root.

Each command group is a module with a ``register_cli(subparsers)`` function, added with one
:func:`register_group` call (in :data:`GROUPS` for the built-in ones). The CLI sits above
every technology package: it is what picks one from a URL.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from cqrskit.cli._load import load_object
from cqrskit.errors import ConfigurationError

__all__ = ["GROUPS", "build_parser", "load_object", "main", "register_group"]

Command = Callable[[argparse.Namespace], int]

GROUPS: list[str] = [
    "cqrskit.cli.describe",
    "cqrskit.cli.projections",
    "cqrskit.cli.relay",
    "cqrskit.cli.consume",
]
"""Modules whose ``register_cli(subparsers)`` adds their commands, in help order."""


def register_group(module: str) -> None:
    """Add the commands of ``module`` (which defines ``register_cli(subparsers)``) to the
    ``cqrskit`` CLI, e.g. ``register_group("cqrskit.cli.relay")`` for ``cqrskit relay ...``.

    The module is imported when the parser is built, so a group whose extra is missing
    only fails when that group is used.
    """
    if module not in GROUPS:
        GROUPS.append(module)


def _cwd_on_path() -> None:
    # ``python -m`` puts the working directory first on the import path; the console
    # script does not, so ``cqrskit routes myapp:registry`` run from the project root
    # would not find ``myapp`` without this
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


class _MissingGroup:
    """A command group whose module could not be imported (its extra is missing)."""

    def __init__(self, module: str, error: ImportError) -> None:
        self.module = module
        self.error = error

    def __call__(self, args: argparse.Namespace) -> int:
        print(f"cqrskit: {self.error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with every registered command group."""
    parser = argparse.ArgumentParser(
        prog="cqrskit",
        description="cqrskit: see a CQRS application and operate its projections.",
        epilog="cqrskit COMMAND --help describes each command and its options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in GROUPS:
        try:
            register = importlib.import_module(module).register_cli
        except ImportError as exc:
            name = module.rsplit(".", 1)[-1]
            missing = sub.add_parser(name, help=f"(unavailable: {exc})", add_help=False)
            missing.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            missing.set_defaults(run=_MissingGroup(module, exc))
            continue
        register(sub)
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
