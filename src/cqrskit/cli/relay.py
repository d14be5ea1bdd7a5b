"""``cqrskit relay run|status``: the outbox relay as a process.

``--store`` and ``--read`` (the relay's state database, usually the write database itself)
work as for ``cqrskit projections``; ``--broker`` is a broker URL — ``nats://...``,
``amqp://...`` (RabbitMQ) or ``redis://...`` — or ``env:NAME``, and defaults to
``$CQRSKIT_BROKER`` (all three resolved by ``resolve_locations``), so neither DSNs nor
broker credentials show in ``ps``. ``--signing-key-file PATH`` or ``--signing-key-env NAME``
signs every message (HMAC, see :mod:`cqrskit.cli._keys` for the format); the key itself is
never an argument.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

from cqrskit.cli._brokers import broker_options
from cqrskit.cli._keys import signer_from
from cqrskit.cli.projections import (
    _close,
    _connection_args,
    _runner,
    open_read_db,
    open_store,
    stop_timeout_arg,
)
from cqrskit.messaging import Relay, Transport, relay_status

__all__ = ["open_transport", "register_cli"]


def open_transport(url: str, destination: str | None = None) -> Transport:
    """A transport chosen by the URL's scheme; ``destination`` names the stream / subject
    prefix (NATS), exchange (RabbitMQ) or key prefix (Redis)."""
    kind, options = broker_options(url, destination)
    if kind == "nats":
        from cqrskit.nats import NatsTransport

        return NatsTransport(url, **options)
    if kind == "rabbitmq":
        from cqrskit.rabbitmq import RabbitMQTransport

        return RabbitMQTransport(url, **options)
    from cqrskit.redis import RedisTransport

    return RedisTransport(url, **options)


def _add_commands(sub: Any) -> None:
    run = sub.add_parser("run", help="publish the event log to a broker until SIGTERM/SIGINT")
    run.set_defaults(run=_runner(_run))
    _connection_args(run)
    run.add_argument(
        "--broker",
        metavar="URL",
        help="nats://, amqp:// or redis:// URL, or env:NAME (default: $CQRSKIT_BROKER)",
    )
    run.add_argument(
        "--destination",
        metavar="PREFIX",
        help="NATS subject prefix, RabbitMQ exchange or Redis key prefix "
        "(default: the transport's own)",
    )
    run.add_argument(
        "--name", default="relay", help="the relay's name in status and leases (default: relay)"
    )
    run.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="partitions: stable hash of the stream id modulo N (default: 1)",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=500,
        help="events read and published per batch (default: 500)",
    )
    run.add_argument(
        "--lease-ttl",
        type=float,
        default=5.0,
        help="seconds before a silent relay's lease can be taken over (default: 5)",
    )
    run.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="seconds between reads of the log when idle (default: 1)",
    )
    run.add_argument(
        "--listen",
        action="store_true",
        help="PostgreSQL: wake on NOTIFY instead of waiting for the next poll",
    )
    run.add_argument(
        "--owner", help="the lease owner's name (default: host:pid:random, unique per process)"
    )
    stop_timeout_arg(run, "the batches in flight (publish, acks, checkpoint)")
    keys = run.add_mutually_exclusive_group()
    keys.add_argument(
        "--signing-key-file",
        metavar="PATH",
        help="sign every message with the key in this file (KEY_ID:SECRET_HEX, mode 0600 "
        "or 0640; see docs/operations.md#signing-keys)",
    )
    keys.add_argument(
        "--signing-key-env",
        metavar="NAME",
        help="sign every message with the key in the environment variable NAME (KEY_ID:SECRET_HEX)",
    )
    status = sub.add_parser("status", help="the relay's checkpoint, lag and parked events")
    status.set_defaults(run=_runner(_status))
    _connection_args(status)
    status.add_argument("--name", default="relay", help="the relay's name (default: relay)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")


def register_cli(sub: Any) -> None:
    """Add ``cqrskit relay <run|status>`` to the ``cqrskit`` CLI."""
    parser = sub.add_parser("relay", help="the outbox relay: publish the event log to a broker")
    _add_commands(parser.add_subparsers(dest="relay_command", required=True))


async def _run(args: argparse.Namespace) -> int:
    signer = signer_from(args.signing_key_file, args.signing_key_env)
    transport = open_transport(args.broker, args.destination)
    store = await open_store(
        args.store, args.store_schema, listen=args.listen, create_tables=args.create_tables
    )
    state = open_read_db(args.read, args.schema)
    relay = Relay(
        store,
        state,
        transport,
        name=args.name,
        partitions=args.partitions,
        batch_size=args.batch_size,
        lease_ttl=args.lease_ttl,
        poll_interval=args.poll_interval,
        owner=args.owner,
        signer=signer,
        stop_timeout=10.0 if args.stop_timeout is None else args.stop_timeout,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.request_stop)
    try:
        await relay.run()
    finally:
        await transport.close()
        await state.close()
        await _close(store)
    return 0


async def _status(args: argparse.Namespace) -> int:
    store = await open_store(args.store, args.store_schema, create_tables=args.create_tables)
    state = open_read_db(args.read, args.schema)
    try:
        s = await relay_status(state, store, args.name)
    finally:
        await state.close()
        await _close(store)
    if args.json:
        print(json.dumps(s.as_dict(), indent=2))
    else:
        lag = f"{s.lag_events}{'+' if s.lag_capped else ''}"
        print(
            f"{s.name}: checkpoint {s.checkpoint} of {s.head}, lag {lag} events "
            f"({s.lag_seconds:.1f} s), parked {s.dead_letters}, lease "
            f"{s.lease_owner or '-'}"
        )
    return 0
