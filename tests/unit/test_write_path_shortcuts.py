"""The write path's shortcuts keep the semantics of what they replace."""

from __future__ import annotations

import enum
import json
import os
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cqrskit import Command, Event, Mediator, Registry, Scope, WrongMessageKindError
from cqrskit._encoding import encode_event
from cqrskit.errors import SerializationError
from cqrskit.eventlog import InMemoryEventStore, InMemoryUnitOfWork, UnitOfWork
from cqrskit.messages import Metadata, _iso_utc, _new_id
from cqrskit.sqlite import SqliteEventStore, SqliteUnitOfWork


@dataclass(frozen=True)
class Base(Event):
    n: int


@dataclass(frozen=True)
class Child(Base):
    pass


@dataclass(frozen=True)
class Unhandled(Event):
    n: int


@dataclass(frozen=True)
class Anything(Event):
    value: object


def test_new_id_is_a_uuid4_hex() -> None:
    ids = {_new_id() for _ in range(2000)}
    assert len(ids) == 2000
    for h in ids:
        u = uuid.UUID(hex=h)
        assert u.hex == h
        assert u.version == 4
        assert u.variant == uuid.RFC_4122


def test_new_ids_stay_unique_across_blocks_and_threads() -> None:
    # ids are made 256 at a time: threads running out of a block at once each take a
    # block of their own
    per_thread = 3000
    with ThreadPoolExecutor(max_workers=4) as pool:
        batches = list(pool.map(lambda _: [_new_id() for _ in range(per_thread)], range(4)))
    ids = [i for batch in batches for i in batch]
    assert len(set(ids)) == len(ids) == 4 * per_thread
    assert all(uuid.UUID(hex=h).version == 4 for h in ids)
    assert len({h[:16] for h in ids}) == 1  # one process: one random part


def test_has_event_handlers_follows_publish() -> None:
    seen: list[Event] = []
    registry = Registry()

    @registry.handler
    async def on_base(event: Base) -> None:
        seen.append(event)

    mediator = Mediator(registry)
    assert mediator.has_event_handlers(Base)
    assert mediator.has_event_handlers(Child)  # through its base type
    assert not mediator.has_event_handlers(Unhandled)
    assert not mediator.has_event_handlers(int)


async def test_has_event_handlers_leaves_publish_checks_in_place() -> None:
    mediator = Mediator(Registry())
    assert not mediator.has_event_handlers(int)
    with pytest.raises(WrongMessageKindError):
        await mediator.publish(5)  # type: ignore[arg-type]
    assert not mediator.has_event_handlers(Unhandled)
    await mediator.publish(Unhandled(1))


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "quote ' \" and é \u2028 \x00",
        1,
        1.5,
        None,
        True,
        [1, {"a": [2, 3]}],
        {"k": {1: 2}},
    ],
)
def test_encode_event_matches_the_stdlib_encoder(value: object) -> None:
    expected = json.dumps(
        {"value": value}, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str
    )
    assert encode_event(Anything(value)).data == expected


@dataclass(frozen=True, slots=True)
class Pair(Event):
    first: object
    second: object


@dataclass(frozen=True)
class Nothing(Event):
    pass


class Colour(enum.StrEnum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Text(str):
    pass


_VALUES: list[object] = [
    "plain",
    'quote " \\ and é \u2028 \x00 \ud800',
    "",
    0,
    -7,
    2**70,
    1.5,
    -0.0,
    1e300,
    None,
    True,
    False,
    Colour.RED,
    Level.HIGH,
    Text("sub"),
    [1, "a"],
    {"k": 1.25},
    (1, 2),
    uuid.UUID(int=5),
]


@pytest.mark.parametrize("second", _VALUES)
@pytest.mark.parametrize("first", _VALUES)
def test_encode_event_of_several_fields_matches_the_stdlib_encoder(
    first: object, second: object
) -> None:
    # exact str/int/float/bool/None values take the fast path, the rest the C encoder;
    # both must write what json.dumps writes
    expected = json.dumps(
        {"first": first, "second": second},
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=str,
    )
    assert encode_event(Pair(first, second)).data == expected


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encode_event_refuses_nan_in_any_field(bad: float) -> None:
    for event in (Pair(bad, 1), Pair("x", bad)):
        with pytest.raises(SerializationError, match="Pair"):
            encode_event(event)


def test_encode_event_without_fields() -> None:
    assert tuple(encode_event(Nothing())) == ("Nothing", 1, "{}")


def test_encode_event_refuses_a_container_holding_itself() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match="Anything"):
        encode_event(Anything(loop))


def test_encode_event_refuses_nan() -> None:
    with pytest.raises(SerializationError, match="Anything"):
        encode_event(Anything(float("nan")))


def test_new_ids_in_a_forked_child_differ_from_the_parent() -> None:
    # the id is a per-process random prefix and a counter: a forked child must draw anew
    # or it would repeat the parent's next ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, " ".join(_new_id() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 4096).decode().split()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    parent = [_new_id() for _ in range(3)]
    assert len(child) == 3
    assert not set(child) & set(parent)
    assert {c[:16] for c in child} != {p[:16] for p in parent}  # another random prefix


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 26, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 11, 27, 0, 0, 0, 0, tzinfo=UTC),
        datetime(2024, 2, 29, 12, 30, 1, 5, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
    ],
)
def test_iso_utc_matches_datetime_isoformat(moment: datetime) -> None:
    ns = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000 + 999
    for _ in range(2):  # formatted, then from the per-second cache
        assert _iso_utc(ns) == moment.isoformat(timespec="microseconds")


def test_metadata_timestamp_and_its_text_are_the_same_instant() -> None:
    md = Metadata()
    text = md.timestamp_iso()
    assert datetime.fromisoformat(text) == md.timestamp
    assert md.timestamp.tzinfo is not None
    later = Metadata()
    _ = later.timestamp  # datetime first, text after
    assert datetime.fromisoformat(later.timestamp_iso()) == later.timestamp


class Plain(Event):
    """Neither a dataclass nor a Struct: its instance dict is the payload."""

    def __init__(self, n: int) -> None:
        self.n = n


@dataclass(frozen=True, slots=True)
class Renamed(Event):
    __event_type__ = "accounts.renamed"
    __schema_version__ = 3
    name: str


def test_encode_event_compiles_names_versions_and_plain_classes() -> None:
    assert tuple(encode_event(Renamed("x"))) == ("accounts.renamed", 3, '{"name":"x"}')
    for n in (1, 2):  # compiled, then cached
        assert tuple(encode_event(Plain(n))) == ("Plain", 1, f'{{"n":{n}}}')


def test_iso_utc_before_the_epoch_and_before_year_1000() -> None:
    assert _iso_utc(-1) == "1969-12-31T23:59:59.999999+00:00"
    old = datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    ns = (old - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000
    assert _iso_utc(ns) == old.isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class Deposit(Command[None]):
    key: str


@dataclass(frozen=True, slots=True)
class Deposited(Event):
    key: str


@pytest.mark.parametrize("outer", [False, True])
@pytest.mark.parametrize("read_in_handler", [False, True])
async def test_events_carry_the_metadata_the_dispatch_sees(
    tmp_path: Path, outer: bool, read_in_handler: bool
) -> None:
    # the lineage is read from the dispatch's metadata in one call at commit; whether the
    # handler read that metadata first or not, the events, the handler and the event
    # handlers (dispatched after commit) must agree on it
    store = SqliteEventStore(tmp_path / "m.db")
    registry = Registry()
    seen: dict[str, Metadata] = {}

    @registry.handler
    async def deposit(cmd: Deposit, uow: SqliteUnitOfWork, md: Metadata) -> None:
        if read_in_handler:
            _ = md.message_id, md.timestamp
        seen["command"] = md
        uow.record(cmd.key, Deposited(cmd.key), Deposited(cmd.key), expected_version=0)

    @registry.handler
    async def deposited(event: Deposited, md: Metadata) -> None:
        seen.setdefault("event", md)

    mediator = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
    try:
        if outer:
            async with mediator.scope(metadata=Metadata(correlation_id="req-1")):
                await mediator.send(Deposit("a"))
        else:
            await mediator.send(Deposit("a"))
        events = await store.read_after(0)
    finally:
        store.close()
    command = seen["command"]
    assert [e.metadata["message_id"] for e in events] == [
        f"{command.message_id}-0",
        f"{command.message_id}-1",
    ]
    for e in events:
        assert e.metadata["causation_id"] == command.message_id
        assert e.metadata["correlation_id"] == command.correlation_id
        assert e.metadata["timestamp"] == command.timestamp_iso()
        assert datetime.fromisoformat(e.metadata["timestamp"]) == command.timestamp
    assert command.correlation_id == ("req-1" if outer else command.message_id)
    assert seen["event"].causation_id == command.message_id
    assert seen["event"].correlation_id == command.correlation_id


def test_a_scope_still_takes_attributes_and_weak_references() -> None:
    # Scope keeps its own fields in slots; an integration may still hang its own on it
    scope = Scope()
    scope.custom = 1  # type: ignore[attr-defined]
    assert scope.custom == 1  # type: ignore[attr-defined]
    assert weakref.ref(scope)() is scope
    assert scope.parent is None
    assert scope.extras == {}
    child = Scope(scope)
    assert child.parent is scope
    assert child.metadata.causation_id == scope.metadata.message_id


async def test_a_sqlite_unit_of_work_starts_as_the_base_class_would(tmp_path: Path) -> None:
    # SqliteUnitOfWork.__init__ writes UnitOfWork.__init__ out: every field of the base
    # must be set, to the same starting value
    store = SqliteEventStore(tmp_path / "u.db")
    try:
        md = Metadata()
        uow = await store.begin(md)
        reference = InMemoryUnitOfWork(InMemoryEventStore(), md)
        for name in UnitOfWork.__slots__:
            if name == "store":
                assert uow.store is store
            else:
                assert getattr(uow, name) == getattr(reference, name), name
        await uow.rollback()
    finally:
        store.close()
