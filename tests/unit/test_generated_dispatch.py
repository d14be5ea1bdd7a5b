"""The generated ``send``/``ask`` of small registries behave like the generic methods."""

from __future__ import annotations

from dataclasses import dataclass, make_dataclass
from typing import Any

import pytest

from cqrskit import Command, NoHandlerError, Query, Registry, SyncMediator, WrongMessageKindError


@dataclass(frozen=True)
class Ping(Command[str]):
    text: str


@dataclass(frozen=True)
class LoudPing(Ping):
    pass


@dataclass(frozen=True)
class Stranger(Command[str]):
    pass


@dataclass(frozen=True)
class Echo(Query[str]):
    text: str


def small_registry() -> Registry:
    registry = Registry()

    @registry.handler
    def ping(cmd: Ping) -> str:
        return f"pong {cmd.text}"

    @registry.handler
    def echo(query: Echo) -> str:
        return query.text

    return registry


def test_small_registry_gets_generated_verbs() -> None:
    mediator = SyncMediator(small_registry())
    assert "send" in vars(mediator)
    assert "ask" in vars(mediator)
    assert mediator.send.__doc__ == SyncMediator.send.__doc__
    assert mediator.send(Ping("a")) == "pong a"
    assert mediator.ask(Echo("b")) == "b"


def test_generated_verbs_route_subclasses_and_refuse_wrong_messages() -> None:
    mediator = SyncMediator(small_registry())
    assert mediator.send(LoudPing("x")) == "pong x"
    with pytest.raises(NoHandlerError, match="Stranger"):
        mediator.send(Stranger())
    with pytest.raises(WrongMessageKindError, match=r"ask\(\)"):
        mediator.send(Echo("q"))  # type: ignore[arg-type]
    with pytest.raises(WrongMessageKindError, match=r"send\(\)"):
        mediator.ask(Ping("p"))  # type: ignore[arg-type]


def test_large_registry_keeps_the_generic_method() -> None:
    registry = Registry()
    for i in range(9):
        cls: Any = make_dataclass(f"Cmd{i}", [("n", int)], bases=(Command[int],), frozen=True)

        def handle(cmd: Any, i: int = i) -> int:
            return int(cmd.n) + i

        registry.add(handle, cls)
        last = cls
    mediator = SyncMediator(registry)
    assert "send" not in vars(mediator)
    assert mediator.send(last(1)) == 9
