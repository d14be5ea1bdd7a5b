"""The fault ledger: every fault a test injects is counted, in this process and in children.

The pytest session creates a ledger file and names it in ``CQRSKIT_FAULT_LEDGER``; child
processes inherit the variable. Each injection appends one short line with a single
``write()`` on an ``O_APPEND`` descriptor, so lines from several processes never interleave
and nothing is lost when a process is SIGKILLed right after. The terminal summary
(``tests/conftest.py``) sums the lines into one line::

    faults injected: 63 SIGKILL, 4 SIGSTOP, 25 proxy, 3 database restarts, 0 broker restarts

Invariant checks after faults are recorded too (``lost``/``double``/``reordered`` per check)
and summed in a second line. Outside a pytest session (no variable) recording does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ENV",
    "KINDS",
    "Ledger",
    "check_invariants",
    "read_ledger",
    "record",
    "send_signal",
    "summary_lines",
]

ENV = "CQRSKIT_FAULT_LEDGER"
# kind -> label in the summary line
KINDS = {
    "sigkill": "SIGKILL",
    "sigstop": "SIGSTOP",
    "proxy": "proxy",
    "database_restart": "database restarts",
    "broker_restart": "broker restarts",
}
GOALS = {"sigkill": 50, "proxy": 20, "database_restart": 3}
_SIGNAL_KINDS = {signal.SIGKILL: "sigkill", signal.SIGSTOP: "sigstop"}
_INVARIANTS = ("lost", "double", "reordered")


def _append(line: str) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def record(kind: str, count: int = 1) -> None:
    """Count ``count`` injected faults of ``kind`` (one of :data:`KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; use one of {sorted(KINDS)}")
    if count > 0:
        _append(f"fault {kind} {count}\n")


def send_signal(proc: subprocess.Popen[bytes] | int, sig: int) -> bool:
    """Send ``sig`` to a process (a ``Popen`` or a pid); count SIGKILL and SIGSTOP.

    Returns ``False`` (and counts nothing) when the process had already exited.
    """
    try:
        if isinstance(proc, int):
            os.kill(proc, sig)
        else:
            if proc.poll() is not None:
                return False
            proc.send_signal(sig)
    except ProcessLookupError:
        return False
    kind = _SIGNAL_KINDS.get(signal.Signals(sig))
    if kind is not None:
        record(kind)
    return True


def check_invariants(name: str, result: Mapping[str, int]) -> Mapping[str, int]:
    """Record the invariant counts a fault test checked (``lost``, ``double``, ``reordered``
    and any others); return ``result`` unchanged so the caller asserts on it."""
    fields = " ".join(f"{k}={int(v)}" for k, v in sorted(result.items()))
    _append(f"invariants {name.replace(' ', '_')} {fields}\n")
    return result


@dataclass
class Ledger:
    """What a ledger file holds, summed."""

    faults: Counter[str] = field(default_factory=Counter)
    checks: int = 0
    totals: Counter[str] = field(default_factory=Counter)
    failing: list[str] = field(default_factory=list)


def read_ledger(path: str | Path) -> Ledger:
    """Sum a ledger file (missing file: an empty ledger)."""
    ledger = Ledger()
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return ledger
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "fault" and parts[1] in KINDS:
            ledger.faults[parts[1]] += int(parts[2])
        elif len(parts) >= 2 and parts[0] == "invariants":
            ledger.checks += 1
            values = {k: int(v) for k, _, v in (p.partition("=") for p in parts[2:])}
            ledger.totals.update(values)
            if any(values.values()):
                ledger.failing.append(parts[1])
    return ledger


def summary_lines(ledger: Ledger) -> list[str]:
    """The fault line and, if any check ran, the invariants line."""
    counts = ", ".join(f"{ledger.faults[k]} {label}" for k, label in KINDS.items())
    missed = [
        f"{KINDS[k]} {ledger.faults[k]}/{n}" for k, n in GOALS.items() if ledger.faults[k] < n
    ]
    goal = f" (below the per-run goal: {', '.join(missed)})" if missed else ""
    lines = [f"faults injected: {counts}{goal}"]
    if ledger.checks:
        t = ledger.totals
        text = (
            f"invariants after faults: {ledger.checks} checks, {t['lost']} lost / "
            f"{t['double']} double-applied / {t['reordered']} reordered"
        )
        if ledger.failing:
            text += f" (failing: {', '.join(sorted(set(ledger.failing)))})"
        lines.append(text)
    return lines
