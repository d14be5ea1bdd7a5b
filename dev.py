#!/usr/bin/env python3
"""One entry point for developers and CI: ``python3 dev.py demo`` and ``python3 dev.py test``.

* ``demo [args]``  — runs the example bank application on the embedded default (SQLite).
* ``test [pytest args]`` — the gates: ruff format + check, mypy --strict, pyright on the
  typing tests, then pytest (unit, integration against local services, docs, examples).
* ``bench``        — the benchmarks (see docs/benchmarks.md).

It creates ``.venv`` on first use and installs the project there (``-e .`` for the demo,
``-e .[dev]`` for the tests), so both commands work on a fresh clone with Python 3.11+.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    rc = subprocess.call([str(c) for c in cmd], cwd=ROOT)
    if rc:
        sys.exit(rc)


def _ensure(extra: str) -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"cqrskit needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / f".installed-{extra or 'base'}"
    pyproject = ROOT / "pyproject.toml"
    if stamp.exists() and stamp.stat().st_mtime >= pyproject.stat().st_mtime:
        return
    spec = f".[{extra}]" if extra else "."
    _run(PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", spec)
    stamp.touch()


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        _ensure("")
        _run(PY, "-m", "examples.bank", *rest)
    elif cmd == "test":
        _ensure("dev")
        _run(PY, "-m", "ruff", "format", "--check", ".")
        _run(PY, "-m", "ruff", "check", ".")
        _run(PY, "-m", "mypy")
        _run(BIN / "pyright", "--pythonpath", PY)
        _run(PY, "-m", "pytest", *rest)
    elif cmd == "bench":
        _ensure("dev")
        for script in sorted((ROOT / "benchmarks").glob("[!_]*.py")):
            _run(PY, script, *rest)
    else:
        sys.exit(f"unknown command {cmd!r}; use: demo, test or bench")


if __name__ == "__main__":
    main(sys.argv[1:])
