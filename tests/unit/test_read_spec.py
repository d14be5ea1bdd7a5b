from __future__ import annotations

from dataclasses import dataclass

from cqrskit import Query
from cqrskit.projections import ReadSpec, read_spec, reads


@reads("balances", "history", policy="stale", timeout=0.5)
@dataclass(frozen=True)
class GetBalance(Query[int]):
    account: str


@dataclass(frozen=True)
class GetBalanceInCents(GetBalance):
    pass


@dataclass(frozen=True)
class Plain(Query[int]):
    pass


def test_read_spec_returns_the_declaration() -> None:
    spec = read_spec(GetBalance)
    assert isinstance(spec, ReadSpec)
    assert spec == ReadSpec(("balances", "history"), "stale", 0.5)


def test_read_spec_is_inherited_and_absent_without_reads() -> None:
    assert read_spec(GetBalanceInCents) == read_spec(GetBalance)
    assert read_spec(Plain) is None
