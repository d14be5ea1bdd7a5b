"""Handlers in a module with postponed annotations, one resolvable and two not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cqrskit import Command

if TYPE_CHECKING:
    from decimal import Decimal


@dataclass(frozen=True)
class Ping(Command[str]):
    text: str


class Greeter:
    def greet(self, text: str) -> str:
        return "pong " + text


async def ping(cmd: Ping, greeter: Greeter) -> str:
    return greeter.greet(cmd.text)


def ping_with_type_checking_only_dependency(cmd: Ping, amount: Decimal) -> str:
    return str(amount)


def make_local_handler() -> Any:
    @dataclass(frozen=True)
    class LocalPing(Command[str]):
        text: str

    def local(cmd: LocalPing) -> str:
        return cmd.text

    return local
