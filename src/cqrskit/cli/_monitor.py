"""What ``cqrskit projections run`` says while it works: started, lease taken or waiting,
catching up (with progress), caught up, and lag now and then — one line per change, not per
batch.

It watches the projector from outside, through its public state (``leading``,
``checkpoint``) and the lease rows, so the runner itself stays free of presentation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cqrskit.cli._output import Progress, Reporter
from cqrskit.eventlog import EventStore
from cqrskit.projections.db import ReadDatabase
from cqrskit.projections.partitioned import PartitionedProjector
from cqrskit.projections.runner import Projector

__all__ = ["Monitor"]


@dataclass
class _Seen:
    leading: bool = False
    holder: str | None = "?"
    caught_up: bool = False
    catching_from: int | None = None
    progress: Progress | None = None
    reported: float = 0.0


class Monitor:
    """Polls a running projector every ``interval`` seconds and reports changes.

    Args:
        projector: the running projector.
        names: its projections.
        reporter: where lines go.
        lag_every: seconds between "N positions behind" lines while behind.
    """

    def __init__(
        self,
        projector: Projector | PartitionedProjector,
        names: Sequence[str],
        reporter: Reporter,
        *,
        interval: float = 0.5,
        lag_every: float = 30.0,
    ) -> None:
        self.projector = projector
        self.names = list(names)
        self.reporter = reporter
        self.interval = interval
        self.lag_every = lag_every
        self._seen = {name: _Seen() for name in self.names}

    @property
    def store(self) -> EventStore:
        return self.projector.store

    @property
    def read_db(self) -> ReadDatabase:
        return self.projector.read_db

    async def run(self) -> None:
        """Report until cancelled."""
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a report must never stop the projector
                self.reporter.log.debug("status check failed: %r", exc)
            await asyncio.sleep(self.interval)

    async def _holders(self) -> dict[str, str | None]:
        async with self.read_db.read_only() as s:
            rows = await s.fetchall("SELECT name, lease_owner FROM cqrskit_projections")
        return {str(name): owner for name, owner in rows}

    async def check(self) -> None:
        """Look once and report what changed."""
        head = await self.store.last_position()
        holders: dict[str, str | None] | None = None
        for name in self.names:
            seen = self._seen[name]
            leading = self.projector.leading(name)
            if not leading:
                if seen.leading:
                    self.reporter.say("lease-lost", f"{name}: lease lost; standing by", name=name)
                    seen.leading = False
                if holders is None:
                    holders = await self._holders()
                holder = holders.get(name)
                if holder != seen.holder and holder is not None:
                    self.reporter.say(
                        "waiting",
                        f"{name}: waiting: the lease is held by {holder}",
                        name=name,
                        holder=holder,
                    )
                seen.holder = holder
                continue
            checkpoint = self.projector.checkpoint(name)
            if not seen.leading:
                seen.leading, seen.holder, seen.caught_up = True, self.projector.owner, False
                self.reporter.say(
                    "lease-taken",
                    f"{name}: lease taken; checkpoint {checkpoint}, log head {head}",
                    name=name,
                    checkpoint=checkpoint,
                    head=head,
                )
            self._progress(name, seen, checkpoint, head)

    def _progress(self, name: str, seen: _Seen, checkpoint: int, head: int) -> None:
        if checkpoint >= head:
            if not seen.caught_up:
                if seen.progress is not None:
                    done = checkpoint - (seen.catching_from or 0)
                    seen.progress.update(done, done)  # the last line: N/N (100%)
                    seen.progress.finish()
                    seen.progress = None
                self.reporter.say(
                    "caught-up",
                    f"{name}: caught up at position {checkpoint}",
                    name=name,
                    checkpoint=checkpoint,
                )
                seen.caught_up = True
                seen.catching_from = None
            return
        behind = head - checkpoint
        now = time.monotonic()
        if seen.caught_up or seen.catching_from is None:
            seen.caught_up = False
            seen.catching_from = checkpoint
            seen.reported = now
            if not self.reporter.json_lines and behind > 1000:
                seen.progress = Progress(f"{name}: catching up")
        if seen.progress is not None:
            start = seen.catching_from or 0
            seen.progress.update(checkpoint - start, head - start)
        elif now - seen.reported >= self.lag_every:
            seen.reported = now
            self.reporter.say(
                "lag",
                f"{name}: {behind} positions behind (checkpoint {checkpoint}, head {head})",
                name=name,
                checkpoint=checkpoint,
                head=head,
                behind=behind,
            )
