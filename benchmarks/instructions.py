"""P1 as instruction counts: each case and its baseline run under valgrind's callgrind.

Wall-clock ratios on a shared 2-core machine swing with the load; instruction counts do
not (the same binary, inputs and hash seed give the same count; the children run with
``PYTHONHASHSEED=0`` unless the variable is set). For every case this runs the
baseline loop and the cqrskit loop with ``n`` iterations and with 0, and reports
``(instructions(n) - instructions(0)) / n`` per side and their ratio.

Run: ``python benchmarks/instructions.py [--n 20000]`` (needs ``valgrind`` on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

import dispatch as d  # noqa: E402

from cqrskit import Dependencies, Mediator  # noqa: E402

TARGETS = {"P1a": "≤ 2.0×", "P1b": "≤ 2.0×", "P1c": "≤ 1.5×", "P1d": "≤ 3×", "P1e": "≤ 2.0×"}


def _loops() -> dict[str, tuple[Callable[[int], Any], Callable[[int], Any]]]:
    cmd = d.Deposit("a", 1)
    event = d.Deposited("a", 1)
    plain = Mediator(d._registry(d.handle))
    one = Mediator(d._registry(d.handle), behaviors=[d.passthrough])
    fan = Mediator(d._registry(d.on_a, d.on_b, d.on_c))
    deps = Dependencies()
    deps.scoped(d.Session, d.Session)
    scoped = Mediator(d._registry(d.handle_with_session), resolver=deps)
    from cqrskit.sync import SyncMediator

    sync = SyncMediator(d._registry(d.handle_sync))

    async def a_base(n: int) -> None:
        for _ in range(n):
            await d.handle(cmd)

    async def a_cand(n: int) -> None:
        send = plain.send
        for _ in range(n):
            await send(cmd)

    async def b_base(n: int) -> None:
        for _ in range(n):
            await d.passthrough(cmd, d.handle)

    async def b_cand(n: int) -> None:
        send = one.send
        for _ in range(n):
            await send(cmd)

    async def c_base(n: int) -> None:
        for _ in range(n):
            await d.on_a(event)
            await d.on_b(event)
            await d.on_c(event)

    async def c_cand(n: int) -> None:
        publish = fan.publish
        for _ in range(n):
            await publish(event)

    async def d_base(n: int) -> None:
        for _ in range(n):
            await d.handle_with_session(cmd, d.Session())

    async def d_cand(n: int) -> None:
        send = scoped.send
        for _ in range(n):
            await send(cmd)

    def e_base(n: int) -> None:
        for _ in range(n):
            d.handle_sync(cmd)

    def e_cand(n: int) -> None:
        send = sync.send
        for _ in range(n):
            send(cmd)

    return {
        "P1a": (a_base, a_cand),
        "P1b": (b_base, b_cand),
        "P1c": (c_base, c_cand),
        "P1d": (d_base, d_cand),
        "P1e": (e_base, e_cand),
    }


def _child(case: str, side: str, n: int) -> None:
    fn = _loops()[case][0 if side == "baseline" else 1]
    out = fn(n)
    if isinstance(out, Awaitable):
        asyncio.run(_await(out))


async def _await(aw: Awaitable[None]) -> None:
    await aw


def _count(case: str, side: str, n: int) -> int:
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        case,
        side,
        str(n),
    ]
    # A fixed hash seed (unless one is given): with a random one, counts differ by up to ~3 %.
    env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if match is None:
        raise RuntimeError(f"no callgrind total in:\n{proc.stderr}")
    return int(match.group(1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed; skipping the instruction-count benchmark")
        return
    print("\n### Dispatch overhead in instructions (P1, callgrind)\n")
    print("| case | baseline instr/op | cqrskit instr/op | ratio | target |")
    print("|---|---|---|---|---|")
    for case in TARGETS:
        per = {}
        for side in ("baseline", "cqrskit"):
            per[side] = (_count(case, side, args.n) - _count(case, side, 0)) / args.n
        ratio = per["cqrskit"] / per["baseline"]
        print(
            f"| {case} | {per['baseline']:,.0f} | {per['cqrskit']:,.0f} | **{ratio:.2f}×** "
            f"| {TARGETS[case]} |"
        )


if __name__ == "__main__":
    main()
