"""``python -m examples.bank``: run the demo (SQLite by default), or serve the HTTP API.

Examples::

    python -m examples.bank                         # SQLite files in a temporary directory
    python -m examples.bank --dir data              # ... in ./data (kept)
    python -m examples.bank --postgres postgresql://postgres@127.0.0.1/test
    python -m examples.bank --postgres DSN --replica REPLICA_DSN --serve  # history on a replica
    python -m examples.bank --serve --port 8000     # HTTP API (needs cqrskit[fastapi], uvicorn)
    python -m examples.bank --history-via broker    # history through a relay + broker consumer
    python -m examples.bank --history-via broker --broker nats://127.0.0.1:4222
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import uuid
from pathlib import Path

from cqrskit import CqrsError
from examples.bank.app import Bank, open_postgres_bank, open_sqlite_bank
from examples.bank.demo import run_demo


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.bank", description="The cqrskit example bank."
    )
    p.add_argument("--dir", type=Path, help="keep the SQLite files here (default: a temp dir)")
    p.add_argument("--postgres", metavar="DSN", help="run on PostgreSQL instead of SQLite")
    p.add_argument(
        "--schema",
        help="PostgreSQL schema to use and keep (default: a new one, dropped at the end)",
    )
    p.add_argument(
        "--replica",
        metavar="DSN",
        action="append",
        default=[],
        help="with --serve: a streaming replica of --postgres to read the history from "
        "(repeatable)",
    )
    p.add_argument("--operations", type=int, default=400, help="commands to send (400)")
    p.add_argument("--seed", type=int, default=7, help="random seed (7)")
    p.add_argument("--serve", action="store_true", help="serve the HTTP API instead")
    p.add_argument(
        "--history-via",
        choices=["log", "broker"],
        default="log",
        help="run the history projection from the event log (default) or through a broker",
    )
    p.add_argument(
        "--broker",
        metavar="URL",
        help="with --history-via broker: nats://, amqp:// or redis:// (default: in memory)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    return p


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _with_bank(args: argparse.Namespace, directory: Path | None) -> int:
    schema = args.schema or f"cqrskit_demo_{uuid.uuid4().hex[:8]}"

    async def open_bank() -> Bank:
        if args.postgres:
            return await open_postgres_bank(args.postgres, schema, replicas=args.replica)
        assert directory is not None
        broker = None
        if args.broker:
            from cqrskit.cli.consume import open_source
            from cqrskit.cli.relay import open_transport

            destination = f"bank_{uuid.uuid4().hex[:8]}"
            broker = (
                open_transport(args.broker, destination),
                open_source(args.broker, destination),
            )
        return open_sqlite_bank(directory, history_via=args.history_via, broker=broker)

    try:
        if args.serve:
            from examples.bank.api import serve

            await serve(open_bank, host=args.host, port=args.port)  # lifespan opens the bank
            return 0
        async with await open_bank() as bank:
            outcome = await run_demo(bank, operations=args.operations, seed=args.seed)
            return 0 if outcome.ok else 1
    finally:
        if args.postgres and not args.schema:
            await _drop_schema(args.postgres, schema)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, return the exit status."""
    args = _parser().parse_args(argv)
    if args.operations < 0:
        _parser().error("--operations must be >= 0")
    if args.replica and not (args.postgres and args.serve):
        _parser().error("--replica needs --postgres (the primary) and --serve")
    try:
        if args.postgres or args.dir:
            return asyncio.run(_with_bank(args, args.dir))
        with tempfile.TemporaryDirectory(prefix="cqrskit-bank-") as tmp:
            return asyncio.run(_with_bank(args, Path(tmp)))
    except (CqrsError, OSError) as exc:  # unreachable database, missing extra ...
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
