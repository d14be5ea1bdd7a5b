"""LoggingBehavior / SyncLoggingBehavior."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

import cqrskit.pipeline.logging as logging_module
from cqrskit import Command, Mediator, Registry
from cqrskit.pipeline import LoggingBehavior, SyncLoggingBehavior


@dataclass(frozen=True, slots=True)
class Login(Command[str]):
    user: str
    password: str = field(repr=False)


class Explosive(Command[str]):
    """A message whose repr raises: formatting it at all fails the test."""

    def __repr__(self) -> str:
        raise AssertionError("the message was formatted")


class _NoClock:
    @staticmethod
    def perf_counter() -> float:
        raise AssertionError("the clock was read")


def _logger(name: str, level: int) -> logging.Logger:
    logger = logging.getLogger(f"tests.cqrskit.logging.{name}")
    logger.setLevel(level)
    return logger


async def test_disabled_logger_returns_next_result_without_any_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logging_module, "time", _NoClock)
    behavior = LoggingBehavior(_logger("off", logging.CRITICAL), include_message=True)
    message = Explosive()
    sentinel = object()

    async def downstream(m: Any) -> object:
        return sentinel

    awaitable = downstream(message)

    def next_(m: Any) -> Any:
        assert m is message
        return awaitable

    returned = behavior(message, next_)
    assert returned is awaitable  # no coroutine of its own
    assert await returned is sentinel


async def test_disabled_failure_path_does_no_work_either(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging_module, "time", _NoClock)
    behavior = LoggingBehavior(_logger("off2", logging.CRITICAL))

    async def failing(m: Any) -> Any:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await behavior(Explosive(), failing)


async def test_start_and_end_logged_with_type_and_duration_but_not_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = _logger("on", logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger=logger.name)
    behavior = LoggingBehavior(logger)

    async def handler(m: Any) -> str:
        return "ok"

    assert await behavior(Login("ada", "hunter2"), handler) == "ok"
    records = [r for r in caplog.records if r.name == logger.name]
    assert next(r.getMessage() for r in records) == "dispatch Login started"
    assert records[1].getMessage().startswith("dispatch Login ended in ")
    assert records[1].levelno == logging.DEBUG
    assert records[1].message_type == "Login"  # type: ignore[attr-defined]
    assert records[1].duration_ms >= 0  # type: ignore[attr-defined]
    assert all("ada" not in r.getMessage() for r in records)
    assert "hunter2" not in caplog.text


async def test_include_message_logs_repr_and_respects_hidden_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = _logger("repr", logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger=logger.name)
    behavior = LoggingBehavior(logger, include_message=True, level=logging.INFO)

    async def handler(m: Any) -> str:
        return "ok"

    await behavior(Login("ada", "hunter2"), handler)
    first = next(r for r in caplog.records if r.name == logger.name)
    assert first.levelno == logging.INFO
    assert "Login(user='ada')" in first.getMessage()
    assert "hunter2" not in caplog.text


async def test_failure_logged_with_error_type_and_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = _logger("fail", logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger=logger.name)
    behavior = LoggingBehavior(logger)

    async def handler(m: Any) -> str:
        raise KeyError("missing")

    with pytest.raises(KeyError):
        await behavior(Login("ada", "pw"), handler)
    failure = [r for r in caplog.records if r.name == logger.name][-1]
    assert failure.levelno == logging.WARNING
    assert "dispatch Login failed after" in failure.getMessage()
    assert "with KeyError" in failure.getMessage()
    assert failure.exc_info is not None
    assert failure.exc_info[0] is KeyError
    assert failure.error_type == "KeyError"  # type: ignore[attr-defined]
    assert not any("ended" in r.getMessage() for r in caplog.records)


async def test_only_failures_logged_when_level_is_warning(caplog: pytest.LogCaptureFixture) -> None:
    logger = _logger("warn", logging.WARNING)
    caplog.set_level(logging.WARNING, logger=logger.name)
    behavior = LoggingBehavior(logger, traceback=False)

    async def ok(m: Any) -> str:
        return "ok"

    async def bad(m: Any) -> str:
        raise ValueError("x")

    await behavior(Explosive(), ok)
    with pytest.raises(ValueError, match="x"):
        await behavior(Explosive(), bad)
    records = [r for r in caplog.records if r.name == logger.name]
    assert len(records) == 1
    assert records[0].exc_info is None
    assert "Explosive failed" in records[0].getMessage()


async def test_through_a_mediator_default_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="cqrskit.dispatch")
    registry = Registry()

    @registry.handler
    async def login(cmd: Login) -> str:
        return f"token-{cmd.user}"

    mediator = Mediator(registry, behaviors=[LoggingBehavior()])
    assert await mediator.send(Login("ada", "hunter2")) == "token-ada"
    messages = [r.getMessage() for r in caplog.records if r.name == "cqrskit.dispatch"]
    assert messages[0] == "dispatch Login started"
    assert messages[1].startswith("dispatch Login ended")


def test_sync_twin_logs_and_skips_work_when_off(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = _logger("sync", logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger=logger.name)
    on = SyncLoggingBehavior(logger)
    assert on(Login("ada", "pw"), lambda m: "ok") == "ok"
    with pytest.raises(ZeroDivisionError):
        on(Login("ada", "pw"), lambda m: 1 / 0)
    texts = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert texts[0] == "dispatch Login started"
    assert texts[1].startswith("dispatch Login ended")
    assert texts[3].startswith("dispatch Login failed")
    assert "ZeroDivisionError" in texts[3]

    monkeypatch.setattr(logging_module, "time", _NoClock)
    off = SyncLoggingBehavior(_logger("sync-off", logging.CRITICAL))
    assert off(Explosive(), lambda m: "fine") == "fine"
