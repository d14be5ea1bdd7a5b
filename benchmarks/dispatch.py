"""P1a–P1e: the mediator's overhead against direct calls (see shared PERFORMANCE.md).

Run: ``python benchmarks/dispatch.py [--rounds 15] [--n 50000] [--json out.json]``
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from _harness import Result, measure_async, measure_sync, parse_args, report

from cqrskit import Command, Dependencies, Event, Mediator, Registry


@dataclass(frozen=True, slots=True)
class Deposit(Command[int]):
    account: str
    amount: int


@dataclass(frozen=True, slots=True)
class Deposited(Event):
    account: str
    amount: int


class Session:
    """A per-dispatch dependency built fresh for every dispatch."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


async def handle(cmd: Deposit) -> int:
    return cmd.amount


async def handle_with_session(cmd: Deposit, session: Session) -> int:
    return cmd.amount


def handle_sync(cmd: Deposit) -> int:
    return cmd.amount


async def passthrough(message: Any, next: Any) -> Any:
    return await next(message)


async def on_a(e: Deposited) -> None:
    return None


async def on_b(e: Deposited) -> None:
    return None


async def on_c(e: Deposited) -> None:
    return None


def _registry(*handlers: Any) -> Registry:
    reg = Registry()
    for h in handlers:
        reg.add(h)
    return reg


async def run_async(n: int, rounds: int) -> list[Result]:
    cmd = Deposit("a", 1)
    event = Deposited("a", 1)
    results: list[Result] = []

    plain = Mediator(_registry(handle))

    async def direct(k: int) -> None:
        for _ in range(k):
            await handle(cmd)

    async def via_send(k: int) -> None:
        send = plain.send
        for _ in range(k):
            await send(cmd)

    results.append(
        await measure_async(
            Result("P1a", "send to a singleton async handler", "≤ 2.0×"),
            direct,
            via_send,
            n,
            rounds,
        )
    )

    one = Mediator(_registry(handle), behaviors=[passthrough])

    async def direct_behavior(k: int) -> None:
        for _ in range(k):
            await passthrough(cmd, handle)

    async def via_behavior(k: int) -> None:
        send = one.send
        for _ in range(k):
            await send(cmd)

    results.append(
        await measure_async(
            Result("P1b", "send with one pass-through behavior", "≤ 2.0×"),
            direct_behavior,
            via_behavior,
            n,
            rounds,
        )
    )

    fan = Mediator(_registry(on_a, on_b, on_c))

    async def direct_three(k: int) -> None:
        for _ in range(k):
            await on_a(event)
            await on_b(event)
            await on_c(event)

    async def via_publish(k: int) -> None:
        publish = fan.publish
        for _ in range(k):
            await publish(event)

    results.append(
        await measure_async(
            Result("P1c", "publish to 3 handlers", "≤ 1.5×"),
            direct_three,
            via_publish,
            n,
            rounds,
        )
    )

    deps = Dependencies()
    deps.scoped(Session, Session)
    scoped = Mediator(_registry(handle_with_session), resolver=deps)

    async def direct_dep(k: int) -> None:
        for _ in range(k):
            await handle_with_session(cmd, Session())

    async def via_dep(k: int) -> None:
        send = scoped.send
        for _ in range(k):
            await send(cmd)

    results.append(
        await measure_async(
            Result("P1d", "send with one per-dispatch dependency", "≤ 3×"),
            direct_dep,
            via_dep,
            n,
            rounds,
        )
    )
    gen_deps = Dependencies()

    def open_session() -> Iterator[Session]:
        session = Session()
        yield session
        session.n = -1

    gen_deps.scoped(Session, open_session)
    with_cleanup = Mediator(_registry(handle_with_session), resolver=gen_deps)

    async def via_gen_dep(k: int) -> None:
        send = with_cleanup.send
        for _ in range(k):
            await send(cmd)

    results.append(
        await measure_async(
            Result("P1d+", "same, factory is a generator with cleanup (scope path)", "—"),
            direct_dep,
            via_gen_dep,
            n,
            rounds,
        )
    )
    return results


def run_sync(n: int, rounds: int) -> list[Result]:
    try:
        from cqrskit.sync import SyncMediator
    except ImportError:  # pragma: no cover - before the sync twin exists
        return []
    cmd = Deposit("a", 1)
    med = SyncMediator(_registry(handle_sync))

    def direct(k: int) -> None:
        for _ in range(k):
            handle_sync(cmd)

    def via_send(k: int) -> None:
        send = med.send
        for _ in range(k):
            send(cmd)

    return [
        measure_sync(
            Result("P1e", "sync mediator send to a plain def", "≤ 2.0×"),
            direct,
            via_send,
            n,
            rounds,
        )
    ]


def main() -> None:
    args = parse_args(__doc__ or "")
    results = asyncio.run(run_async(args.n, args.rounds))
    results += run_sync(args.n, args.rounds)
    report("Dispatch overhead (P1)", results, args.json)


if __name__ == "__main__":
    main()
