"""A module whose command has no handler: scanning it makes the build fail."""

from dataclasses import dataclass

from cqrskit import Command


@dataclass(frozen=True)
class Withdraw(Command[int]):
    amount: int
