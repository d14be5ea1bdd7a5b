"""The fault ledger of the test suite (tests/support/faults.py): counts across processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import faults

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ledger of this test's own (the session's ledger is left alone)."""
    path = tmp_path / "ledger"
    monkeypatch.setenv(faults.ENV, str(path))
    return path


def test_counts_from_this_process_and_a_child(ledger: Path) -> None:
    faults.record("proxy", 2)
    faults.record("database_restart")
    code = "from tests.support import faults; faults.record('sigkill', 3)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert faults.send_signal(child, signal.SIGSTOP)
        assert faults.send_signal(child, signal.SIGCONT)  # not a fault: not counted
        assert faults.send_signal(child, signal.SIGKILL)
        child.wait(timeout=20)
        assert not faults.send_signal(child, signal.SIGKILL)  # already gone: not counted
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=20)
    read = faults.read_ledger(ledger)
    assert dict(read.faults) == {"proxy": 2, "database_restart": 1, "sigkill": 4, "sigstop": 1}
    [line] = faults.summary_lines(read)
    assert line.startswith(
        "faults injected: 4 SIGKILL, 1 SIGSTOP, 2 proxy, 1 database restarts, 0 broker restarts"
    )
    assert "below the per-run goal: SIGKILL 4/50, proxy 2/20, database restarts 1/3" in line


def test_invariant_checks_are_summed_and_failures_named(ledger: Path) -> None:
    faults.check_invariants("a", {"lost": 0, "double": 0, "reordered": 0})
    faults.check_invariants("b", {"lost": 0, "double": 2, "reordered": 1})
    read = faults.read_ledger(ledger)
    assert read.checks == 2
    assert read.failing == ["b"]
    assert faults.summary_lines(read)[1] == (
        "invariants after faults: 2 checks, 0 lost / 2 double-applied / 1 reordered (failing: b)"
    )


def test_unknown_kind_is_refused_and_no_ledger_records_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        faults.record("sigterm")
    monkeypatch.delenv(faults.ENV)
    faults.record("sigkill")  # outside a session: nothing to write to, no error
    assert faults.read_ledger(tmp_path / "missing").faults == {}
