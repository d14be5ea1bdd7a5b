"""Shared benchmark harness: interleaved A/B rounds, medians and ratios to a baseline.

Each case measures a baseline and a candidate in the same run, alternating A B A B ... so
that machine noise hits both alike. Per round the candidate's time per operation is divided
by the baseline's; the reported ratio is the median of those per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field


@dataclass
class Result:
    """Timings of one case (nanoseconds per operation) and its ratio to the baseline."""

    case: str
    what: str
    target: str
    baseline_ns: list[float] = field(default_factory=list)
    candidate_ns: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    higher_is_better: bool = False

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios."""
        return statistics.median(self.ratios)

    def row(self) -> str:
        """One markdown table row."""
        b, c = self.baseline_ns, self.candidate_ns
        return (
            f"| {self.case} | {self.what} | {statistics.median(b):,.0f} "
            f"({min(b):,.0f}–{max(b):,.0f}) | {statistics.median(c):,.0f} "
            f"({min(c):,.0f}–{max(c):,.0f}) | **{self.ratio:.2f}×** | {self.target} |"
        )


HEADER = (
    "| case | what | baseline ns/op median (min–max) | cqrskit ns/op median (min–max) "
    "| ratio | target |\n|---|---|---|---|---|---|"
)


async def _atime(run: Callable[[int], Awaitable[None]], n: int) -> float:
    start = time.perf_counter_ns()
    await run(n)
    return (time.perf_counter_ns() - start) / n


def measure_sync(
    result: Result,
    baseline: Callable[[int], None],
    candidate: Callable[[int], None],
    n: int,
    rounds: int,
) -> Result:
    """Interleave ``rounds`` rounds of ``n`` operations of baseline and candidate."""
    baseline(n // 10 or 1)
    candidate(n // 10 or 1)
    for i in range(rounds):
        order = (baseline, candidate) if i % 2 == 0 else (candidate, baseline)
        times = {}
        for fn in order:
            start = time.perf_counter_ns()
            fn(n)
            times[fn] = (time.perf_counter_ns() - start) / n
        result.baseline_ns.append(times[baseline])
        result.candidate_ns.append(times[candidate])
        result.ratios.append(times[candidate] / times[baseline])
    return result


async def measure_async(
    result: Result,
    baseline: Callable[[int], Awaitable[None]],
    candidate: Callable[[int], Awaitable[None]],
    n: int,
    rounds: int,
) -> Result:
    """Async twin of :func:`measure_sync`."""
    await baseline(n // 10 or 1)
    await candidate(n // 10 or 1)
    for i in range(rounds):
        order = (baseline, candidate) if i % 2 == 0 else (candidate, baseline)
        times = {}
        for fn in order:
            times[fn] = await _atime(fn, n)
        result.baseline_ns.append(times[baseline])
        result.candidate_ns.append(times[candidate])
        result.ratios.append(times[candidate] / times[baseline])
    return result


def parse_args(description: str) -> argparse.Namespace:
    """Common options: --rounds, --n, --json."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case")
    parser.add_argument("--n", type=int, default=50_000, help="operations per round")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser.parse_args()


def report(title: str, results: list[Result], json_path: str | None) -> None:
    """Print the markdown table (and write JSON if asked)."""
    print(f"\n### {title}\n")
    print(f"Python {sys.version.split()[0]} on {sys.platform}\n")
    print(HEADER)
    for r in results:
        print(r.row())
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump([asdict(r) | {"ratio": r.ratio} for r in results], f, indent=2)
