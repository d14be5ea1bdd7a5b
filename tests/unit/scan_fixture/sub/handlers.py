"""Handlers found by scanning ``scan_fixture``; one is left unmarked on purpose."""

from cqrskit import handler
from tests.unit.scan_fixture import TOTAL, Deposit, Deposited, GetTotal


@handler(Deposit)
class DepositHandler:
    def handle(self, cmd: Deposit) -> int:
        TOTAL.append(cmd.amount)
        return sum(TOTAL)


@handler
async def get_total(q: GetTotal) -> int:
    return sum(TOTAL)


async def not_marked(e: Deposited) -> None:
    raise AssertionError("an unmarked function must not be registered by scan")
