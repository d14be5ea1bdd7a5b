"""The broker down for 30 s under write load (own NATS JetStream instance, real processes).

Two writer processes commit 150 deposits per second each to a SQLite log for the whole run
while a relay process publishes it. The NATS server is SIGKILLed, stays down for 30 s, and
is started again on the same port and data directory. Checked:

* the writers are unaffected: every command succeeds, and they keep committing during the
  outage (the log is the buffer);
* the relay's memory stays flat: its RSS (``VmRSS`` of the relay process, sampled every
  0.25 s) never grows more than a bound over the outage, although the backlog grows by
  thousands of events and the relay keeps trying (its lease heartbeat goes on);
* its checkpoint does not move while the broker is down, and after recovery the backlog
  drains: the broker holds every committed event once per partition sequence, in
  per-stream order (count, sum and order checked).
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
import uuid
from pathlib import Path

import pytest
from tests.support.brokers import NatsServer
from tests.support.relay_checks import (
    check,
    committed,
    lease_beat,
    log_head,
    need_binary,
    read_broker,
    relay_checkpoint,
    rss_kib,
    spawn,
)
from tests.support.sqlite_log import SqliteTestLog

OUTAGE = 30.0
RATE = 150.0  # commands per second per writer
WRITERS = 2
WARM_UP = 3.0
# the relay holds at most two batches of 50 events; buffering the outage's ~9,000 events
# would cost tens of MiB (an Envelope and a StoredEvent of ~1.5 KiB each, plus the wire form)
RSS_BOUND_KIB = 8 * 1024


@pytest.mark.slow
async def test_broker_down_30s_under_write_load(tmp_path: Path) -> None:
    need_binary("nats-server")
    server = NatsServer()
    server.start()
    name = f"cqrskit_o{uuid.uuid4().hex[:10]}"
    path = str(tmp_path / "log.db")
    SqliteTestLog(path).close()
    relay_log = tmp_path / "relay.log"
    relay = spawn("relay", path, "nats", server.url, name, log=relay_log)
    seconds = WARM_UP + OUTAGE + 2.0
    outs = [tmp_path / f"writer{w}.json" for w in range(1, WRITERS + 1)]
    writers = [
        spawn("paced", path, str(w), str(RATE), str(seconds), str(out), log=tmp_path / "w.log")
        for w, out in zip(range(1, WRITERS + 1), outs, strict=True)
    ]
    try:
        deadline = time.monotonic() + 30
        while relay_checkpoint(path) == 0:  # the relay is up and publishing
            assert relay.poll() is None, relay_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the relay published nothing"
            await asyncio.sleep(0.05)
        before: list[int] = []
        for _ in range(8):  # 2 s of RSS while it publishes normally
            before.append(rss_kib(relay.pid))
            await asyncio.sleep(0.25)
        server.kill()
        down_at = time.monotonic()
        beat_down = lease_beat(path)
        during: list[int] = []
        frozen_at: int | None = None
        while time.monotonic() - down_at < OUTAGE:  # bounded: 30 s of samples
            during.append(rss_kib(relay.pid))
            if frozen_at is None and time.monotonic() - down_at >= 3.0:
                frozen_at = relay_checkpoint(path)
            await asyncio.sleep(0.25)
        checkpoint_down = relay_checkpoint(path)
        beats = lease_beat(path) - beat_down
        backlog = log_head(path) - checkpoint_down
        server.start()
        up_at = time.monotonic()
        for w in writers:
            assert w.wait(120) == 0, (tmp_path / "w.log").read_text()[-3000:]
        log = committed(path)
        head = log[-1][0]
        deadline = time.monotonic() + 120
        while relay_checkpoint(path) < head:
            assert relay.poll() is None, relay_log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"relay stuck at {relay_checkpoint(path)}"
            await asyncio.sleep(0.05)
        drained = time.monotonic() - up_at
        after = rss_kib(relay.pid)
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(20) == 0
        held = await read_broker("nats", server.url, name)
        dropped = check(held, log)

        results = [json.loads(out.read_text()) for out in outs]
        failed = [f for r in results for f in r["failed"]]
        assert failed == [], failed[:5]
        assert sum(r["ok"] for r in results) == len(log)
        in_outage = sum(
            1 for r in results for t in r["times"] if down_at + 1 <= t <= down_at + OUTAGE - 1
        )
        # the writers kept committing while the broker was down (a third of their schedule
        # at least: the machine is shared; the log is the buffer, nothing waits on the broker)
        assert in_outage >= (OUTAGE - 2) * RATE * WRITERS / 3, in_outage

        # the relay kept trying all along (reading a batch, failing to connect, backing
        # off up to 0.3 s, beating its lease every 0.2 s), so its memory was measured while
        # it worked through the growing backlog, not while stuck in a connect call
        assert beats >= OUTAGE / 2, beats
        assert frozen_at is not None
        assert checkpoint_down == frozen_at, "the checkpoint moved while the broker was down"
        assert backlog >= (OUTAGE - 5) * RATE * WRITERS / 3, backlog
        start = statistics.median(before)
        print(
            f"\nrelay outage [nats, {OUTAGE:.0f} s]: RSS before {start / 1024:.1f} MiB "
            f"(median of {len(before)}), during min/median/max "
            f"{min(during) / 1024:.1f}/{statistics.median(during) / 1024:.1f}/"
            f"{max(during) / 1024:.1f} MiB ({len(during)} samples), after drain "
            f"{after / 1024:.1f} MiB; backlog {backlog} events at restart, drained in "
            f"{drained:.1f} s; {beats} lease beats and {in_outage} commands committed "
            "during the outage; "
            f"{len(log)} events, {dropped} duplicate copies dropped by sequence"
        )
        assert max(during) - start <= RSS_BOUND_KIB, (start, max(during), during)
    finally:
        for p in [relay, *writers]:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        server.close()
