"""A throwaway PostgreSQL cluster for tests that stop, crash or restart the server.

The shared server on 5432 is never stopped by a test: a test that needs a restart makes its
own cluster on a free loopback port in a fresh temporary directory, and removes it at the end
(see /work/shared/SERVICES.md)::

    with PgCluster() as pg:             # initdb + start (about a second)
        dsn = pg.dsn()                  # postgresql://postgres@127.0.0.1:<port>/postgres
        pg.restart()                    # crash (pg_ctl -m immediate) and start: recovery runs
        pg.stop("fast"); pg.start()     # or step by step
    # stopped and its directory removed, also when the body raised

The data directory must belong to ``postgres``: when the tests run as root the server tools
run through ``runuser -u postgres``. Each start after the first is counted as a database
restart in the fault ledger. ``extra_conf`` lines are appended to ``postgresql.conf`` and
``extra_hba`` lines to ``pg_hba.conf`` (a streaming replica needs both).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.support import faults

__all__ = ["PgCluster", "PgToolsMissing", "find_tool", "free_port"]

_SEARCH = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")


class PgToolsMissing(RuntimeError):
    """initdb/pg_ctl are not installed (or there is no ``postgres`` user to run them)."""


def find_tool(name: str) -> str:
    """The path of a PostgreSQL server tool (``initdb``, ``pg_ctl``, ...)."""
    found = shutil.which(name)
    if found:
        return found
    for pattern in _SEARCH:
        for candidate in sorted(Path("/").glob(pattern.lstrip("/")), reverse=True):
            if (candidate / name).exists():
                return str(candidate / name)
    raise PgToolsMissing(f"{name} not found on PATH or in {', '.join(_SEARCH)}")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """A PostgreSQL cluster of its own: port, data directory, start/stop/crash/restart."""

    def __init__(
        self,
        *,
        port: int | None = None,
        extra_conf: Sequence[str] = (),
        extra_hba: Sequence[str] = (),
        timeout: float = 60.0,
    ) -> None:
        self.port = port or free_port()
        self.extra_conf = list(extra_conf)
        self.extra_hba = list(extra_hba)
        self.timeout = timeout
        self.base: Path | None = None
        self.starts = 0
        self.running = False

    # -- paths and connection -------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        assert self.base is not None, "the cluster was not created"
        return self.base / "data"

    @property
    def log_file(self) -> Path:
        assert self.base is not None, "the cluster was not created"
        return self.base / "server.log"

    def dsn(self, database: str = "postgres") -> str:
        """A DSN for ``database`` as the superuser ``postgres`` (trust authentication)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    # -- lifecycle ------------------------------------------------------------------------

    def create(self) -> None:
        """initdb into a fresh temporary directory owned by ``postgres``."""
        initdb = find_tool("initdb")
        self.base = Path(tempfile.mkdtemp(prefix="cqrskit-pg-"))
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PgToolsMissing("running as root needs a 'postgres' user") from exc
            os.chown(self.base, user.pw_uid, user.pw_gid)
        self._run(initdb, "-D", self.data_dir, "--no-sync", "-A", "trust", "-U", "postgres")
        conf = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.base}'",
            # a server crash (immediate stop) keeps every committed WAL record in the OS page
            # cache, so crash recovery still loses nothing committed; only an OS crash would
            "fsync = off",
            "full_page_writes = off",
            "max_connections = 50",
            "shared_buffers = 16MB",
            *self.extra_conf,
        ]
        self._append(self.data_dir / "postgresql.conf", conf)
        if self.extra_hba:
            self._append(self.data_dir / "pg_hba.conf", self.extra_hba)

    def start(self) -> None:
        """Start the server and wait until it accepts connections (bounded by ``timeout``)."""
        self._run(
            find_tool("pg_ctl"),
            "-D", self.data_dir, "-l", self.log_file, "-w", "-t", str(int(self.timeout)),
            "start",
        )  # fmt: skip
        self.running = True
        self.starts += 1
        if self.starts > 1:
            faults.record("database_restart")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>``: ``smart``, ``fast``, or ``immediate`` (a crash: no
        checkpoint, the next start runs crash recovery)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"stop mode {mode!r}: use smart, fast or immediate")
        self._run(
            find_tool("pg_ctl"),
            "-D", self.data_dir, "-m", mode, "-w", "-t", str(int(self.timeout)), "stop",
        )  # fmt: skip
        self.running = False

    def crash(self) -> None:
        """Stop the server the way a crash would (``-m immediate``)."""
        self.stop("immediate")

    def restart(self, mode: str = "immediate") -> None:
        """Stop (by default as a crash) and start again; counted as a database restart."""
        self.stop(mode)
        self.start()

    def cleanup(self) -> None:
        """Stop the server if it runs and remove the directory; never raises."""
        if self.base is None:
            return
        if self.running or (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None

    def __enter__(self) -> PgCluster:
        try:
            self.create()
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- helpers --------------------------------------------------------------------------

    def _run(self, *cmd: str | Path) -> None:
        args = [str(c) for c in cmd]
        if os.geteuid() == 0:
            args = ["runuser", "-u", "postgres", "--", *args]
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=self.timeout + 30,
            check=False,
            cwd=self.base or "/",
        )
        if proc.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError, AssertionError):
                tail = self.log_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                f"\nserver log tail:\n{tail}"
            )

    def _append(self, path: Path, lines: Sequence[str]) -> None:
        with path.open("a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
