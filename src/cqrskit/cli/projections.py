"""Command line for projectors: ``cqrskit projections <command> ...`` (or
``python -m cqrskit.projections <command> ...``).

Commands::

    run           run projectors until SIGTERM/SIGINT (graceful: the batch in flight commits);
                  with --partitions N, a partitioned worker sharing N partitions
    status        checkpoint, lag (events, seconds) and dead letters per projection (and
                  each partition's owner, checkpoint, lag and gap), and the open writer of
                  the event log that holds readers back, if any
    rebuild       start rebuilding a projection into a new generation (--partitions M: with
                  another number of partitions; --cancel: drop a partitioned one pending)
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
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from cqrskit.cli._load import load_object
from cqrskit.cli._monitor import Monitor
from cqrskit.cli._output import Progress, Reporter, print_partitions, render_table
from cqrskit.errors import ConfigurationError, CqrsError
from cqrskit.eventlog import EventStore
from cqrskit.projections.api import Projection
from cqrskit.projections.db import ReadDatabase
from cqrskit.projections.partitioned import PartitionedProjector
from cqrskit.projections.partitions import PARTITIONED_MODES, partition_status
from cqrskit.projections.runner import Projector
from cqrskit.projections.status import (
    RebuildProgress,
    cancel_rebuild,
    dead_letters,
    projection_status,
    rebuild_progress,
    request_rebuild,
    request_retry,
)

__all__ = ["load_object", "main", "open_read_db", "open_store", "register_cli"]


async def open_store(
    spec: str, schema: str | None = None, *, listen: bool = False, create_tables: bool = False
) -> EventStore:
    """An event store from ``sqlite:///path``, a PostgreSQL DSN or ``module:attr``.

    Raises:
        ConfigurationError: the event log does not exist (and ``create_tables`` is off), or
            ``module:attr`` does not give an event store.
    """
    try:
        if spec.startswith("sqlite:///"):
            from cqrskit.sqlite import SqliteEventStore

            return SqliteEventStore(spec.removeprefix("sqlite:///"), create_tables=create_tables)
        if spec.startswith(("postgresql://", "postgres://")):
            from cqrskit.postgres import PostgresEventStore

            return await PostgresEventStore.open(
                spec, schema=schema or "public", create_tables=create_tables, notify=listen
            )
    except ConfigurationError as exc:
        if "does not exist" not in exc.text:
            raise
        driver = "sqlite" if spec.startswith("sqlite") else "postgres"
        # the drivers' hint names the Python argument; on the command line it is an option
        raise ConfigurationError(
            exc.text,
            hint="start the application that writes the log first, pass --create-tables, "
            f"or apply the output of `cqrskit ddl {driver}` in your migrations.",
        ) from None
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
        from cqrskit.sqlite import SqliteReadDatabase

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


_LOCATIONS = {"store": "CQRSKIT_STORE", "read": "CQRSKIT_READ", "broker": "CQRSKIT_BROKER"}


def _connection_args(parser: argparse.ArgumentParser, *, store: bool = True) -> None:
    if store:
        parser.add_argument(
            "--store",
            metavar="LOCATION",
            help="the event log: sqlite:///path, a PostgreSQL DSN, module:attr (an event "
            "store or a function returning one) or env:NAME (default: $CQRSKIT_STORE)",
        )
        parser.add_argument(
            "--store-schema",
            metavar="SCHEMA",
            help="PostgreSQL schema of the event log (default: public)",
        )
        parser.add_argument(
            "--create-tables",
            action="store_true",
            help="create the event log tables if they are missing (the application that "
            "writes the log usually does)",
        )
    parser.add_argument(
        "--read",
        metavar="LOCATION",
        help="the read database: sqlite:///path, a PostgreSQL DSN or env:NAME "
        "(default: $CQRSKIT_READ)",
    )
    parser.add_argument(
        "--schema",
        metavar="SCHEMA",
        help="PostgreSQL schema of the read models and bookkeeping (default: public)",
    )


def resolve_locations(args: argparse.Namespace) -> None:
    """Fill ``--store``/``--read`` (and a command's ``--broker``) from the environment:
    ``env:NAME`` reads ``$NAME``, a missing option reads ``$CQRSKIT_STORE``,
    ``$CQRSKIT_READ`` or ``$CQRSKIT_BROKER`` (DSNs and URLs stay out of ``ps``).

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
                    "or a password out of the process list.",
                )
        elif value.startswith("env:"):
            var = value.removeprefix("env:")
            value = os.environ.get(var)
            if not value:
                raise ConfigurationError(f"--{name} env:{var}: the variable {var} is not set.")
        setattr(args, name, value)


def _stop_seconds(text: str) -> float:
    """``--stop-timeout``'s value: a finite number of seconds >= 0 (0: abandon at once)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds >= 0 (e.g. 10 or 2.5; 0 abandons the "
            "batches in flight at once)"
        )
    return value


def stop_timeout_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--stop-timeout SECONDS`` (default: the library's 10 s); ``what`` says what is
    abandoned when it runs out."""
    parser.add_argument(
        "--stop-timeout",
        type=_stop_seconds,
        metavar="SECONDS",
        help=f"on SIGTERM/SIGINT, how long {what} may take to finish before it is "
        "abandoned (nothing of it is marked done: the next lease holder does it again) "
        "and the lease released (default: 10)",
    )


async def _close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if close is not None:
        result = close()
        if inspect.isawaitable(result):
            await result


def _add_commands(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run projectors until SIGTERM/SIGINT",
        description="Run projectors until SIGTERM or SIGINT (the batches in flight commit, "
        "or are abandoned after --stop-timeout; the leases are released). Prints one line "
        "per change: lease taken or waiting, caught up, lag.",
    )
    run.set_defaults(run=_runner(_run))
    _connection_args(run)
    run.add_argument(
        "--projection",
        action="append",
        required=True,
        metavar="MODULE:ATTR",
        help="a projection (or a list of them) to run; repeat for more",
    )
    run.add_argument(
        "--decoder",
        required=True,
        metavar="MODULE:ATTR",
        help="turns stored events into events: a serializer or a function",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=500,
        metavar="N",
        help="events per read-database transaction (default: 500)",
    )
    run.add_argument(
        "--lease-ttl",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds without a heartbeat before a standby takes the lease over (default: 5)",
    )
    run.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="longest idle wait between reads when no wake-up comes (default: 1)",
    )
    stop_timeout_arg(run, "the batches in flight")
    run.add_argument(
        "--listen",
        action="store_true",
        help="PostgreSQL: LISTEN for the writers' NOTIFY (writers need notify=True): "
        "wake at once on a commit instead of polling",
    )
    run.add_argument(
        "--owner",
        metavar="ID",
        help="lease owner id shown by status (default: <hostname>:<pid>:<random hex>)",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="log one JSON object per line on stderr (for log collectors)",
    )
    run.add_argument(
        "--partitions",
        type=int,
        metavar="N",
        help="split the work into N partitions shared by every process started with the "
        "same N (PartitionedProjector)",
    )
    run.add_argument(
        "--max-partitions", type=int, metavar="K", help="with --partitions: hold at most K"
    )
    status = sub.add_parser(
        "status",
        help="checkpoint, lag and dead letters per projection",
        description="Where each projection stands: generation, checkpoint, lag in events "
        "and seconds, dead letters and the lease holder.",
    )
    status.set_defaults(run=_runner(_status))
    _connection_args(status)
    status.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="only these projections (default: every projection set up)",
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rebuild = sub.add_parser(
        "rebuild",
        help="rebuild a projection into a new generation",
        description="Create the next generation's empty tables; the projector holding the "
        "lease replays the log into them and switches over when caught up. A partitioned "
        "projection's new generation gets partitions of its own (--partitions M to change "
        "their number), built by the workers started with that number while the others "
        "keep serving. With --wait, show its progress until then.",
    )
    rebuild.set_defaults(run=_runner(_rebuild))
    _connection_args(rebuild, store=False)
    rebuild.add_argument(
        "--projection",
        required=True,
        metavar="MODULE:ATTR",
        help="the projection to rebuild",
    )
    rebuild.add_argument(
        "--partitions",
        type=int,
        metavar="M",
        help="partitioned projections: build the new generation with M partitions (default: "
        "as many as now); workers started with --partitions M build it and serve it after "
        "the switch, those with the old number stop then",
    )
    rebuild.add_argument(
        "--cancel",
        action="store_true",
        help="partitioned projections: drop the generation being rebuilt (its workers stop "
        "building it); the active one is untouched",
    )
    rebuild.add_argument(
        "--wait",
        action="store_true",
        help="follow the rebuild (progress) until the projector switches over",
    )
    rebuild.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="with --wait: give up waiting after this long (default: 3600)",
    )
    dead = sub.add_parser(
        "dead-letters",
        help="list (or --retry) parked events",
        description="List a projection's parked events, or flag them for the projector to "
        "apply again (--retry).",
    )
    dead.set_defaults(run=_runner(_dead_letters))
    _connection_args(dead, store=False)
    dead.add_argument("name", help="the projection's name")
    dead.add_argument(
        "--retry",
        action="store_true",
        help="flag the parked events for the projector to apply again, in order",
    )
    dead.add_argument("--stream", metavar="STREAM", help="with --retry: only this stream's events")
    dead.add_argument(
        "--wait",
        action="store_true",
        help="with --retry: follow the replay (progress) until every flagged event was tried",
    )
    dead.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="with --wait: give up waiting after this long (default: 600)",
    )
    dead.add_argument("--json", action="store_true", help="print JSON instead of a table")


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
    parser = sub.add_parser(
        "projections",
        help="run projectors; status, rebuild, dead letters",
        description="Run projectors and operate on projections.",
    )
    _add_commands(parser.add_subparsers(dest="projections_command", required=True))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cqrskit.projections")
    _add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


async def _run(args: argparse.Namespace) -> int:
    reporter = Reporter(json_lines=args.json)
    try:
        store = await open_store(
            args.store, args.store_schema, listen=args.listen, create_tables=args.create_tables
        )
        read_db = open_read_db(args.read, args.schema)
        projections = load_projections(args.projection)
        projector: Projector | PartitionedProjector
        if args.partitions:
            projector = PartitionedProjector(
                store,
                read_db,
                projections,
                load_object(args.decoder),
                partitions=args.partitions,
                max_partitions=args.max_partitions,
                batch_size=args.batch_size,
                lease_ttl=args.lease_ttl,
                poll_interval=args.poll_interval,
                owner=args.owner,
                stop_timeout=10.0 if args.stop_timeout is None else args.stop_timeout,
            )
        else:
            projector = Projector(
                store,
                read_db,
                projections,
                load_object(args.decoder),
                batch_size=args.batch_size,
                lease_ttl=args.lease_ttl,
                poll_interval=args.poll_interval,
                owner=args.owner,
                stop_timeout=10.0 if args.stop_timeout is None else args.stop_timeout,
            )
        names = [p.name for p in projections]
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, projector.request_stop)
        reporter.say(
            "started",
            f"projector {projector.owner} started: {', '.join(names)} "
            f"(batch {args.batch_size}, lease ttl {args.lease_ttl:g} s"
            f"{', listening' if args.listen else ''})",
            owner=projector.owner,
            projections=names,
        )
        monitor = asyncio.ensure_future(Monitor(projector, names, reporter).run())
        try:
            await projector.run()
        finally:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
            await read_db.close()
            await _close(store)
        reporter.say("stopped", f"projector {projector.owner} stopped; leases released")
        return 0
    finally:
        reporter.close()


async def _status(args: argparse.Namespace) -> int:
    store = await open_store(args.store, args.store_schema, create_tables=args.create_tables)
    read_db = open_read_db(args.read, args.schema)
    try:
        rows = await projection_status(read_db, store)
        parts = {
            r.name: await partition_status(read_db, r.name, store)
            for r in rows
            if r.mode in PARTITIONED_MODES
        }
        building = {
            r.name: await partition_status(read_db, r.name, store, generation=r.rebuilding)
            for r in rows
            if r.mode in PARTITIONED_MODES and r.rebuilding is not None
        }
    finally:
        await read_db.close()
        await _close(store)
    if args.names:
        _known(args.names, [r.name for r in rows])
        rows = [r for r in rows if r.name in args.names]
    if args.json:
        out = []
        for r in rows:
            row = r.as_dict()
            if r.name in parts:
                row["partitions"] = [x.as_dict() for x in parts[r.name]]
            if building.get(r.name):
                row["rebuilding_partitions"] = [x.as_dict() for x in building[r.name]]
            out.append(row)
        print(json.dumps(out, indent=2))
        return 0
    if not rows:
        print("no projections are set up in this read database yet")
        return 0
    table = []
    for r in rows:
        lag = f"{r.lag_events}{'+' if r.lag_capped else ''}"
        gen = f"{r.generation}" + (f" > {r.rebuilding}" if r.rebuilding else "")
        table.append(
            [
                r.name,
                r.mode,
                gen,
                r.checkpoint,
                lag,
                f"{r.lag_seconds:.1f}",
                r.dead_letters,
                r.lease_owner or "-",
            ]
        )
    headers = ["projection", "mode", "gen", "checkpoint", "lag", "lag s", "dead", "lease"]
    sys.stdout.write(render_table(headers, table, right=[2, 3, 4, 5, 6]))
    for r in rows:
        if r.name in parts:
            print(f"{r.name} partitions:")
            print_partitions(parts[r.name])
            if building.get(r.name):
                print(f"{r.name} partitions of generation {r.rebuilding} (rebuilding):")
                print_partitions(building[r.name])
    held = rows[0] if rows and rows[0].oldest_appender_pid is not None else None
    if held is not None:
        age = held.oldest_appender_seconds
        print(
            f"readers held back by an open writer of the event log: pid "
            f"{held.oldest_appender_pid}, open {'?' if age is None else f'{age:.1f}'} s"
        )
    return 0


def _known(asked: Sequence[str], known: Sequence[str]) -> None:
    unknown = [n for n in asked if n not in known]
    if unknown:
        listed = ", ".join(sorted(known)) or "none"
        raise ConfigurationError(
            f"unknown projection {', '.join(map(repr, unknown))}; this read database has: "
            f"{listed}.",
            hint="check the name (and --read/--schema), or run its projector once to set it up.",
        )


async def _names(read_db: ReadDatabase) -> list[str]:
    async with read_db.read_only() as s:
        try:
            async with s.savepoint():
                rows = await s.fetchall("SELECT name FROM cqrskit_projections ORDER BY name")
        except Exception:  # noqa: BLE001 - no bookkeeping tables: nothing was set up
            return []
    return [str(r[0]) for r in rows]


async def _switched(read_db: ReadDatabase, name: str, generation: int) -> bool:
    async with read_db.read_only() as s:
        active = await s.fetchval(
            "SELECT active_generation FROM cqrskit_projections WHERE name = ?", name
        )
    return active is not None and int(active) == generation


def _explain(p: RebuildProgress) -> str:
    if p.partitions is None:
        return "the projector holding its lease replays the log, then switches over"
    if p.active_partitions in (None, p.partitions):
        return (
            f"the partitioned workers (--partitions {p.partitions}) replay the log into it "
            "beside serving the active generation, then switch over"
        )
    return (
        f"start workers with --partitions {p.partitions} to build it; those with "
        f"--partitions {p.active_partitions} keep serving until the switch, then stop: start "
        f"them again with --partitions {p.partitions}"
    )


async def _rebuild(args: argparse.Namespace) -> int:
    [projection] = load_projections([args.projection])
    name = projection.name
    read_db = open_read_db(args.read, args.schema)
    try:
        if args.cancel:
            if args.partitions is not None or args.wait:
                raise ConfigurationError("--cancel takes neither --partitions nor --wait.")
            cancelled = await cancel_rebuild(read_db, projection)
            if cancelled is None:
                print(f"{name}: no rebuild is pending")
            else:
                print(f"{name}: the rebuild into generation {cancelled} was cancelled")
            return 0
        generation = await request_rebuild(read_db, projection, partitions=args.partitions)
        plan = await rebuild_progress(read_db, name)
        split = (
            "" if plan is None or plan.partitions is None else f" ({plan.partitions} partitions)"
        )
        print(f"{name}: rebuilding into generation {generation}{split}")
        if not args.wait:
            if plan is not None:
                print(_explain(plan))
            return 0
        progress = Progress(f"{name}: rebuilding generation {generation}")
        deadline = time.monotonic() + args.timeout
        while True:
            now = await rebuild_progress(read_db, name)  # then: a switch in between shows
            switched = await _switched(read_db, name, generation)
            if now is not None:
                progress.update(now.position, max(now.target, now.position))
            if switched:
                progress.finish()
                print(f"{name}: switched to generation {generation}")
                return 0
            if now is None or now.generation != generation:
                progress.finish()
                print(f"{name}: the rebuild into generation {generation} was cancelled")
                return 1
            if time.monotonic() > deadline:
                progress.finish()
                who = (
                    "a projector"
                    if now.partitions is None
                    else f"a worker started with --partitions {now.partitions}"
                )
                print(
                    f"{name}: still rebuilding after {args.timeout:g} s; is {who} running "
                    "for it? (cqrskit projections status)",
                    file=sys.stderr,
                )
                return 1
            await asyncio.sleep(0.5)  # another process does the work: poll its progress
    finally:
        await read_db.close()


async def _dead_letters(args: argparse.Namespace) -> int:
    read_db = open_read_db(args.read, args.schema)
    try:
        _known([args.name], await _names(read_db))
        if args.retry:
            flagged = await request_retry(read_db, args.name, stream=args.stream)
            if not flagged:
                print(f"{args.name}: no dead letters to retry")
                return 0
            print(f"{args.name}: {flagged} parked event(s) flagged for retry")
            if args.wait:
                return await _follow_retry(read_db, args.name, flagged, args.timeout)
            return 0
        letters = await dead_letters(read_db, args.name)
    finally:
        await read_db.close()
    if args.json:
        print(json.dumps([dataclasses.asdict(d) for d in letters]))
        return 0
    if not letters:
        print(f"{args.name}: no dead letters")
        return 0
    rows = [
        [
            d.position,
            d.stream,
            d.version,
            d.type,
            d.attempts,
            "yes" if d.retry else "",
            d.error if len(d.error) <= 80 else d.error[:77] + "...",
        ]
        for d in letters
    ]
    headers = ["position", "stream", "version", "type", "attempts", "retry", "error"]
    sys.stdout.write(render_table(headers, rows, right=[0, 2, 4]))
    return 0


async def _follow_retry(read_db: ReadDatabase, name: str, flagged: int, timeout: float) -> int:
    progress = Progress(f"{name}: replaying dead letters")
    deadline = time.monotonic() + timeout
    while True:
        letters = await dead_letters(read_db, name)
        waiting = sum(1 for d in letters if d.retry)
        progress.update(flagged - min(waiting, flagged), flagged)
        if waiting == 0:
            still = len(letters)
            progress.finish()
            print(
                f"{name}: replay done; {still} event(s) still parked"
                if still
                else f"{name}: replay done; no dead letters left"
            )
            return 0 if not still else 1
        if time.monotonic() > deadline:
            progress.finish()
            print(
                f"{name}: {waiting} event(s) not retried after {timeout:g} s; is a "
                "projector running for it?",
                file=sys.stderr,
            )
            return 1
        await asyncio.sleep(0.5)  # another process does the work: poll its progress


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the command; return the exit code."""
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
