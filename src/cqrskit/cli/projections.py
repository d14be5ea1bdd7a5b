"""Command line for projectors: ``cqrskit projections <command> ...`` (or
``python -m cqrskit.projections <command> ...``).

Commands::

    run           run projectors until SIGTERM/SIGINT (graceful: the batch in flight commits)
    status        checkpoint, lag (events, seconds) and dead letters per projection, and
                  the open writer of the event log that holds readers back, if any
    rebuild       start rebuilding a projection into a new generation
    dead-letters  list parked events; --retry flags them for the projector to re-apply

``--store`` is ``sqlite:///path/to/write.db`` or ``module:attr`` (an event store, or a
function returning one); ``--read`` is ``sqlite:///path/to/read.db`` or a PostgreSQL DSN
(``postgresql://...``); ``--projection`` and ``--decoder`` are ``module:attr``.

A DSN on the command line is visible to every user of the machine (``ps``): leave
``--store``/``--read`` out to read them from ``CQRSKIT_STORE``/``CQRSKIT_READ``, or pass
``env:NAME`` to read one from the environment variable ``NAME``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from cqrskit.cli._load import load_object
from cqrskit.errors import ConfigurationError, CqrsError
from cqrskit.eventlog import EventStore
from cqrskit.projections.api import Projection
from cqrskit.projections.db import ReadDatabase
from cqrskit.projections.runner import Projector
from cqrskit.projections.status import (
    dead_letters,
    projection_status,
    request_rebuild,
    request_retry,
)
from cqrskit.sqlite import SqliteReadDatabase

__all__ = ["load_object", "main", "open_read_db", "open_store", "register_cli"]


async def open_store(spec: str, schema: str | None = None, *, listen: bool = False) -> EventStore:
    """An event store from ``sqlite:///path``, a PostgreSQL DSN or ``module:attr``."""
    if spec.startswith("sqlite:///"):
        from cqrskit.sqlite import SqliteEventStore

        return SqliteEventStore(spec.removeprefix("sqlite:///"), create_tables=False)
    if spec.startswith(("postgresql://", "postgres://")):
        from cqrskit.postgres import PostgresEventStore

        return await PostgresEventStore.open(
            spec, schema=schema or "public", create_tables=False, notify=listen
        )
    obj = load_object(spec)
    if not isinstance(obj, EventStore) and callable(obj):
        obj = obj()
        if inspect.isawaitable(obj):
            obj = await obj
    if not isinstance(obj, EventStore):
        raise ConfigurationError(f"--store {spec!r} did not give an EventStore.")
    return obj


def open_read_db(url: str, schema: str | None = None) -> ReadDatabase:
    """A read database from ``sqlite:///path`` or ``postgresql://...``."""
    if url.startswith("sqlite:///"):
        return SqliteReadDatabase(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        from cqrskit.postgres import PostgresReadDatabase

        return PostgresReadDatabase(url, schema=schema or "public")
    raise ConfigurationError(
        "--read must be sqlite:///path or postgresql://... (the DSN is not echoed)."
    )


def load_projections(specs: Sequence[str]) -> list[Projection]:
    """Projections from ``module:attr`` specs (a projection or a sequence of them)."""
    out: list[Projection] = []
    for spec in specs:
        obj = load_object(spec)
        items = obj if isinstance(obj, list | tuple) else [obj]
        for item in items:
            if not isinstance(item, Projection):
                raise ConfigurationError(f"--projection {spec!r} is not a Projection.")
            out.append(item)
    return out


_LOCATIONS = {"store": "CQRSKIT_STORE", "read": "CQRSKIT_READ"}


def _connection_args(parser: argparse.ArgumentParser, *, store: bool = True) -> None:
    if store:
        parser.add_argument(
            "--store",
            help="sqlite:///path, DSN, module:attr or env:NAME (default: $CQRSKIT_STORE)",
        )
        parser.add_argument("--store-schema", help="PostgreSQL schema of the event log")
    parser.add_argument(
        "--read", help="sqlite:///path, a PostgreSQL DSN or env:NAME (default: $CQRSKIT_READ)"
    )
    parser.add_argument("--schema", help="PostgreSQL schema of the read models")


def resolve_locations(args: argparse.Namespace) -> None:
    """Fill ``--store``/``--read`` from the environment: ``env:NAME`` reads ``$NAME``, a
    missing option reads ``$CQRSKIT_STORE``/``$CQRSKIT_READ`` (DSNs stay out of ``ps``).

    Raises:
        ConfigurationError: neither the option nor its variable is set.
    """
    for name, default_var in _LOCATIONS.items():
        if not hasattr(args, name):
            continue
        value: str | None = getattr(args, name)
        if value is None:
            value = os.environ.get(default_var)
            if not value:
                raise ConfigurationError(
                    f"--{name} is missing and {default_var} is not set.",
                    hint=f"pass --{name} env:NAME or set {default_var}, which keeps a DSN "
                    "out of the process list.",
                )
        elif value.startswith("env:"):
            var = value.removeprefix("env:")
            value = os.environ.get(var)
            if not value:
                raise ConfigurationError(f"--{name} env:{var}: the variable {var} is not set.")
        setattr(args, name, value)


async def _close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if close is not None:
        result = close()
        if inspect.isawaitable(result):
            await result


def _add_commands(sub: Any) -> None:
    run = sub.add_parser("run", help="run projectors until SIGTERM/SIGINT")
    run.set_defaults(run=_runner(_run))
    _connection_args(run)
    run.add_argument("--projection", action="append", required=True)
    run.add_argument("--decoder", required=True)
    run.add_argument("--batch-size", type=int, default=500)
    run.add_argument("--lease-ttl", type=float, default=5.0)
    run.add_argument("--poll-interval", type=float, default=1.0)
    run.add_argument(
        "--listen",
        action="store_true",
        help="PostgreSQL: LISTEN for the writers' NOTIFY (writers need notify=True)",
    )
    run.add_argument("--owner")
    status = sub.add_parser("status", help="checkpoint, lag and dead letters")
    status.set_defaults(run=_runner(_status))
    _connection_args(status)
    status.add_argument("--json", action="store_true")
    rebuild = sub.add_parser("rebuild", help="rebuild a projection into a new generation")
    rebuild.set_defaults(run=_runner(_rebuild))
    _connection_args(rebuild, store=False)
    rebuild.add_argument("--projection", required=True)
    dead = sub.add_parser("dead-letters", help="list (or --retry) parked events")
    dead.set_defaults(run=_runner(_dead_letters))
    _connection_args(dead, store=False)
    dead.add_argument("name")
    dead.add_argument("--retry", action="store_true")
    dead.add_argument("--stream")
    dead.add_argument("--json", action="store_true")


def _runner(
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> Callable[..., int]:
    def run(args: argparse.Namespace) -> int:
        try:
            resolve_locations(args)
            return asyncio.run(command(args))
        except CqrsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def register_cli(sub: Any) -> None:
    """Add ``cqrskit projections <run|status|rebuild|dead-letters>`` to the ``cqrskit`` CLI."""
    parser = sub.add_parser("projections", help="run projectors; status, rebuild, dead letters")
    _add_commands(parser.add_subparsers(dest="projections_command", required=True))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cqrskit.projections")
    _add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


async def _run(args: argparse.Namespace) -> int:
    store = await open_store(args.store, args.store_schema, listen=args.listen)
    read_db = open_read_db(args.read, args.schema)
    projector = Projector(
        store,
        read_db,
        load_projections(args.projection),
        load_object(args.decoder),
        batch_size=args.batch_size,
        lease_ttl=args.lease_ttl,
        poll_interval=args.poll_interval,
        owner=args.owner,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, projector.request_stop)
    try:
        await projector.run()
    finally:
        await read_db.close()
        await _close(store)
    return 0


async def _status(args: argparse.Namespace) -> int:
    store = await open_store(args.store, args.store_schema)
    read_db = open_read_db(args.read, args.schema)
    try:
        rows = await projection_status(read_db, store)
    finally:
        await read_db.close()
        await _close(store)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    print(
        f"{'projection':20} {'mode':6} {'gen':>4} {'checkpoint':>12} {'lag':>8} "
        f"{'lag s':>8} {'dead':>5}  lease"
    )
    for r in rows:
        lag = f"{r.lag_events}{'+' if r.lag_capped else ''}"
        gen = f"{r.generation}" + (f">{r.rebuilding}" if r.rebuilding else "")
        print(
            f"{r.name:20} {r.mode:6} {gen:>4} {r.checkpoint:>12} {lag:>8} "
            f"{r.lag_seconds:>8.1f} {r.dead_letters:>5}  {r.lease_owner or '-'}"
        )
    held = rows[0] if rows and rows[0].oldest_appender_pid is not None else None
    if held is not None:
        age = held.oldest_appender_seconds
        print(
            f"readers held back by an open writer of the event log: pid "
            f"{held.oldest_appender_pid}, open {'?' if age is None else f'{age:.1f}'} s"
        )
    return 0


async def _rebuild(args: argparse.Namespace) -> int:
    [projection] = load_projections([args.projection])
    read_db = open_read_db(args.read, args.schema)
    try:
        generation = await request_rebuild(read_db, projection)
    finally:
        await read_db.close()
    print(f"{projection.name}: rebuilding into generation {generation}")
    return 0


async def _dead_letters(args: argparse.Namespace) -> int:
    read_db = open_read_db(args.read, args.schema)
    try:
        if args.retry:
            flagged = await request_retry(read_db, args.name, stream=args.stream)
            print(f"{args.name}: {flagged} parked event(s) flagged for retry")
            return 0
        letters = await dead_letters(read_db, args.name)
    finally:
        await read_db.close()
    if args.json:
        print(json.dumps([dataclasses.asdict(d) for d in letters]))
        return 0
    for d in letters:
        print(
            f"{d.position:>12} {d.stream} v{d.version} {d.type} attempts={d.attempts} "
            f"{'retry ' if d.retry else ''}{d.error}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the command; return the exit code."""
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
