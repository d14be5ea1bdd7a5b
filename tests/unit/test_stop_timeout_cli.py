"""``--stop-timeout`` on ``cqrskit relay run``, ``cqrskit projections run`` (one process or
``--partitions N``) and ``cqrskit consume run``: the value reaches the relay, projector,
partitioned worker or consumer, and a value that is not a finite number of seconds >= 0 is
refused by name before anything is opened."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cqrskit.cli import main
from cqrskit.messaging import Consumer, Relay
from cqrskit.projections import PartitionedProjector, Projector

pytest.importorskip("redis")


def locations(tmp_path: Path) -> list[str]:
    db = f"sqlite:///{tmp_path / 'app.db'}"
    return ["--store", db, "--read", db, "--create-tables"]


def relay_run(tmp_path: Path, *extra: str) -> list[str]:
    # the broker is never contacted: the relay's run() is replaced below
    return ["relay", "run", *locations(tmp_path), "--broker", "redis://127.0.0.1:9/0", *extra]


@pytest.fixture
def nothing_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused command must stop before it opens anything (and never run until a
    signal, as it would if the value were taken)."""

    async def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("the command went on to open the event log")

    monkeypatch.setattr("cqrskit.cli.projections.open_store", refused)
    monkeypatch.setattr("cqrskit.cli.relay.open_store", refused)
    monkeypatch.setattr("cqrskit.cli.consume.open_source", refused)


def projections_run(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "projections",
        "run",
        *locations(tmp_path),
        "--projection",
        "tests.support.bank:balances",
        "--decoder",
        "tests.support.bank:serializer",
        *extra,
    ]


def consume_run(tmp_path: Path, *extra: str) -> list[str]:
    # the broker is never contacted: the consumer's run() is replaced below
    return [
        "consume",
        "run",
        "--read",
        f"sqlite:///{tmp_path / 'app.db'}",
        "--broker",
        "redis://127.0.0.1:9/0",
        "--partitions",
        "4",
        "--projection",
        "tests.support.bank:balances",
        "--decoder",
        "tests.support.bank:serializer",
        *extra,
    ]


@pytest.mark.parametrize(("given", "expected"), [([], 10.0), (["--stop-timeout", "2.5"], 2.5)])
def test_relay_run_hands_the_stop_timeout_to_the_relay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: list[str], expected: float
) -> None:
    seen: list[float] = []

    class Recording(Relay):
        async def run(self) -> None:
            seen.append(self.stop_timeout)

    monkeypatch.setattr("cqrskit.cli.relay.Relay", Recording)
    assert main(relay_run(tmp_path, *given)) == 0
    assert seen == [expected]


@pytest.mark.parametrize(("given", "expected"), [([], 10.0), (["--stop-timeout", "0"], 0.0)])
def test_projections_run_hands_the_stop_timeout_to_the_projector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: list[str], expected: float
) -> None:
    seen: list[float] = []

    class Recording(Projector):
        async def run(self) -> None:
            seen.append(self.stop_timeout)

    monkeypatch.setattr("cqrskit.cli.projections.Projector", Recording)
    assert main(projections_run(tmp_path, *given)) == 0
    assert seen == [expected]


@pytest.mark.parametrize(("given", "expected"), [([], 10.0), (["--stop-timeout", "3"], 3.0)])
def test_a_partitioned_worker_gets_the_stop_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: list[str], expected: float
) -> None:
    seen: list[float] = []

    class Recording(PartitionedProjector):
        async def run(self) -> None:
            seen.append(self.stop_timeout)

    monkeypatch.setattr("cqrskit.cli.projections.PartitionedProjector", Recording)
    assert main(projections_run(tmp_path, "--partitions", "4", *given)) == 0
    assert seen == [expected]


@pytest.mark.parametrize(("given", "expected"), [([], 10.0), (["--stop-timeout", "0.5"], 0.5)])
def test_consume_run_hands_the_stop_timeout_to_the_consumer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: list[str], expected: float
) -> None:
    seen: list[float] = []

    class Recording(Consumer):
        async def run(self) -> None:
            seen.append(self.stop_timeout)

    monkeypatch.setattr("cqrskit.cli.consume.Consumer", Recording)
    assert main(consume_run(tmp_path, *given)) == 0
    assert seen == [expected]


@pytest.mark.usefixtures("nothing_opened")
@pytest.mark.parametrize("command", [relay_run, projections_run, consume_run])
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "ten"])
def test_a_bad_stop_timeout_is_refused_by_name(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: Callable[..., list[str]],
    value: str,
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(command(tmp_path, f"--stop-timeout={value}"))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --stop-timeout: {value!r} is not a number of seconds >= 0" in err
