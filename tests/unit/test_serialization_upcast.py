"""Upcasters: chains from old schema versions to the current class; clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from cqrskit.errors import SerializationError
from cqrskit.messages import Event
from cqrskit.serialization import EventTypes, JsonSerializer, OrjsonSerializer


@dataclass(frozen=True, slots=True)
class AccountOpenedV3(Event):
    """v1: {"id", "name"}; v2 renamed name -> owner; v3 added currency (no default)."""

    account_id: str
    owner: str
    currency: str


def rename_fields(data: dict[str, Any]) -> dict[str, Any]:
    return {"account_id": data["id"], "owner": data["name"]}


def add_currency(data: dict[str, Any]) -> dict[str, Any]:
    data["currency"] = "EUR"
    return data


def full_registry() -> EventTypes:
    types = EventTypes()
    types.register(AccountOpenedV3, "account.opened", version=3)
    types.register_upcaster("account.opened", 1, rename_fields)

    @types.upcaster("account.opened", 2)
    def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
        return add_currency(data)

    return types


@pytest.mark.parametrize("serializer_cls", [JsonSerializer, OrjsonSerializer])
def test_v1_payload_decodes_into_the_v3_class(serializer_cls: type[JsonSerializer]) -> None:
    serializer = serializer_cls(full_registry())
    event = serializer.decode("account.opened", 1, '{"id":"a-1","name":"ada"}')
    assert event == AccountOpenedV3("a-1", "ada", "EUR")


def test_v2_payload_runs_only_the_last_step() -> None:
    calls: list[int] = []
    types = EventTypes()
    types.register(AccountOpenedV3, "account.opened", version=3)
    types.register_upcaster("account.opened", 1, lambda d: calls.append(1) or d)
    types.register_upcaster("account.opened", 2, lambda d: calls.append(2) or add_currency(d))
    serializer = JsonSerializer(types)
    event = serializer.decode("account.opened", 2, '{"account_id":"a-1","owner":"ada"}')
    assert event == AccountOpenedV3("a-1", "ada", "EUR")
    assert calls == [2]


def test_current_version_is_not_upcast_and_encodes_at_current_version() -> None:
    serializer = JsonSerializer(full_registry())
    encoded = serializer.encode(AccountOpenedV3("a-1", "ada", "USD"))
    assert encoded.schema_version == 3
    assert serializer.decode(encoded.type, 3, encoded.data) == AccountOpenedV3("a-1", "ada", "USD")


def test_upcasters_registered_before_the_class_work() -> None:
    types = EventTypes()
    types.register_upcaster("account.opened", 1, rename_fields)
    types.register_upcaster("account.opened", 2, add_currency)
    types.register(AccountOpenedV3, "account.opened", version=3)
    assert JsonSerializer(types).decode("account.opened", 1, '{"id":"x","name":"y"}') == (
        AccountOpenedV3("x", "y", "EUR")
    )


def test_missing_step_names_the_type_and_versions() -> None:
    types = EventTypes()
    types.register(AccountOpenedV3, "account.opened", version=3)
    types.register_upcaster("account.opened", 1, rename_fields)
    with pytest.raises(SerializationError) as info:
        JsonSerializer(types).decode("account.opened", 1, '{"id":"a","name":"b"}')
    text = str(info.value)
    assert "'account.opened' at schema version 1" in text
    assert "no upcaster from version 2 to 3 (current is 3)" in text
    assert "register_upcaster('account.opened', 2, fn)" in text


def test_version_newer_than_the_class_is_rejected() -> None:
    with pytest.raises(SerializationError, match="schema version 4, newer than"):
        JsonSerializer(full_registry()).decode("account.opened", 4, "{}")


@pytest.mark.parametrize("version", [0, -3, True, "1", None])
def test_invalid_schema_version_is_rejected(version: Any) -> None:
    with pytest.raises(SerializationError, match="invalid schema version"):
        JsonSerializer(full_registry()).decode("account.opened", version, "{}")


def test_upcaster_failure_is_a_serialization_error_with_the_cause() -> None:
    # v1 payload without "name": rename_fields raises KeyError
    with pytest.raises(
        SerializationError, match=r"upcaster of 'account\.opened' from version 1 to 2"
    ):
        JsonSerializer(full_registry()).decode("account.opened", 1, '{"id":"a"}')


def test_upcaster_returning_a_non_dict_is_rejected() -> None:
    types = EventTypes()
    types.register(AccountOpenedV3, "account.opened", version=2)
    types.register_upcaster("account.opened", 1, lambda d: [d])  # type: ignore[arg-type,return-value]
    with pytest.raises(SerializationError, match="returned list, not a dict"):
        JsonSerializer(types).decode("account.opened", 1, "{}")


def test_upcast_result_is_still_checked_against_the_class() -> None:
    types = EventTypes()
    types.register(AccountOpenedV3, "account.opened", version=2)
    types.register_upcaster("account.opened", 1, lambda d: d)  # forgot to add currency
    with pytest.raises(SerializationError, match="field 'currency': required field is missing"):
        JsonSerializer(types).decode("account.opened", 1, '{"account_id":"a","owner":"b"}')
