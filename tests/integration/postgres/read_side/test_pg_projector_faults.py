"""A projector whose batch COMMITs are lost on the wire (through the fault proxy).

The projector's read database is reached through :class:`FaultProxy`. At the projector's
``projector.checkpointed`` fail point (the batch and its checkpoint are written, COMMIT is
next) the proxy is armed for exactly that COMMIT:

* ``DROP_COMMIT_REPLY``: the server commits, the reply is lost. The projector cannot know
  the batch committed; it must not apply it a second time.
* ``BLACKHOLE_COMMIT``: the COMMIT never reaches the server; the batch must be applied again.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Mapping

import pytest
from tests.support.bank import Deposited, balances, serializer
from tests.support.faults import check_invariants
from tests.support.pg_log import invariants, open_pg_log
from tests.support.proxy import FaultProxy, Mode
from tests.support.waiting import until

from cqrskit import _failpoints
from cqrskit.postgres import PostgresReadDatabase
from cqrskit.projections import Projector

pytestmark = pytest.mark.postgres

CLEAN = {"lost": 0, "double": 0, "reordered": 0, "wrong_sum": 0}


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", 5432)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def test_lost_batch_commits_are_applied_exactly_once(
    postgres_dsn: str, schemas: Callable[[str], str], proxy: FaultProxy
) -> None:
    write_schema, read = schemas("w"), schemas("r")
    rng = random.Random(17)
    modes = [Mode.DROP_COMMIT_REPLY, Mode.BLACKHOLE_COMMIT] * 6
    armed: list[tuple[Mode, int]] = []  # (mode, batch's last position) per armed COMMIT

    async def arm(point: str, info: Mapping[str, object]) -> None:
        if point == "projector.checkpointed" and len(armed) < len(modes):
            if proxy.mode is Mode.FORWARD:  # the previous fault has fired
                mode = modes[len(armed)]
                armed.append((mode, int(info["last"])))  # type: ignore[call-overload]
                proxy.faults_left = 1
                proxy.mode = mode

    log = await open_pg_log(postgres_dsn, write_schema)
    read_db = PostgresReadDatabase(proxy.dsn(postgres_dsn), schema=read)
    projector = Projector(
        log, read_db, [balances], serializer, batch_size=7, lease_ttl=5.0, poll_interval=0.05
    )
    _failpoints.set_hook(arm)
    try:
        head = 0
        for _ in range(120):
            account = f"acc-{rng.randrange(5)}"
            [event] = await log.append(account, Deposited(account, rng.randrange(1, 100)))
            head = event.position

        async def caught_up() -> bool:
            return projector.checkpoint("balances") >= head

        async with projector:
            await until(caught_up, projector.signal, timeout=60)
    finally:
        _failpoints.set_hook(None)
        await read_db.close()
        await log.close()
    # every armed COMMIT was hit, as armed: half committed unseen, half never arrived
    assert [m for m, _ in armed] == modes
    assert proxy.commit_faults == len(modes)
    result = await invariants(postgres_dsn, write_schema, read)
    assert check_invariants("postgres-lost-batch-commits", result) == CLEAN
