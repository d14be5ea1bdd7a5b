"""The command lines the docs show are ones the ``cqrskit`` CLI accepts, and the operations
guide's systemd unit and container file are valid as written.

Shell and text blocks do not run (they need a project, a database, a service manager),
so their ``cqrskit`` commands are parsed with the real argument parser instead: a renamed
or removed option fails here. The operations guide has the sections issue #11 asked for.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from cqrskit.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(text|bash)\n(.*?)^```", re.DOTALL | re.MULTILINE)
OPERATIONS = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")


def _blocks(text: str) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(text)]


def _commands() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in _blocks(path.read_text(encoding="utf-8")):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if line.startswith("python -m cqrskit.projections "):
                    line = "cqrskit projections " + line.removeprefix(
                        "python -m cqrskit.projections "
                    )
                if not line.startswith(("cqrskit ", "python -m cqrskit ")):
                    continue
                if line.startswith("cqrskit demo bank"):  # the demo's output, not a command
                    continue
                if "[" in line:  # a synopsis with optional parts, e.g. [--json]
                    continue
                found.append((path.name, line))
    return found


COMMANDS = _commands()


def _parses(argv: list[str]) -> str | None:
    """None when the CLI's parser accepts ``argv``, else what it said."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        return f"exit {exc.code}"
    return None


def test_the_docs_show_cli_commands() -> None:
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize(("where", "line"), COMMANDS, ids=[f"{w}:{c}" for w, c in COMMANDS])
def test_a_command_in_the_docs_parses(
    where: str, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    words = shlex.split(line, comments=True)
    argv = words[3:] if words[:3] == ["python", "-m", "cqrskit"] else words[1:]
    assert _parses(argv) is None, f"{where}: {line}\n{capsys.readouterr().err}"


def _block_with(marker: str) -> str:
    [block] = [b for b in _blocks(OPERATIONS) if marker in b]
    return block


def test_the_systemd_unit_is_valid_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    unit = _block_with("[Service]")
    settings: dict[str, str] = {}
    for line in unit.replace("\\\n", " ").splitlines():
        if not line.strip() or line.startswith(("#", ";")) or re.fullmatch(r"\[\w+\]", line):
            continue
        key, _, value = line.partition("=")
        # systemd has comment lines only: a '#' after a value is part of the value
        assert "#" not in value, f"an inline comment systemd would read as the value: {line}"
        settings[key] = value.strip()
    command = shlex.split(settings["ExecStart"])
    assert command[0].endswith("/cqrskit")
    assert _parses(command[1:]) is None, capsys.readouterr().err
    assert settings["KillSignal"] in ("SIGTERM", "SIGINT")
    assert int(settings["TimeoutStopSec"]) > 10  # longer than --stop-timeout's default


def test_the_container_command_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    dockerfile = _block_with("FROM python")
    cmd = re.search(r"^CMD (\[.*?\])$", dockerfile.replace("\\\n", " "), re.MULTILINE)
    assert cmd is not None
    command = json.loads(cmd.group(1))
    assert command[0] == "cqrskit"  # exec form: cqrskit is PID 1 and gets the SIGTERM
    assert _parses(command[1:]) is None, capsys.readouterr().err
    [install] = [line for line in dockerfile.splitlines() if line.startswith("RUN pip install")]
    # cqrskit's own extras (the PostgreSQL driver, rich): a project need not define them
    assert "'cqrskit[postgres,cli]'" in install, install
    assert ".[" not in install, install


def test_the_operations_guide_has_every_section() -> None:
    headings = [line.lstrip("#").strip() for line in OPERATIONS.splitlines() if line[:1] == "#"]
    for wanted in [
        "Running projectors as services",
        "systemd",
        "A container",
        "How many, and takeover timing",
        "Low latency: `notify=True` + `--listen`",
        "Health checks",
        "Alerting",
        "Backups and retention of the event log",
        "Upgrading cqrskit and migrating the event-log schema",
        "Request limits and hardening",
        "Parameters and defaults",
        "Troubleshooting",
        "My reads are stale",
        "A projection is stuck",
        "A command returns 409",
    ]:
        assert wanted in headings, wanted
