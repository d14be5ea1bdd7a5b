"""Run mypy --strict and pyright over tests/typing, and prove both reject wrong code."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYRIGHT = Path(sys.executable).parent / "pyright"
TIMEOUT = 300

HEADER = """\
from collections.abc import Iterator
from dataclasses import dataclass

from cqrskit import Command, Mediator, Query
from cqrskit.sync import SyncMediator


@dataclass(frozen=True)
class OpenAccount(Command[str]):
    owner: str


@dataclass(frozen=True)
class GetAccount(Query[int]):
    account_id: str


@dataclass(frozen=True)
class ListSync(Query[Iterator[str]]):
    pass

"""

# each body has exactly one line marked ``# wrong``, which both checkers must reject
WRONG = {
    "wrong_send_result.py": """
async def check(mediator: Mediator) -> None:
    x: int = await mediator.send(OpenAccount("ada"))  # wrong
    print(x)
""",
    "wrong_ask_result.py": """
async def check(mediator: Mediator) -> None:
    x: str = await mediator.ask(GetAccount("a1"))  # wrong
    print(x)
""",
    "wrong_kind.py": """
async def check(mediator: Mediator) -> None:
    await mediator.send(GetAccount("a1"))  # wrong
""",
    "wrong_sync_send.py": """
def check(mediator: SyncMediator) -> None:
    x: int = mediator.send(OpenAccount("ada"))  # wrong
    print(x)
""",
    "wrong_sync_stream_item.py": """
def check(mediator: SyncMediator) -> None:
    for row in mediator.stream(ListSync()):
        y: int = row  # wrong
        print(y)
""",
}

# messages built on pydantic and msgspec infer like dataclasses; both checkers must accept it
THIRD_PARTY = """\
from typing import assert_type

import msgspec
import pydantic

from cqrskit import Command, Mediator, Query
from cqrskit.sync import SyncMediator


class Rename(pydantic.BaseModel, Command[int]):
    name: str


class Close(msgspec.Struct, Command[bool], frozen=True):
    account_id: str


class Count(Query[int], msgspec.Struct, frozen=True):
    pass


async def check(mediator: Mediator, sync: SyncMediator) -> None:
    assert_type(await mediator.send(Rename(name="x")), int)
    assert_type(await mediator.send(Close("a1")), bool)
    assert_type(await mediator.ask(Count()), int)
    assert_type(sync.send(Close("a1")), bool)
"""


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def mypy(paths: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), *paths])


def pyright(paths: list[str]) -> subprocess.CompletedProcess[str]:
    # --pythonpath: resolve third-party imports (pydantic, msgspec) from this interpreter
    return run([str(PYRIGHT), "--pythonpath", sys.executable, *paths])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for this module's runs (warm after the first), private to the run."""
    return tmp_path_factory.mktemp("mypy_cache")


@pytest.fixture(scope="module")
def wrong_files(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, int]:
    folder = tmp_path_factory.mktemp("wrong_typing")
    out: dict[Path, int] = {}
    for name, body in WRONG.items():
        text = HEADER + body
        path = folder / name
        path.write_text(text)
        lines = text.splitlines()
        marked = [i for i, line in enumerate(lines, start=1) if line.endswith("# wrong")]
        assert len(marked) == 1
        out[path] = marked[0]
    return out


def test_mypy_strict_accepts_the_inference_examples(cache: Path) -> None:
    result = mypy(["tests/typing"], cache)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


def test_pyright_strict_accepts_the_inference_examples() -> None:
    assert PYRIGHT.exists(), f"pyright is not installed next to {sys.executable}"
    result = pyright(["tests/typing"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 errors" in result.stdout


@pytest.fixture(scope="module")
def third_party_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("third_party_typing") / "check_third_party.py"
    path.write_text(THIRD_PARTY)
    return path


def test_mypy_infers_pydantic_and_msgspec_messages(third_party_file: Path, cache: Path) -> None:
    result = mypy([str(third_party_file)], cache)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pyright_infers_pydantic_and_msgspec_messages(third_party_file: Path) -> None:
    result = pyright([str(third_party_file)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_rejects_each_wrong_file(wrong_files: dict[Path, int], cache: Path) -> None:
    result = mypy([str(p) for p in wrong_files], cache)
    assert result.returncode == 1, result.stdout + result.stderr
    for path, line in wrong_files.items():
        assert f"{path}:{line}: error" in result.stdout, (path.name, result.stdout)


def test_pyright_rejects_each_wrong_file(wrong_files: dict[Path, int]) -> None:
    result = pyright([str(p) for p in wrong_files])
    assert result.returncode == 1, result.stdout + result.stderr
    for path, line in wrong_files.items():
        assert f"{path}:{line}:" in result.stdout, (path.name, result.stdout)
