"""What the CLI prints: aligned tables, progress of long operations, lifecycle lines.

Tables and progress bars use `rich <https://rich.readthedocs.io>`_ when it is installed
(``pip install 'cqrskit[cli]'``) and plain aligned text without it — or when
``CQRSKIT_PLAIN`` is set, or output is not a terminal (progress only). Lifecycle lines
("lease taken", "caught up") go to stderr as text, or as one JSON object per line with
``--json`` for log collectors.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["Progress", "Reporter", "has_rich", "print_partitions", "render_table"]


def has_rich() -> bool:
    """Whether tables and progress bars can use rich (installed, and not turned off)."""
    if os.environ.get("CQRSKIT_PLAIN"):
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(row) for row in rows)
    return "\n".join(out) + "\n"


def _rich_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if i in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    buffer = io.StringIO()
    # rendered into a buffer: as wide as needed (no wrapping), no colour codes in pipes
    Console(file=buffer, width=max(100, _terminal_width()), color_system=None).print(table)
    return buffer.getvalue()


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return 200


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    right: Sequence[int] = (),
    rich: bool | None = None,
) -> str:
    """Rows as an aligned table (columns in ``right`` right-aligned: numbers).

    ``rich=None`` uses rich when :func:`has_rich`; ``False`` forces plain text.
    """
    cells = [["-" if c is None else str(c) for c in row] for row in rows]
    use_rich = has_rich() if rich is None else rich
    render = _rich_table if use_rich else _plain_table
    return render(list(headers), cells, set(right))


class Progress:
    """Progress of one long operation: a bar on a terminal, sparse lines otherwise.

    ``update(done, total)`` may be called as often as wanted; off a terminal a line is
    written at most every ``every`` seconds, and once at :meth:`finish`.
    """

    def __init__(self, label: str, *, out: TextIO | None = None, every: float = 5.0) -> None:
        self.label = label
        self.out = out or sys.stderr
        self.every = every
        self._last = float("-inf")  # the first update always shows
        self._state: tuple[int, int] = (0, 0)
        self._bar: Any = None
        self._task: Any = None
        if self.out.isatty() and has_rich():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=Console(file=self.out),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(label, total=None)

    def update(self, done: int, total: int) -> None:
        """Report ``done`` of ``total`` units."""
        self._state = (done, total)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=max(total, 1))
            return
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._write(done, total)

    def _write(self, done: int, total: int) -> None:
        percent = 100 if total <= 0 else min(100, done * 100 // total)
        self.out.write(f"{self.label}: {done}/{total} ({percent}%)\n")
        self.out.flush()

    def finish(self, text: str | None = None) -> None:
        """Close the bar (or write the last line), then ``text`` if given."""
        if self._bar is not None:
            self._bar.stop()
        else:
            self._write(*self._state)
        if text:
            self.out.write(text + "\n")
            self.out.flush()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(getattr(record, "cqrskit", {}))
        if record.exc_info:
            data["error"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class Reporter:
    """Lifecycle lines of a long-running command, as text or JSON lines, on stderr.

    Also routes the library's own warnings and errors (the ``cqrskit`` logger) through the
    same format, so a log collector sees one stream.
    """

    def __init__(self, *, json_lines: bool = False, out: TextIO | None = None) -> None:
        self.json_lines = json_lines
        self.log = logging.getLogger("cqrskit.cli")
        self.log.propagate = False
        self.log.setLevel(logging.INFO)
        handler = logging.StreamHandler(out or sys.stderr)
        if json_lines:
            handler.setFormatter(_JsonFormatter())
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        self._handler = handler
        self.log.addHandler(handler)
        library = logging.getLogger("cqrskit")
        library.addHandler(handler)
        if library.level == logging.NOTSET or library.level > logging.WARNING:
            library.setLevel(logging.WARNING)

    def say(self, event: str, text: str, **fields: Any) -> None:
        """One lifecycle line: ``event`` names it for machines, ``text`` is for people."""
        self.log.info(text, extra={"cqrskit": {"event": event, **fields}})

    def close(self) -> None:
        """Detach from the loggers."""
        self.log.removeHandler(self._handler)
        logging.getLogger("cqrskit").removeHandler(self._handler)


def print_partitions(rows: list[Any]) -> None:
    """Print partition rows (``PartitionStatus``) as an aligned table (rich when
    installed): partition, position, broker sequence, lag, lease owner, and the broker
    sequence a partition waits for (``gap``)."""
    table = [
        [
            f"{r.partition}/{r.partitions}",
            r.position,
            r.sequence,
            r.lag_events,
            r.owner,
            None if r.gap_sequence is None else f"at {r.gap_sequence} ({r.gap_seconds:.0f} s)",
        ]
        for r in rows
    ]
    headers = ["partition", "position", "sequence", "lag", "owner", "gap"]
    sys.stdout.write(render_table(headers, table, right=[1, 2, 3]))
