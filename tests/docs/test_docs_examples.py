"""Every ```python block in README.md and docs/*.md runs as a program and exits 0.

A block whose first line is ``# requires: <service>`` needs that local service (skipped on a
laptop without it, a failure under CI=true). Blocks fenced as ``text`` or ``bash`` are not
run — so none of them may hold Python: a ``text`` block that compiles as Python fails
:func:`test_no_python_hides_in_a_text_block` (shell lines, output and diagrams do not).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_service

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
TEXT_FENCE = re.compile(r"^```text\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, match in enumerate(FENCE.finditer(path.read_text(encoding="utf-8")), 1):
            out.append((f"{path.relative_to(ROOT)}#{i}", match.group(1)))
    return out


BLOCKS = _blocks()


def _compiles(code: str) -> bool:
    try:
        compile(code, "<doc>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    except SyntaxError:
        return False
    return True


def test_no_python_hides_in_a_text_block() -> None:
    hidden = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for match in TEXT_FENCE.finditer(text):
            if _compiles(match.group(1)):
                line = text[: match.start()].count("\n") + 1
                hidden.append(f"{path.relative_to(ROOT)}:{line}")
    assert hidden == [], "fence these as ```python and make them run"


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
