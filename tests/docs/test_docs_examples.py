"""Every ```python block in README.md and docs/*.md runs as a program and exits 0.

A block whose first line is ``# requires: <service>`` needs that local service (skipped on a
laptop without it, a failure under CI=true). Blocks fenced as ``text`` or ``bash`` are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_service

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, match in enumerate(FENCE.finditer(path.read_text(encoding="utf-8")), 1):
            out.append((f"{path.relative_to(ROOT)}#{i}", match.group(1)))
    return out


BLOCKS = _blocks()


def test_docs_have_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[w for w, _ in BLOCKS])
def test_doc_block_runs(where: str, code: str, tmp_path: Path) -> None:
    first = code.splitlines()[0] if code.strip() else ""
    if first.startswith("# requires:"):
        for service in first.split(":", 1)[1].split(","):
            require_service(service.strip())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"{where} failed:\n{proc.stdout}\n{proc.stderr}"
