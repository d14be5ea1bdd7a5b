"""A throw-away PostgreSQL primary with streaming standbys, for replication tests.

Each cluster lives in its own temporary directory, listens on free loopback ports, and is
removed by :meth:`PgCluster.close` (also registered with ``atexit``, so an interrupted run
leaves nothing behind)::

    cluster = PgCluster(standbys=2).start()      # about 1.5 s
    cluster.primary.dsn, cluster.standbys[0].dsn
    cluster.stop(node) / cluster.kill(node) / cluster.start_node(node)
    cluster.pause_replay(node) / cluster.resume_replay(node)
    cluster.close()

The data directories must belong to the ``postgres`` user when the tests run as root
(``initdb`` refuses root): commands then run through ``runuser -u postgres --``. Every
command is bounded by a timeout. Faults are counted in :attr:`PgCluster.faults`.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.support import faults

__all__ = ["INJECTED", "PgCluster", "PgNode", "free_port", "postgres_binaries"]

INJECTED: Counter[str] = Counter()
"""Faults injected by every cluster (and proxy) of this test run, by kind."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_binaries() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or ``None``."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # /usr/local/bin may link only a few of them
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    for d in reversed(dirs):
        if (Path(d) / "initdb").exists():
            return Path(d)
    return None


class _Faults(Counter[str]):
    """A cluster's fault counts, also added to :data:`INJECTED`."""

    def __setitem__(self, key: str, value: int) -> None:
        added = value - self.get(key, 0)
        INJECTED[key] += added
        ledger_kind = _LEDGER.get(key)
        if ledger_kind is not None:  # the run's fault ledger counts it too
            faults.record(ledger_kind, added)
        super().__setitem__(key, value)


# replica fault kinds that are a kind of the run's fault ledger (tests/support/faults.py)
_LEDGER = {
    "sigkill": "sigkill",
    "stop-immediate": "database_restart",
    "stop-fast": "database_restart",
}


def _children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (proc / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(proc.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone for our purpose


@dataclass
class PgNode:
    """One server of the cluster."""

    name: str
    data: Path
    port: int
    running: bool = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def pid(self) -> int | None:
        """The postmaster's pid from ``postmaster.pid``, if the file is there."""
        try:
            first = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None


class PgCluster:
    """A primary and ``standbys`` streaming standbys on free ports in a temporary dir."""

    def __init__(self, standbys: int = 1, *, timeout: float = 60.0) -> None:
        bindir = postgres_binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bin = bindir
        self.timeout = timeout
        self.root = Path(tempfile.mkdtemp(prefix="cqrskit-pgcluster-"))
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o755)
        self.primary = PgNode("primary", self.root / "p", free_port())
        self.standbys = [
            PgNode(f"standby{i + 1}", self.root / f"s{i + 1}", free_port()) for i in range(standbys)
        ]
        self.faults = _Faults()
        self._closed = False
        self._conninfo: dict[str, str] = {}
        self._disconnected: set[str] = set()
        atexit.register(self.close)

    # -- commands ------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float | None = None) -> str:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout or self.timeout,
            cwd=self.root,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stdout}\n{done.stderr}")
        return done.stdout

    def psql(self, node: PgNode, sql: str) -> str:
        """Run ``sql`` on ``node`` with psql; return the unaligned output."""
        return self._run(
            "psql", "-h", "127.0.0.1", "-p", str(node.port), "-U", "postgres", "-d",
            "postgres", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql,
        ).strip()  # fmt: skip

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> PgCluster:
        """initdb the primary, start it, clone and start every standby."""
        try:
            p = self.primary
            self._run("initdb", "-D", str(p.data), "--no-sync", "-A", "trust", "-U", "postgres")
            with (p.data / "postgresql.conf").open("a") as conf:
                conf.write(
                    f"\nport = {p.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.root}'\n"
                    "wal_level = replica\nmax_wal_senders = 8\nwal_keep_size = '256MB'\n"
                    "fsync = off\nfull_page_writes = off\nshared_buffers = '32MB'\n"
                    "max_connections = 200\nhot_standby = on\n"
                )
            with (p.data / "pg_hba.conf").open("a") as hba:
                hba.write("host replication all 127.0.0.1/32 trust\n")
            self.start_node(p)
            for s in self.standbys:
                self.add_standby(s)
        except BaseException:
            self.close()
            raise
        return self

    def add_standby(self, s: PgNode) -> None:
        """Clone the primary into ``s.data`` (``pg_basebackup -R``) and start it."""
        self._run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres",
            "-D", str(s.data), "-R", "-X", "stream", "-c", "fast",
        )  # fmt: skip
        conf = s.data / "postgresql.conf"
        text = conf.read_text().replace(f"port = {self.primary.port}", f"port = {s.port}")
        conf.write_text(text)
        self.start_node(s)

    def start_node(self, node: PgNode) -> None:
        """``pg_ctl start`` (waits until it accepts connections)."""
        self._run(
            "pg_ctl", "-D", str(node.data), "-l", str(self.root / f"{node.name}.log"), "-w",
            "-t", str(int(self.timeout)), "start",
        )  # fmt: skip
        node.running = True

    def stop(self, node: PgNode, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode`` (``fast`` or ``immediate``, a crash)."""
        self._run("pg_ctl", "-D", str(node.data), "-m", mode, "-w", "stop")
        node.running = False
        self.faults[f"stop-{mode}"] += 1

    def kill(self, node: PgNode) -> None:
        """SIGKILL the postmaster, then wait (bounded) until its children are gone."""
        pid = node.pid()
        if pid is None:
            raise RuntimeError(f"{node.name} has no postmaster.pid")
        children = _children(pid)
        os.kill(pid, signal.SIGKILL)
        self.faults["sigkill"] += 1
        node.running = False
        deadline = time.monotonic() + self.timeout
        # the children notice their postmaster's death and exit; a restart needs them gone
        while any(_alive(c) for c in (pid, *children)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.name}'s backends outlived the postmaster")
            time.sleep(0.02)  # polling the process table, not synchronizing with the test
        # this machine's init may not reap the dead postmaster: a zombie keeps its pid
        # "alive" for the next postmaster's lock-file check, which a real init would not
        for stale in (node.data / "postmaster.pid", self.root / f".s.PGSQL.{node.port}.lock"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def promote(self, node: PgNode) -> None:
        """Promote a standby to a primary (``pg_ctl promote``, waits)."""
        self._run("pg_ctl", "-D", str(node.data), "-w", "promote")
        self.faults["promote"] += 1

    def reclone(self, node: PgNode) -> None:
        """Replace ``node`` (say, a promoted standby) by a fresh standby of the primary."""
        if node.pid() is not None:
            self._run("pg_ctl", "-D", str(node.data), "-m", "immediate", "-w", "stop")
        node.running = False
        shutil.rmtree(node.data)
        self.add_standby(node)

    def disconnect(self, node: PgNode) -> None:
        """Cut a standby off its primary (no more WAL arrives; it keeps serving reads)."""
        if node.name not in self._conninfo:
            self._conninfo[node.name] = self.psql(node, "SHOW primary_conninfo")
        self.psql(node, "ALTER SYSTEM SET primary_conninfo TO ''")
        self.psql(node, "SELECT pg_reload_conf()")
        self._disconnected.add(node.name)
        self.faults["replica-disconnect"] += 1

    def reconnect(self, node: PgNode) -> None:
        """Undo :meth:`disconnect`: the connection string pg_basebackup wrote, again."""
        conninfo = self._conninfo[node.name].replace("'", "''")
        self.psql(node, f"ALTER SYSTEM SET primary_conninfo TO '{conninfo}'")
        self.psql(node, "SELECT pg_reload_conf()")
        self._disconnected.discard(node.name)

    def pause_replay(self, node: PgNode) -> None:
        self.psql(node, "SELECT pg_wal_replay_pause()")
        self.faults["replay-pause"] += 1

    def resume_replay(self, node: PgNode) -> None:
        self.psql(node, "SELECT pg_wal_replay_resume()")

    def ensure_healthy(self) -> None:
        """Start stopped nodes and resume paused replay (between tests sharing a cluster)."""
        for node in (self.primary, *self.standbys):
            if not node.running:
                self.start_node(node)
        for s in self.standbys:
            if s.name in self._disconnected:
                self.reconnect(s)
            if self.psql(s, "SELECT pg_is_in_recovery()") != "t":
                self.reclone(s)  # promoted by a test
            elif self.psql(s, "SELECT pg_is_wal_replay_paused()") == "t":
                self.resume_replay(s)

    def close(self) -> None:
        """Stop every server (immediate) and remove the directory."""
        if self._closed:
            return
        self._closed = True
        for node in (*self.standbys, self.primary):
            if node.data.exists() and node.pid() is not None:
                try:
                    self._run("pg_ctl", "-D", str(node.data), "-m", "immediate", "-w", "stop")
                except (RuntimeError, subprocess.TimeoutExpired):
                    pid = node.pid()
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
            node.running = False
        shutil.rmtree(self.root, ignore_errors=True)
        atexit.unregister(self.close)
