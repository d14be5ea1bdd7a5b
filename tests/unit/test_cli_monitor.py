"""What ``cqrskit projections run`` says while catching up: a progress line from the
start to the end of a long catch-up, "caught up", and "N positions behind" now and then
while a short lag lasts — driven through the monitor with a projector stand-in."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from cqrskit.cli._monitor import Monitor
from cqrskit.cli._output import Reporter


class _Store:
    def __init__(self) -> None:
        self.head = 0

    async def last_position(self) -> int:
        return self.head


class _Projector:
    """The public state the monitor reads: ``owner``, ``store``, ``leading``, ``checkpoint``."""

    owner = "web-1:42:0badcafe"

    def __init__(self) -> None:
        self.store = _Store()
        self.position = 0

    def leading(self, name: str) -> bool:
        return True

    def checkpoint(self, name: str) -> int:
        return self.position


def _monitor(projector: _Projector, reporter: Reporter, **options: Any) -> Monitor:
    return Monitor(projector, ["balances"], reporter, **options)  # type: ignore[arg-type]


async def test_a_long_catch_up_shows_progress_then_caught_up(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = io.StringIO()
    reporter = Reporter(out=out)
    projector = _Projector()
    projector.store.head = 5000
    monitor = _monitor(projector, reporter)
    try:
        await monitor.check()  # lease taken at 0 of 5000: progress starts
        projector.position = 2500
        await monitor.check()  # halfway (off a terminal: not every update is a line)
        projector.position = 5000
        await monitor.check()  # done
    finally:
        reporter.close()
    progress = capsys.readouterr().err.splitlines()
    assert progress == [
        "balances: catching up: 0/5000 (0%)",
        "balances: catching up: 5000/5000 (100%)",
    ]
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("balances: lease taken; checkpoint 0, log head 5000")
    assert lines[1].endswith("balances: caught up at position 5000")


async def test_a_short_lag_is_reported_now_and_then_as_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("cqrskit.cli._monitor.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    reporter = Reporter(json_lines=True, out=out)
    projector = _Projector()
    projector.store.head = projector.position = 10
    monitor = _monitor(projector, reporter, lag_every=30.0)
    try:
        await monitor.check()  # lease taken, caught up
        projector.store.head = 110
        await monitor.check()  # behind: noted, not yet reported
        clock[0] += 29.0
        projector.position = 20
        await monitor.check()  # behind for less than lag_every: quiet
        clock[0] += 1.0
        projector.position = 50
        await monitor.check()  # behind for lag_every: reported
        clock[0] += 1.0
        await monitor.check()  # and not again right away
        projector.position = 110
        await monitor.check()  # caught up again
    finally:
        reporter.close()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["lease-taken", "caught-up", "lag", "caught-up"]
    lag = records[2]
    assert (lag["checkpoint"], lag["head"], lag["behind"]) == (50, 110, 60)
    assert lag["message"] == "balances: 60 positions behind (checkpoint 50, head 110)"
    assert records[3]["checkpoint"] == 110
