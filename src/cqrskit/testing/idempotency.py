# ruff: noqa: PT017  -- the kit must not import pytest, so it asserts in except blocks
"""A conformance kit for idempotency backends: subclass it in your event store's tests.

Each ``test_*`` coroutine checks one promise of :class:`~cqrskit.idempotency.Idempotency`
on the backend a store returns from :meth:`~cqrskit.eventlog.EventStore.idempotency_backend`:
a retried key replays the stored result once, a key reused for another command is refused,
a failed attempt stores nothing, concurrent duplicates run the handler once, keys are scoped
to the authorized principal. A store's test module subclasses :class:`IdempotencyConformance`
in a class named ``Test...`` and implements the abstract methods; pytest (with
pytest-asyncio in auto mode) runs every check::

    class TestMyIdempotency(IdempotencyConformance):
        async def make_store(self) -> EventStore: ...  # with a ``state`` table
        async def close_store(self, store) -> None: ...
        async def write_state(self, uow, key) -> None: ...
        async def state_keys(self, store) -> list[str]: ...
        async def wait_blocked(self, idem, store) -> None: ...

Only the standard library is imported here.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from cqrskit.dependencies import Dependencies
from cqrskit.errors import IdempotencyError, SerializationError, ValidationError
from cqrskit.eventlog import EventStore, UnitOfWork
from cqrskit.idempotency import Idempotency, idempotency_key, principal_scope
from cqrskit.mediator import Mediator
from cqrskit.messages import Command, Event
from cqrskit.pipeline import AuthorizationBehavior, authenticated
from cqrskit.registry import Registry

__all__ = ["Balance", "Deposit", "IdempotencyConformance", "Probe", "Withdraw"]


@dataclass(frozen=True, slots=True)
class Balance:
    """A structured result (stored as JSON, decoded back on replay)."""

    account: str
    total: int


@dataclass(frozen=True, slots=True)
class Deposit(Command[Balance]):
    """The kit's command with a structured result; its handler writes ``account:amount``."""

    account: str
    amount: int


@dataclass(frozen=True, slots=True)
class Withdraw(Command[int]):
    """The kit's command with a scalar result; its handler writes ``account:-amount``."""

    account: str
    amount: int


@dataclass(frozen=True, slots=True)
class _Transfer(Command[None]):
    """Carries its own key (the attribute protocol) and sends two nested commands."""

    source: str
    target: str
    amount: int
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class _BadResult(Command[int]):
    """Its handler returns a str although the command declares int."""

    account: str


@dataclass(frozen=True, slots=True)
class _Deposited(Event):
    account: str
    amount: int


@dataclass
class Probe:
    """What the handlers did, for the assertions."""

    calls: int = 0
    fail_next: bool = False
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    published: list[_Deposited] = field(default_factory=list)


class _Boom(Exception):
    """The failure ``Probe.fail_next`` makes the deposit handler raise."""


class IdempotencyConformance(ABC):
    """The checks every idempotency backend must pass; subclass and implement the abstract
    methods."""

    @abstractmethod
    async def make_store(self) -> EventStore:
        """A new, empty store with a ``state`` table."""

    @abstractmethod
    async def close_store(self, store: EventStore) -> None:
        """Release the store."""

    @abstractmethod
    async def write_state(self, uow: UnitOfWork, key: str) -> None:
        """Write one state row ``key`` through ``uow``'s transaction."""

    @abstractmethod
    async def state_keys(self, store: EventStore) -> list[str]:
        """Committed state keys (with duplicates)."""

    @abstractmethod
    async def wait_blocked(self, idem: Idempotency, store: EventStore) -> None:
        """Return once a second attempt with the same key is waiting for the first."""

    # -- helpers -------------------------------------------------------------------------

    def app(
        self,
        store: EventStore,
        idem: Idempotency,
        probe: Probe,
        *,
        principal: ContextVar[Any] | None = None,
    ) -> Mediator:
        """The test application; with ``principal``, an AuthorizationBehavior (any
        authenticated caller may send anything) runs before the idempotency behavior."""
        registry = Registry()
        kit = self

        @registry.handler
        async def deposit(cmd: Deposit, uow: UnitOfWork) -> Balance:
            probe.calls += 1
            probe.entered.set()
            if probe.gate is not None:
                await asyncio.wait_for(probe.gate.wait(), 10)
            await kit.write_state(uow, f"{cmd.account}:{cmd.amount}")
            uow.record(f"acc-{cmd.account}", _Deposited(cmd.account, cmd.amount))
            if probe.fail_next:
                probe.fail_next = False
                raise _Boom("handler failed")
            return Balance(cmd.account, cmd.amount)

        @registry.handler
        async def withdraw(cmd: Withdraw, uow: UnitOfWork) -> int:
            probe.calls += 1
            await kit.write_state(uow, f"{cmd.account}:-{cmd.amount}")
            return -cmd.amount

        @registry.handler
        async def transfer(cmd: _Transfer, mediator: Mediator) -> None:
            probe.calls += 1
            await mediator.send(Withdraw(cmd.source, cmd.amount))
            await mediator.send(Deposit(cmd.target, cmd.amount))

        @registry.handler
        async def bad(cmd: _BadResult, uow: UnitOfWork) -> int:
            await kit.write_state(uow, f"bad:{cmd.account}")
            return "not an int"  # type: ignore[return-value]

        @registry.handler
        async def on_deposited(e: _Deposited) -> None:
            probe.published.append(e)

        idem.check(registry)
        behaviors: list[Any] = [idem.transaction()]
        if principal is not None:
            policies: dict[type, Callable[[Any, Any], bool]] = {Command: authenticated}
            behaviors.insert(0, AuthorizationBehavior(policies, principal=principal))
        return Mediator(registry, behaviors=behaviors, resolver=[store.resolver(), Dependencies()])

    async def events(self, store: EventStore) -> int:
        """How many events the test streams hold."""
        # read_stream, not read_after: on PostgreSQL another test's open transaction may
        # hold the read_after horizon back for a moment
        return sum([len(await store.read_stream(s)) for s in ("acc-a", "acc-b")])

    # -- checks --------------------------------------------------------------------------

    async def test_retry_with_same_key_returns_stored_result_once(self) -> None:
        """A retry with the same key returns the stored result and token; the handler ran
        once, the replay publishes nothing; another key or no key runs again."""
        store = await self.make_store()
        idem = await Idempotency.open(store)
        try:
            probe = Probe()
            mediator = self.app(store, idem, probe)
            with idempotency_key("k-1"):
                first = await mediator.send_tracked(Deposit("a", 5))
            with idempotency_key("k-1"):
                second = await mediator.send_tracked(Deposit("a", 5))
            assert first.result == Balance("a", 5)
            assert second.result == Balance("a", 5)
            assert first.token is not None
            assert second.token == first.token
            assert probe.calls == 1
            assert len(probe.published) == 1  # the replay publishes nothing
            assert await self.state_keys(store) == ["a:5"]
            assert await self.events(store) == 1
            [event] = await store.read_stream("acc-a")
            assert event.position == first.token
            record = await idem.lookup("k-1")
            assert record is not None
            assert record.token == first.token
            assert record.command_type.endswith("Deposit")
            # another key is another command
            with idempotency_key("k-2"):
                third = await mediator.send(Deposit("a", 5))
            assert third == Balance("a", 5)
            assert probe.calls == 2
            # without a key nothing is stored and nothing is deduplicated
            await mediator.send(Deposit("a", 5))
            assert probe.calls == 3
            assert await self.events(store) == 3
        finally:
            idem.close()
            await self.close_store(store)

    async def test_reusing_a_key_for_another_command_is_refused(self) -> None:
        """A key reused with another payload or another command type is an
        ``IdempotencyError`` naming the command, with a hint; nothing runs."""
        store = await self.make_store()
        idem = await Idempotency.open(store)
        try:
            probe = Probe()
            mediator = self.app(store, idem, probe)
            with idempotency_key("k"):
                await mediator.send(Deposit("a", 5))
            for other, what in ((Deposit("a", 6), "payload"), (Withdraw("a", 5), "command type")):
                try:
                    with idempotency_key("k"):
                        await mediator.send(other)
                except IdempotencyError as exc:
                    assert re.search(what, str(exc)), str(exc)
                    assert exc.message_type is type(other)
                    assert exc.hint
                else:
                    raise AssertionError(f"key 'k' reused for {other!r} was not refused")
            assert probe.calls == 1
            assert await self.state_keys(store) == ["a:5"]
            assert await self.events(store) == 1
        finally:
            idem.close()
            await self.close_store(store)

    async def test_failed_attempt_stores_nothing_and_retry_runs_once(self) -> None:
        """A failed attempt stores no key and no state; the retry runs once and is then
        replayed."""
        store = await self.make_store()
        idem = await Idempotency.open(store)
        try:
            probe = Probe(fail_next=True)
            mediator = self.app(store, idem, probe)
            with idempotency_key("k"):
                try:
                    await mediator.send(Deposit("a", 5))
                except _Boom:
                    pass
                else:
                    raise AssertionError("the handler must fail")
            assert await idem.lookup("k") is None
            assert await self.state_keys(store) == []
            with idempotency_key("k"):
                assert await mediator.send(Deposit("a", 5)) == Balance("a", 5)
            with idempotency_key("k"):
                assert await mediator.send(Deposit("a", 5)) == Balance("a", 5)
            assert probe.calls == 2
            assert await self.state_keys(store) == ["a:5"]
            assert await self.events(store) == 1
        finally:
            idem.close()
            await self.close_store(store)

    async def test_key_attribute_covers_nested_commands(self) -> None:
        """A key carried as the command's attribute covers the commands it sends; a key
        attribute of ``None`` means no key."""
        store = await self.make_store()
        idem = await Idempotency.open(store)
        try:
            probe = Probe()
            mediator = self.app(store, idem, probe)
            cmd = _Transfer("a", "b", 3, idempotency_key="t-1")
            first = await mediator.send_tracked(cmd)
            second = await mediator.send_tracked(cmd)
            assert first.result is None
            assert second.result is None
            assert second.token == first.token is not None
            assert probe.calls == 3  # transfer + withdraw + deposit, once
            assert sorted(await self.state_keys(store)) == ["a:-3", "b:3"]
            # nested commands ran without a key of their own
            assert await idem.lookup("t-1") is not None
            # an attribute key of None means no key
            await mediator.send(_Transfer("a", "b", 1))
            await mediator.send(_Transfer("a", "b", 1))
            assert probe.calls == 9
        finally:
            idem.close()
            await self.close_store(store)

    async def test_concurrent_duplicates_run_the_handler_once(self) -> None:
        """A duplicate arriving while the first attempt runs waits for it and gets its
        result and token: one effect."""
        store = await self.make_store()
        idem = await Idempotency.open(store)
        try:
            probe = Probe(gate=asyncio.Event())
            mediator = self.app(store, idem, probe)

            async def attempt() -> object:
                with idempotency_key("dup"):
                    receipt = await mediator.send_tracked(Deposit("a", 7))
                return receipt.result, receipt.token

            first = asyncio.create_task(attempt())
            await asyncio.wait_for(probe.entered.wait(), 10)
            second = asyncio.create_task(attempt())
            await self.wait_blocked(idem, store)
            assert probe.calls == 1
            probe.gate.set()  # type: ignore[union-attr]
            a, b = await asyncio.wait_for(asyncio.gather(first, second), 20)
            assert a == b
            assert a[0] == Balance("a", 7)  # type: ignore[index]
            assert probe.calls == 1
            assert await self.state_keys(store) == ["a:7"]
            assert await self.events(store) == 1
        finally:
            idem.close()
            await self.close_store(store)

    async def test_results_must_match_their_declared_type(self) -> None:
        """A stored result must be of the command's declared type: otherwise a
        ``SerializationError`` rolls the command back."""
        store = await self.make_store()
        idem = await Idempotency.open(store)
        try:
            mediator = self.app(store, idem, Probe())
            try:
                with idempotency_key("bad"):
                    await mediator.send(_BadResult("x"))
            except SerializationError as exc:
                assert "_BadResult" in str(exc), str(exc)
            else:
                raise AssertionError("a result of the wrong type was stored")
            assert await self.state_keys(store) == []  # rolled back with the command
            assert await idem.lookup("bad") is None
            # without a key the result is not stored, so nothing checks it
            assert await mediator.send(_BadResult("y")) == "not an int"  # type: ignore[comparison-overlap]
        finally:
            idem.close()
            await self.close_store(store)

    async def test_bad_keys_are_validation_errors(self) -> None:
        """Empty, too long or control-character keys are ``ValidationError``s."""
        store = await self.make_store()
        idem = await Idempotency.open(store)
        try:
            mediator = self.app(store, idem, Probe())
            for bad in ("", "x" * 256, "a\x00b"):
                try:
                    with idempotency_key(bad):
                        raise AssertionError(f"key {bad!r} was accepted")
                except ValidationError as exc:
                    assert exc.errors[0].field == "idempotency_key"
            try:
                await mediator.send(_Transfer("a", "b", 1, idempotency_key=""))
            except ValidationError:
                pass
            else:
                raise AssertionError("an empty key attribute was accepted")
            assert await self.state_keys(store) == []
        finally:
            idem.close()
            await self.close_store(store)

    async def test_many_duplicates_one_effect_per_key(self) -> None:
        """5 keys x 4 concurrent attempts each (interleaved): one effect per key, and every
        attempt of a key gets the same result and token."""
        store = await self.make_store()
        idem = await Idempotency.open(store)
        try:
            probe = Probe()
            mediator = self.app(store, idem, probe)

            async def attempt(k: int) -> tuple[str, object, int | None]:
                with idempotency_key(f"bulk-{k}"):
                    receipt = await mediator.send_tracked(Deposit(f"a{k}", k))
                return f"bulk-{k}", receipt.result, receipt.token

            outcomes = await asyncio.wait_for(
                asyncio.gather(*(attempt(k) for _ in range(4) for k in range(5))), 60
            )
            by_key: dict[str, set[tuple[object, int | None]]] = {}
            for key, result, token in outcomes:
                by_key.setdefault(key, set()).add((result, token))
            assert len(by_key) == 5
            for k in range(5):
                [(result, token)] = by_key[f"bulk-{k}"]
                assert result == Balance(f"a{k}", k)
                [event] = await store.read_stream(f"acc-a{k}")
                assert token == event.position
            assert probe.calls == 5
            assert sorted(await self.state_keys(store)) == sorted(f"a{k}:{k}" for k in range(5))
        finally:
            idem.close()
            await self.close_store(store)

    async def test_keys_are_scoped_to_the_authorized_principal(self) -> None:
        """Principal A and principal B send the same command with the same key: both run,
        each gets its own result; a retry by A replays A's result only."""
        store = await self.make_store()
        idem = await Idempotency.open(store)
        user: ContextVar[str | None] = ContextVar("user", default=None)
        try:
            probe = Probe()
            mediator = self.app(store, idem, probe, principal=user)

            async def send_as(who: str, cmd: Deposit | Withdraw) -> object:
                token = user.set(who)
                try:
                    with idempotency_key("K-123"):
                        return await mediator.send(cmd)
                finally:
                    user.reset(token)

            assert await send_as("alice", Deposit("a", 5)) == Balance("a", 5)
            assert await send_as("bob", Deposit("a", 5)) == Balance("a", 5)
            assert probe.calls == 2  # bob's handler ran: he did not get alice's result
            assert await send_as("alice", Deposit("a", 5)) == Balance("a", 5)
            assert await send_as("bob", Deposit("a", 5)) == Balance("a", 5)
            assert probe.calls == 2  # each one's retry replays their own
            # carol's K-123 is hers: another command under it runs (shared keys: refused)
            assert await send_as("carol", Withdraw("b", 1)) == -1
            assert probe.calls == 3
            assert set(await self.state_keys(store)) == {"a:5", "b:-1"}
            assert await self.events(store) == 2  # alice's deposit and bob's
            alice = await idem.lookup("K-123", scope=principal_scope("alice", None))
            assert alice is not None
            assert alice.scope == principal_scope("alice", None)
            assert await idem.lookup("K-123") is None  # nothing stored without a scope
        finally:
            idem.close()
            await self.close_store(store)

    async def test_the_scope_hook_chooses_the_scope(self) -> None:
        """``Idempotency(scope=...)``: here the tenant, whoever the principal is."""
        store = await self.make_store()
        tenant: ContextVar[str] = ContextVar("tenant", default="t0")
        user: ContextVar[str | None] = ContextVar("user", default=None)
        idem = await Idempotency.open(store, scope=lambda principal, command: tenant.get())
        try:
            probe = Probe()
            mediator = self.app(store, idem, probe, principal=user)
            for who, where in (("alice", "t1"), ("bob", "t1"), ("alice", "t2")):
                u, t = user.set(who), tenant.set(where)
                try:
                    with idempotency_key("same"):
                        await mediator.send(Deposit("a", 1))
                finally:
                    user.reset(u)
                    tenant.reset(t)
            assert probe.calls == 2  # t1 once (alice, then bob's replay), t2 once
            assert (await idem.lookup("same", scope="t1")) is not None
            assert (await idem.lookup("same", scope="t2")) is not None
        finally:
            idem.close()
            await self.close_store(store)
