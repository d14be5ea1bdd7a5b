"""A command group for the CLI tests: ``cqrskit hello --name NAME``."""

from __future__ import annotations

import argparse
from typing import Any


def _hello(args: argparse.Namespace) -> int:
    print(f"hello {args.name}")
    return 0


def register_cli(sub: Any) -> None:
    hello = sub.add_parser("hello", help="say hello")
    hello.add_argument("--name", required=True, help="who to greet")
    hello.set_defaults(run=_hello)
