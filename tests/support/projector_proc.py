"""``python -m tests.support.projector_proc run ...``: the projector CLI with fail points armed.

The same process as ``python -m cqrskit.projections``, plus a hook on the library's fail
points (:mod:`cqrskit._failpoints`) configured from the environment:

``CQRSKIT_TEST_TRACE``      a file; every fail point reached is appended as one line
                            ``<point> <epoch> <first> <last>`` (and ``resumed <epoch> ...``
                            after a self-stop), so the test sees where its faults landed.
``CQRSKIT_TEST_FAILPOINT``  ``<point>:<n>:<action>``: at the ``n``-th time ``<point>`` is
                            reached, after tracing it:

    ``hold``  block the whole process (no event-loop turn: a transaction in flight stays
              open) until the test kills it; if nobody does within 60 s, exit with code 3.
    ``stop``  SIGSTOP itself (counted in the fault ledger); the test resumes it with SIGCONT.

``CQRSKIT_TEST_WALL_CLOCK``  a file holding a number of seconds, read at every
                            ``time.time()``/``time.time_ns()`` call and added to it: the
                            test steps this process's wall clock by rewriting the file
                            (``time.monotonic()`` is left alone, as a real clock step does).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Mapping

from tests.support import faults

from cqrskit import _failpoints
from cqrskit.cli.projections import main

TRACE = "CQRSKIT_TEST_TRACE"
FAILPOINT = "CQRSKIT_TEST_FAILPOINT"
WALL_CLOCK = "CQRSKIT_TEST_WALL_CLOCK"


def skew_wall_clock() -> None:
    """Add the seconds in the ``CQRSKIT_TEST_WALL_CLOCK`` file to this process's wall clock."""
    path = os.environ.get(WALL_CLOCK)
    if not path:
        return
    real_time, real_time_ns = time.time, time.time_ns

    def offset() -> float:
        try:
            with open(path) as f:
                return float(f.read() or 0)
        except (OSError, ValueError):
            return 0.0  # being replaced this instant: no step

    time.time = lambda: real_time() + offset()
    time.time_ns = lambda: real_time_ns() + int(offset() * 1e9)


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def install() -> None:
    """Set the fail-point hook from the environment (nothing if neither variable is set)."""
    trace = os.environ.get(TRACE)
    spec = os.environ.get(FAILPOINT)
    if not trace and not spec:
        return
    target, nth, action = (spec or "::").split(":")
    if spec and action not in ("hold", "stop"):
        raise SystemExit(f"{FAILPOINT}={spec!r}: the action must be hold or stop")
    seen: Counter[str] = Counter()

    async def hook(point: str, info: Mapping[str, object]) -> None:
        seen[point] += 1
        where = f"{info['epoch']} {info['first']} {info['last']}"
        if trace:
            _append(trace, f"{point} {where}\n")
        if point != target or seen[point] != int(nth):
            return
        if action == "stop":
            faults.record("sigstop")
            os.kill(os.getpid(), signal.SIGSTOP)
            if trace:
                _append(trace, f"resumed {where}\n")
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # holding the process still is the injected fault; the test kills it here
            time.sleep(0.05)
        os._exit(3)

    _failpoints.set_hook(hook)


if __name__ == "__main__":
    # the projector's lease and batch messages go to stderr (the test's log file)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    skew_wall_clock()
    install()
    sys.exit(main())
