# ruff: noqa: PT017  -- the kit must not import pytest, so it asserts in except blocks
"""A conformance kit for event-store drivers: subclass it in your driver's tests.

Each ``test_*`` coroutine checks one promise of :class:`~cqrskit.eventlog.EventStore`
and :class:`~cqrskit.eventlog.UnitOfWork`. A driver's test module subclasses
:class:`EventStoreConformance` in a class named ``Test...`` and implements the four
abstract methods; pytest (with pytest-asyncio in auto mode) then runs every check::

    class TestSqliteEventStore(EventStoreConformance):
        async def make_store(self) -> EventStore: ...
        async def close_store(self, store: EventStore) -> None: ...
        async def write_state(self, uow: UnitOfWork, key: str) -> None: ...
        async def state_keys(self, store: EventStore) -> set[str]: ...

Only the standard library is imported here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

from cqrskit.dependencies import Dependencies
from cqrskit.errors import ConcurrencyError, PersistenceError
from cqrskit.eventlog import EventStore, StoredEvent, UnitOfWork
from cqrskit.mediator import Mediator
from cqrskit.messages import Command, Event, Metadata
from cqrskit.registry import Registry

__all__ = ["Deposited", "EventStoreConformance", "Opened", "wait_visible"]


async def wait_visible(store: EventStore, position: int, timeout: float = 10.0) -> None:
    """Wait until ``store.head() >= position``.

    On PostgreSQL an open transaction of another writer of the same event log (one that
    has already written) keeps readers below its position until it ends, so a reader may
    lag its own writer briefly.

    Raises:
        TimeoutError: the position did not become visible within ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        head = await store.head()
        if head >= position:
            return
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"position {position} not visible after {timeout} s (head {head})")
        await store.wait_for(head, min(left, 0.05))


@dataclass(frozen=True, slots=True)
class Opened(Event):
    """Test event: an account was opened."""

    account: str
    owner: str


@dataclass(frozen=True, slots=True)
class Deposited(Event):
    """Test event: money was deposited."""

    account: str
    amount: int


@dataclass(frozen=True, slots=True)
class _Open(Command[str]):
    account: str
    fail: bool = False


@dataclass(frozen=True, slots=True)
class _OpenTwo(Command[str]):
    account: str


class _Boom(Exception):
    pass


class EventStoreConformance(ABC):
    """The checks every event-store driver must pass."""

    @abstractmethod
    async def make_store(self) -> EventStore:
        """A new, empty store (its tables created)."""

    @abstractmethod
    async def close_store(self, store: EventStore) -> None:
        """Release the store's connections (and drop its schema, if the test made one)."""

    @abstractmethod
    async def write_state(self, uow: UnitOfWork, key: str) -> None:
        """Write one state row ``key`` through ``uow``'s transaction."""

    @abstractmethod
    async def state_keys(self, store: EventStore) -> set[str]:
        """The committed state rows' keys."""

    def head_source(self, store: EventStore) -> EventStore:
        """The store whose ``head()`` ``store.wait_for`` reads: ``store`` itself, unless it
        delegates its reads to a store it wraps (then return that one, as the tests of
        ``SqlAlchemyEventStore`` do). The lost-wake-up check slows this ``head()`` down."""
        return store

    # -- helpers -------------------------------------------------------------------------

    async def _all(self, store: EventStore) -> list[StoredEvent]:
        out: list[StoredEvent] = []
        after = 0
        for _ in range(10_000):
            batch = await store.read_after(after, 100)
            if not batch:
                return out
            out.extend(batch)
            after = batch[-1].position
        raise AssertionError("read_after did not reach the end in 10,000 batches")

    def _mediator(self, store: EventStore, seen: list[Event]) -> Mediator:
        registry = Registry()
        kit = self

        @registry.handler
        async def open_account(cmd: _Open, uow: UnitOfWork) -> str:
            await kit.write_state(uow, cmd.account)
            uow.record(cmd.account, Opened(cmd.account, "ada"), expected_version=0)
            if cmd.fail:
                raise _Boom("handler failed after recording")
            return cmd.account

        @registry.handler
        async def open_two(cmd: _OpenTwo, mediator: Mediator) -> str:
            await mediator.send(_Open(cmd.account + "-a"))
            await mediator.send(_Open(cmd.account + "-b"))
            return cmd.account

        @registry.handler
        async def on_opened(e: Opened) -> None:
            seen.append(e)

        return Mediator(
            registry, behaviors=[store.transaction()], resolver=[store.resolver(), Dependencies()]
        )

    # -- checks --------------------------------------------------------------------------

    async def test_commit_appends_events_and_state_atomically(self) -> None:
        """State and events of one unit of work commit together."""
        store = await self.make_store()
        try:
            uow = await store.begin(Metadata(message_id="m1", correlation_id="c1"))
            await self.write_state(uow, "k1")
            uow.record("acc-1", Opened("acc-1", "ada"), Deposited("acc-1", 5), expected_version=0)
            uow.record("acc-2", Opened("acc-2", "bob"))
            last = await uow.commit()
            assert not uow.active
            assert last is not None
            assert await store.last_position() == last
            await wait_visible(store, last)
            events = await self._all(store)
            assert [(e.stream, e.version) for e in events] == [
                ("acc-1", 1),
                ("acc-1", 2),
                ("acc-2", 1),
            ]
            positions = [e.position for e in events]
            assert positions == sorted(set(positions))
            assert last == positions[-1]
            assert await store.head() == last
            assert [e.type for e in events] == ["Opened", "Deposited", "Opened"]
            assert json.loads(events[1].data) == {"account": "acc-1", "amount": 5}
            assert events[0].schema_version == 1
            md = events[0].metadata
            assert md["causation_id"] == "m1"
            assert md["correlation_id"] == "c1"
            assert md["timestamp"]
            ids = {e.metadata["message_id"] for e in events}
            assert len(ids) == 3
            assert await self.state_keys(store) == {"k1"}
        finally:
            await self.close_store(store)

    async def test_rollback_keeps_nothing(self) -> None:
        """A rolled-back unit of work leaves neither state nor events."""
        store = await self.make_store()
        try:
            uow = await store.begin()
            await self.write_state(uow, "gone")
            uow.record("acc-1", Opened("acc-1", "ada"))
            await uow.rollback()
            assert not uow.active
            assert await self._all(store) == []
            assert await store.head() == 0
            assert await self.state_keys(store) == set()
            with_events = await store.begin()
            with_events.record("acc-1", Opened("acc-1", "ada"), expected_version=0)
            assert await with_events.commit() is not None
            assert [e.version for e in await store.read_stream("acc-1")] == [1]
        finally:
            await self.close_store(store)

    async def test_commit_without_events_returns_none(self) -> None:
        """A unit of work without events commits its state and yields no token."""
        store = await self.make_store()
        try:
            uow = await store.begin()
            await self.write_state(uow, "only-state")
            assert await uow.commit() is None
            assert await self.state_keys(store) == {"only-state"}
            assert await store.head() == 0
        finally:
            await self.close_store(store)

    async def test_expected_version_conflict(self) -> None:
        """A wrong expected version raises ConcurrencyError naming stream and versions."""
        store = await self.make_store()
        try:
            first = await store.begin()
            first.record("s", Opened("s", "a"), Deposited("s", 1), expected_version=0)
            await first.commit()
            for expected in (0, 1, 3):
                uow = await store.begin()
                await self.write_state(uow, f"never-{expected}")
                uow.record("s", Deposited("s", 2), expected_version=expected)
                try:
                    await uow.commit()
                except ConcurrencyError as exc:
                    assert exc.stream == "s"
                    assert exc.expected_version == expected
                    assert exc.actual_version == 2
                else:
                    raise AssertionError(f"expected_version={expected} did not conflict")
                assert not uow.active
            assert await self.state_keys(store) == set()
            ok = await store.begin()
            ok.record("s", Deposited("s", 3), expected_version=2)
            await ok.commit()
            versions = [e.version for e in await store.read_stream("s")]
            assert versions == [1, 2, 3]
            assert [e.version for e in await store.read_stream("s", after_version=2)] == [3]
        finally:
            await self.close_store(store)

    async def test_record_contradicting_itself_fails_at_once(self) -> None:
        """Two record calls on one stream must agree on versions."""
        store = await self.make_store()
        try:
            uow = await store.begin()
            uow.record("s", Opened("s", "a"), expected_version=0)
            uow.record("s", Deposited("s", 1), expected_version=1)
            try:
                uow.record("s", Deposited("s", 2), expected_version=5)
            except ConcurrencyError as exc:
                assert (exc.stream, exc.expected_version, exc.actual_version) == ("s", 5, 2)
            else:
                raise AssertionError("contradicting expected_version accepted")
            assert [n.expected_version for n in uow.recorded] == [0, 1]
            await uow.commit()
            assert [e.version for e in await store.read_stream("s")] == [1, 2]
            late = await store.begin()
            late.record("s", Deposited("s", 3))
            late.record("s", Deposited("s", 4), expected_version=3)
            assert [n.expected_version for n in late.recorded] == [2, 3]
            await late.commit()
            assert [e.version for e in await store.read_stream("s")] == [1, 2, 3, 4]
        finally:
            await self.close_store(store)

    async def test_concurrent_appends_one_winner_per_version(self) -> None:
        """Writers that all expect the same version: exactly one wins."""
        store = await self.make_store()
        try:
            results: list[str] = []

            async def writer(i: int) -> None:
                uow = await store.begin()
                uow.record("hot", Deposited("hot", i), expected_version=0)
                try:
                    await uow.commit()
                    results.append("won")
                except ConcurrencyError:
                    results.append("lost")

            await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(6))), 30)
            assert sorted(results) == ["lost"] * 5 + ["won"]
            assert [e.version for e in await store.read_stream("hot")] == [1]
            unchecked: list[int] = []

            async def appender(i: int) -> None:
                for _ in range(20):
                    uow = await store.begin()
                    uow.record("hot", Deposited("hot", i))
                    try:
                        await uow.commit()
                        unchecked.append(i)
                        return
                    except ConcurrencyError:
                        continue

            await asyncio.wait_for(asyncio.gather(*(appender(i) for i in range(4))), 30)
            assert len(unchecked) == 4
            assert [e.version for e in await store.read_stream("hot")] == [1, 2, 3, 4, 5]
        finally:
            await self.close_store(store)

    async def test_inline_hook_runs_before_commit(self) -> None:
        """Inline hooks see positions and share the transaction; their error rolls back."""
        store = await self.make_store()
        try:
            calls: list[list[StoredEvent]] = []
            fail = [False]

            async def hook(uow: UnitOfWork, stored: list[StoredEvent]) -> None:
                calls.append(stored)
                await self.write_state(uow, f"hook-{stored[0].stream}")
                if fail[0]:
                    raise _Boom("hook failed")

            store.add_inline_hook(hook)
            uow = await store.begin()
            uow.record("a", Opened("a", "x"))
            last = await uow.commit()
            assert last is not None
            await wait_visible(store, last)
            assert [e.position for e in calls[0]] == [last]
            assert calls[0][0].stream == "a"
            assert calls[0][0].version == 1
            fail[0] = True
            bad = await store.begin()
            bad.record("b", Opened("b", "x"))
            try:
                await bad.commit()
            except _Boom:
                pass
            else:
                raise AssertionError("hook error was swallowed")
            assert [e.stream for e in await self._all(store)] == ["a"]
            assert await self.state_keys(store) == {"hook-a"}
        finally:
            await self.close_store(store)

    async def test_wait_for_wakes_on_commit(self) -> None:
        """wait_for returns True after a commit and False on timeout."""
        store = await self.make_store()
        try:
            assert await store.wait_for(0, 0.01) is False
            waiter = asyncio.ensure_future(store.wait_for(0, 10))
            await asyncio.sleep(0)
            uow = await store.begin()
            uow.record("w", Opened("w", "x"))
            last = await uow.commit()
            assert await asyncio.wait_for(waiter, 10) is True
            assert last is not None
            await wait_visible(store, last)
            assert await store.wait_for(0, 0.01) is True
        finally:
            await self.close_store(store)

    async def test_wait_for_sees_a_commit_made_while_it_reads_the_head(self) -> None:
        """A commit landing while wait_for is still reading the head wakes it (no lost
        wake-up): wait_for returns True, not False after its whole timeout."""
        store = await self.make_store()
        source = self.head_source(store)
        real_head = source.head
        entered, release = asyncio.Event(), asyncio.Event()

        async def slow_head() -> int:
            value = await real_head()
            entered.set()
            await release.wait()
            return value

        try:
            source.head = slow_head  # type: ignore[method-assign]
            waiter = asyncio.ensure_future(store.wait_for(0, 3.0))
            await asyncio.wait_for(entered.wait(), 10)
            uow = await store.begin()
            uow.record("lost-wake", Opened("lost-wake", "x"))
            await uow.commit()
            release.set()
            assert await asyncio.wait_for(waiter, 10) is True
        finally:
            release.set()
            del source.head
            await self.close_store(store)

    async def test_mediator_commits_publishes_after_commit_and_tracks_token(self) -> None:
        """send_tracked returns the last position; event handlers run after commit only."""
        store = await self.make_store()
        try:
            seen: list[Event] = []
            mediator = self._mediator(store, seen)
            receipt = await mediator.send_tracked(_Open("acc-9"))
            assert receipt.result == "acc-9"
            assert receipt.token is not None
            await wait_visible(store, receipt.token)
            assert receipt.token == await store.head()
            assert seen == [Opened("acc-9", "ada")]
            assert await self.state_keys(store) == {"acc-9"}
            try:
                await mediator.send(_Open("acc-10", fail=True))
            except _Boom:
                pass
            else:
                raise AssertionError("handler error was swallowed")
            assert seen == [Opened("acc-9", "ada")]
            assert [e.stream for e in await self._all(store)] == ["acc-9"]
            assert await self.state_keys(store) == {"acc-9"}
            try:
                await mediator.send(_Open("acc-9"))
            except ConcurrencyError as exc:
                assert exc.stream == "acc-9"
            else:
                raise AssertionError("second open of acc-9 did not conflict")
        finally:
            await self.close_store(store)

    async def test_nested_command_joins_outer_unit_of_work(self) -> None:
        """A command sent from a handler commits with its caller, once."""
        store = await self.make_store()
        try:
            seen: list[Event] = []
            mediator = self._mediator(store, seen)
            receipt = await mediator.send_tracked(_OpenTwo("n"))
            assert receipt.token is not None
            await wait_visible(store, receipt.token)
            events = await self._all(store)
            assert [e.stream for e in events] == ["n-a", "n-b"]
            assert receipt.token == events[-1].position
            assert await self.state_keys(store) == {"n-a", "n-b"}
            assert seen == [Opened("n-a", "ada"), Opened("n-b", "ada")]
        finally:
            await self.close_store(store)

    async def test_failing_event_handler_keeps_the_commit(self) -> None:
        """An after-commit handler error is reported, the command's result still returned."""
        store = await self.make_store()
        try:
            registry = Registry()
            reported: list[tuple[Event, Exception]] = []

            @registry.handler
            async def open_account(cmd: _Open, uow: UnitOfWork) -> str:
                uow.record(cmd.account, Opened(cmd.account, "x"))
                return cmd.account

            @registry.handler
            async def explode(e: Opened) -> None:
                raise _Boom("event handler failed")

            mediator = Mediator(
                registry,
                behaviors=[
                    store.transaction(on_publish_error=lambda e, x: reported.append((e, x)))
                ],
                resolver=store.resolver(),
            )
            assert await mediator.send(_Open("p")) == "p"
            assert [e.version for e in await store.read_stream("p")] == [1]
            assert len(reported) == 1
            assert reported[0][0] == Opened("p", "x")
            logged = Mediator(registry, behaviors=[store.transaction()], resolver=store.resolver())
            records: list[logging.LogRecord] = []

            class Catch(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    records.append(record)

            logger = logging.getLogger("cqrskit.eventlog")
            catcher = Catch()
            logger.addHandler(catcher)
            try:
                assert await logged.send(_Open("q")) == "q"
            finally:
                logger.removeHandler(catcher)
            assert [r.levelno for r in records] == [logging.ERROR]
            assert "Opened" in records[0].getMessage()
        finally:
            await self.close_store(store)

    async def test_record_after_commit_is_refused(self) -> None:
        """A finished unit of work refuses new events."""
        store = await self.make_store()
        try:
            uow = await store.begin()
            await uow.commit()
            try:
                uow.record("s", Opened("s", "x"))
            except PersistenceError:
                pass
            else:
                raise AssertionError("record after commit accepted")
        finally:
            await self.close_store(store)
