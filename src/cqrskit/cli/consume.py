"""``cqrskit consume run|status``: broker consumers as processes.

``run`` applies projections (``--projection module:attr``) and runs event handlers
(``--handlers module:attr``, an :class:`~cqrskit.messaging.EventHandlers`) from a broker,
sharing ``--partitions`` N with every other process started the same way (start as many
as you like; they balance). ``--broker`` is a ``nats://``, ``amqp://`` or ``redis://`` URL
or ``env:NAME`` (default ``$CQRSKIT_BROKER``) and ``--read`` the read database (default
``$CQRSKIT_READ``), so no secret shows in ``ps``. ``--verify-key-file PATH`` /
``--verify-key-env NAME`` (repeatable: the current key and, during a rotation, the
previous one) make the consumer accept only messages the relay signed; others are parked.
``status NAME`` prints each partition's owner, checkpoint, lag (with ``--store``) and gap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

from cqrskit.cli._brokers import broker_options
from cqrskit.cli._keys import verifier_from
from cqrskit.cli._load import load_object
from cqrskit.cli._output import print_partitions
from cqrskit.cli.projections import (
    _close,
    _connection_args,
    _runner,
    load_projections,
    open_read_db,
    open_store,
    stop_timeout_arg,
)
from cqrskit.errors import ConfigurationError
from cqrskit.messaging import Consumer, EventHandlers, Source
from cqrskit.projections.api import Projection
from cqrskit.projections.partitions import partition_status

__all__ = ["open_source", "print_partitions", "register_cli"]


def open_source(url: str, destination: str | None = None) -> Source:
    """A broker source chosen by the URL's scheme; ``destination`` names the stream /
    subject prefix (NATS), exchange (RabbitMQ) or key prefix (Redis), as for the relay."""
    kind, options = broker_options(url, destination)
    if kind == "nats":
        from cqrskit.nats import NatsSource

        return NatsSource(url, **options)
    if kind == "rabbitmq":
        from cqrskit.rabbitmq import RabbitMQSource

        return RabbitMQSource(url, **options)
    from cqrskit.redis import RedisSource

    return RedisSource(url, **options)


def _handlers(specs: list[str]) -> list[EventHandlers]:
    out: list[EventHandlers] = []
    for spec in specs:
        obj = load_object(spec)
        if not isinstance(obj, EventHandlers):
            raise ConfigurationError(f"--handlers {spec!r} is not an EventHandlers.")
        out.append(obj)
    return out


def _add_commands(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="consume a broker into projections / event handlers until SIGTERM/SIGINT",
        description="Apply projections and run event handlers from a broker, sharing the "
        "partitions with every process started with the same --partitions.",
    )
    run.set_defaults(run=_runner(_run))
    _connection_args(run, store=False)
    run.add_argument(
        "--broker",
        metavar="URL",
        help="nats://, amqp:// or redis:// URL, or env:NAME (default: $CQRSKIT_BROKER)",
    )
    run.add_argument(
        "--destination",
        metavar="PREFIX",
        help="the relay's NATS subject prefix, RabbitMQ exchange or Redis key prefix",
    )
    run.add_argument(
        "--projection",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="a projection (or a list of them) to apply; repeat for more",
    )
    run.add_argument(
        "--handlers",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="an EventHandlers (at least once, with an inbox); repeat for more",
    )
    run.add_argument(
        "--decoder",
        required=True,
        metavar="MODULE:ATTR",
        help="stored event -> event: a serializer or a function",
    )
    run.add_argument(
        "--partitions",
        type=int,
        required=True,
        metavar="N",
        help="the relay's number of partitions (the same in every consumer)",
    )
    run.add_argument(
        "--max-partitions", type=int, metavar="K", help="hold at most K partitions per target"
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=500,
        metavar="N",
        help="messages per fetch and per read-database transaction (default: 500)",
    )
    run.add_argument(
        "--lease-ttl",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="a partition whose holder is silent this long moves (default: 5)",
    )
    run.add_argument(
        "--owner",
        metavar="ID",
        help="lease owner id shown by status (default: <hostname>:<pid>:<random hex>)",
    )
    stop_timeout_arg(run, "the batches in flight (apply, checkpoint, acknowledge)")
    run.add_argument(
        "--verify-key-file",
        action="append",
        default=[],
        metavar="PATH",
        help="accept only messages signed with a key in this file (KEY_ID:SECRET_HEX per "
        "line, mode 0600 or 0640); repeat, or list several keys, for a rotation",
    )
    run.add_argument(
        "--verify-key-env",
        action="append",
        default=[],
        metavar="NAME",
        help="as --verify-key-file, the keys in the environment variable NAME "
        "(comma-separated); repeatable",
    )
    status = sub.add_parser(
        "status",
        help="each partition's owner, checkpoint, lag and gap",
        description="Where each partition of a projection (or event handlers) stands.",
    )
    status.set_defaults(run=_runner(_status))
    _connection_args(status)
    status.add_argument("name", help="a projection's or event handlers' name")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register_cli(sub: Any) -> None:
    """Add ``cqrskit consume <run|status>`` to the ``cqrskit`` CLI."""
    parser = sub.add_parser("consume", help="broker consumers: projections and handlers")
    _add_commands(parser.add_subparsers(dest="consume_command", required=True))


async def _run(args: argparse.Namespace) -> int:
    targets: list[Projection | EventHandlers] = [
        *load_projections(args.projection),
        *_handlers(args.handlers),
    ]
    if not targets:
        raise ConfigurationError("give at least one --projection or --handlers.")
    verifier = verifier_from(args.verify_key_file, args.verify_key_env)
    source = open_source(args.broker, args.destination)
    read_db = open_read_db(args.read, args.schema)
    consumer = Consumer(
        source,
        read_db,
        targets,
        load_object(args.decoder),
        partitions=args.partitions,
        verifier=verifier,
        batch_size=args.batch_size,
        lease_ttl=args.lease_ttl,
        max_partitions=args.max_partitions,
        owner=args.owner,
        stop_timeout=10.0 if args.stop_timeout is None else args.stop_timeout,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, consumer.request_stop)
    try:
        await consumer.run()
    finally:
        await source.close()
        await read_db.close()
    return 0


async def _status(args: argparse.Namespace) -> int:
    store = await open_store(args.store, args.store_schema)
    read_db = open_read_db(args.read, args.schema)
    try:
        rows = await partition_status(read_db, args.name, store)
    finally:
        await read_db.close()
        await _close(store)
    if not rows:
        raise ConfigurationError(f"{args.name!r} has no partitions in this read database.")
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(f"{args.name}:")
        print_partitions(rows)
    return 0
