"""The bank with ``history`` moved to a broker consumer by configuration: the same
projection and handlers, fed by a relay through a broker and split into partitions."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

from examples.bank.app import open_sqlite_bank
from examples.bank.demo import run_demo
from examples.bank.domain import Customer, Deposit, GetHistory, OpenAccount, acting_as

from cqrskit.projections import ask_consistent, partition_status, projection_status
from tests.conftest import require_service


async def test_demo_with_history_through_the_in_memory_broker(tmp_path: Path) -> None:
    async with open_sqlite_bank(tmp_path / "bank", batch_size=20, history_via="broker") as bank:
        assert bank.projector is None
        assert bank.consumer is not None
        out = io.StringIO()
        outcome = await run_demo(bank, operations=80, seed=3, out=out)
        assert outcome.ok, out.getvalue()
        [status] = await projection_status(bank.read_db, bank.store, ["history"])
        rows = await partition_status(bank.read_db, "history", bank.store)
    assert status.mode == "consumer"
    assert status.lag_events == 0
    assert len(rows) == 4
    assert all(r.lag_events == 0 for r in rows)


async def test_read_your_writes_through_nats(tmp_path: Path) -> None:
    require_service("nats")
    from cqrskit.nats import NatsSource, NatsTransport

    name = f"bank_{uuid.uuid4().hex[:8]}"
    transport = NatsTransport(stream=name.upper(), subject_prefix=name)
    source = NatsSource(stream=name.upper(), subject_prefix=name)
    try:
        async with open_sqlite_bank(
            tmp_path / "bank", history_via="broker", broker=(transport, source)
        ) as bank:
            with acting_as(Customer("ada")):
                account = await bank.mediator.send(OpenAccount("ada"))
                receipt = await bank.mediator.send_tracked(Deposit(account, 1_234))
                history = await ask_consistent(bank.mediator, GetHistory(account), receipt.token)
        assert [e.kind for e in history.value] == ["deposit", "opened"]
        assert history.stale is False
    finally:
        await transport.close()
        await source.close()
        from tests.support.brokers import nats_delete_stream

        await nats_delete_stream("nats://127.0.0.1:4222", name.upper())
