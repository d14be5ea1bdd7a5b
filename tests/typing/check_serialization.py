"""Typing of cqrskit.serialization: checked by mypy --strict and pyright (strict).

Nothing here runs; ``tests/unit/test_typing.py`` runs both checkers over this folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, assert_type

from cqrskit import Event
from cqrskit.eventlog import StoredEvent
from cqrskit.serialization import (
    EncodedEvent,
    EventTypes,
    JsonSerializer,
    OrjsonSerializer,
    Serializer,
)

event_types = EventTypes()


@event_types.register("account.opened", version=2)
@dataclass(frozen=True, slots=True)
class AccountOpened(Event):
    account_id: str


@event_types.register
@dataclass(frozen=True, slots=True)
class AccountClosed(Event):
    account_id: str


@event_types.register("account.renamed", version=3, ignore_unknown_fields=True)
@dataclass(frozen=True, slots=True)
class AccountRenamed(Event):
    account_id: str


@dataclass(frozen=True, slots=True)
class AccountFrozen(Event):
    account_id: str


assert_type(event_types.register(AccountFrozen, "account.frozen"), type[AccountFrozen])
assert_type(AccountOpened("a").account_id, str)
assert_type(AccountClosed("a").account_id, str)
assert_type(AccountRenamed("a").account_id, str)


@event_types.upcaster("account.opened", 1)
def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return data


def use(serializer: Serializer, stored: StoredEvent) -> None:
    assert_type(serializer.encode(AccountOpened("a")), EncodedEvent)
    assert_type(serializer.decode("account.opened", 2, "{}"), Event)
    assert_type(serializer.decode_stored(stored), Event)


ports: list[Serializer] = [JsonSerializer(event_types), OrjsonSerializer(event_types)]
assert_type(event_types.type_for("account.opened"), type[Event])
