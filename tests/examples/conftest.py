"""A started example bank on SQLite in a temporary directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from examples.bank.app import Bank, open_sqlite_bank


@pytest.fixture
async def bank(tmp_path: Path) -> AsyncIterator[Bank]:
    async with open_sqlite_bank(tmp_path / "bank", batch_size=20) as b:
        yield b
