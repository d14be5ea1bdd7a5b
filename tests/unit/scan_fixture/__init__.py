"""A package for Registry.scan tests: messages here, handlers in a subpackage."""

from dataclasses import dataclass

from cqrskit import Command, Event, Query, handler


@dataclass(frozen=True)
class Deposit(Command[int]):
    amount: int


@dataclass(frozen=True)
class Deposited(Event):
    amount: int


@dataclass(frozen=True)
class GetTotal(Query[int]):
    pass


TOTAL: list[int] = []


@handler
def on_deposited(e: Deposited) -> None:
    TOTAL.append(e.amount)
