"""Idempotent commands: a retried command with the same key has one effect.

A command carries an **idempotency key** either from the caller's context::

    with idempotency_key(request.headers["Idempotency-Key"]):
        receipt = await mediator.send_tracked(PlaceOrder(...))

or as an attribute of the command itself (``idempotency_key: str | None``). The
:class:`Idempotency` transaction behavior (used *instead of* ``store.transaction()``) then
stores the key, the command's type, a hash of its payload, its JSON-encoded result and its
consistency token in a ``<table>`` row **in the same transaction** as the command's state and
events. A retry with the same key — after a timeout, or after the connection was lost during
COMMIT (:class:`~cqrskit.errors.CommitOutcomeUnknownError`) — finds the row and returns the
stored result and token without running the handler; if the first attempt did not commit,
there is no row and the retry runs the command once.

Keys belong to the caller: when an
:class:`~cqrskit.pipeline.AuthorizationBehavior` granted the command, the key is scoped to
the principal it checked (and the principal's tenant), so two callers never share a key;
``Idempotency(store, scope=...)`` chooses another scope (see :func:`principal_scope`).

Reusing a key for another command type or another payload raises
:class:`~cqrskit.errors.IdempotencyError`. Two attempts in flight with the same key: the
second waits until the first finishes, then returns its stored result (or runs, if the first
rolled back); after ``wait_timeout`` seconds it gets :func:`key_in_progress` instead.

Results are encoded from the command's declared result type (``Command[R]``) with the plans
of :mod:`cqrskit.serialization`: a type that cannot be serialized raises
:class:`~cqrskit.errors.ConfigurationError` at :meth:`Idempotency.check` (or on the first keyed
dispatch of that command).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import inspect
import json
import re
import typing
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cqrskit.dependencies import Scope
from cqrskit.errors import (
    CommitOutcomeUnknownError,
    ConcurrencyError,
    ConfigurationError,
    IdempotencyError,
    SerializationError,
    ValidationError,
    describe,
)
from cqrskit.eventlog import (
    EventStore,
    InMemoryEventStore,
    InMemoryUnitOfWork,
    StoredEvent,
    UnitOfWork,
    validate_identifier,
)
from cqrskit.mediator import Mediator, record_token
from cqrskit.messages import result_type
from cqrskit.pipeline import ScopedBehavior, for_commands
from cqrskit.pipeline.authorization import authorized_principal
from cqrskit.registry import Registry
from cqrskit.serialization import ValueCodec, ValueCodecs

__all__ = [
    "ROW_COLUMNS",
    "Idempotency",
    "IdempotencyBackend",
    "IdempotencyRecord",
    "IdempotencyRow",
    "IdempotentCommand",
    "ScopeHook",
    "current_idempotency_key",
    "idempotency_key",
    "key_in_progress",
    "principal_scope",
]

_MAX_KEY = 255

_key_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "cqrskit_idempotency_key", default=None
)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_key(key: object) -> str:
    if (
        not isinstance(key, str)
        or not key
        or len(key) > _MAX_KEY
        or "\x00" in key
        or _SURROGATE.search(key) is not None  # not encodable: the driver would fail with 500
    ):
        raise ValidationError(
            {
                "idempotency_key": f"must be a non-empty string of at most {_MAX_KEY} characters "
                "without NUL or lone surrogates"
            }
        )
    return key


@contextlib.contextmanager
def idempotency_key(key: str) -> Iterator[None]:
    """Give the commands sent in this block the idempotency ``key``.

    Only the outermost command sent in the block uses it (commands its handler sends join
    its transaction and are covered by it). Works in sync and async code (a context
    variable).

    Raises:
        ValidationError: ``key`` is empty, longer than 255 characters or contains NUL or a
            lone surrogate (text that cannot be encoded as UTF-8).
    """
    token = _key_var.set(_check_key(key))
    try:
        yield
    finally:
        _key_var.reset(token)


def current_idempotency_key() -> str | None:
    """The key set by the innermost :func:`idempotency_key` block, if any."""
    key: str | None = _key_var.get()
    return key


class IdempotentCommand(Protocol):
    """A command that carries its own key: a field or property ``idempotency_key``.

    ``None`` means "no key" for that instance. A key from :func:`idempotency_key` wins.
    """

    @property
    def idempotency_key(self) -> str | None:
        """The command's idempotency key, or ``None``."""
        ...


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """A committed idempotency row.

    Attributes:
        key: the idempotency key.
        command_type: the command's stable name (``__command_type__`` or module.qualname).
        payload_hash: SHA-256 of the command's JSON payload.
        result: the handler's result as JSON text.
        token: the consistency token of the command's commit (``None``: no event).
        created_at: when the command committed (UTC).
        scope: whose key it is (``""``: unscoped); see :func:`principal_scope`.
    """

    key: str
    command_type: str
    payload_hash: str
    result: str
    token: int | None
    created_at: datetime
    scope: str = ""


# -- per-command codecs --------------------------------------------------------------------


class _Spec:
    __slots__ = ("name", "payload", "result")

    def __init__(self, cls: type, codecs: ValueCodecs) -> None:
        self.name: str = getattr(cls, "__command_type__", f"{cls.__module__}.{cls.__qualname__}")
        try:
            self.payload: ValueCodec = codecs.codec(cls, where=f"command {describe(cls)}")
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"{describe(cls)} cannot be hashed for idempotency: {exc.text}",
                message_type=cls,
                hint=exc.hint,
            ) from exc
        declared = _resolve(result_type(cls), cls)
        try:
            self.result: ValueCodec = codecs.codec(declared, where=f"the result of {describe(cls)}")
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"the result of {describe(cls)} must be JSON-serializable to be stored for "
                f"idempotent retries: {exc.text}",
                message_type=cls,
                hint="declare a serializable result type in Command[...] "
                "(str, int, a dataclass, ...) or send this command without a key.",
            ) from exc

    def digest(self, command: object) -> str:
        try:
            text = self.payload.dumps(command)
        except SerializationError as exc:
            raise SerializationError(
                f"cannot hash {self.name} for idempotency: {exc.text}.",
                message_type=type(command),
            ) from exc
        return hashlib.sha256(f"{self.name}\n{text}".encode()).hexdigest()

    def dump(self, result: object, cls: type) -> str:
        try:
            return self.result.dumps(result)
        except SerializationError as exc:
            raise SerializationError(
                f"cannot store the result of {describe(cls)} for idempotent retries: {exc.text}.",
                message_type=cls,
                hint="return a value of the declared result type.",
            ) from exc

    def load(self, text: str, cls: type) -> Any:
        try:
            return self.result.loads(text)
        except SerializationError as exc:
            raise SerializationError(
                f"the stored result of {describe(cls)} cannot be decoded: {exc.text}.",
                message_type=cls,
                hint="the result type changed since the key was stored; use a new key.",
            ) from exc


def _resolve(tp: Any, cls: type) -> Any:
    if tp is Any or tp is typing.Any or tp is _EMPTY:
        return Any
    if isinstance(tp, str | typing.ForwardRef):
        holder = type("_Result", (), {"__annotations__": {"r": tp}, "__module__": cls.__module__})
        try:
            return typing.get_type_hints(holder)["r"]
        except (NameError, TypeError) as exc:
            raise ConfigurationError(
                f"the result type of {describe(cls)} cannot be resolved: {exc}.",
                message_type=cls,
                hint="define the result type at module level before sending keyed commands.",
            ) from exc
    return tp


_EMPTY = inspect.Parameter.empty


# -- backends: where the rows live --------------------------------------------------------


ROW_COLUMNS = "key, command_type, payload_hash, result, token, created_at"
"""The idempotency table's columns, in the order the drivers select them."""


@dataclass(frozen=True, slots=True)
class IdempotencyRow:
    """What a command's attempt stores with its key (a backend adds token and time).

    Attributes:
        events: how many events the command recorded; the token is the position of the
            last of them (0: no event, no token).
        scope: whose key it is (``""``: unscoped).
    """

    key: str
    command_type: str
    payload_hash: str
    result: str
    events: int
    scope: str = ""


class IdempotencyBackend(Protocol):
    """Where an event store keeps idempotency rows: the port a driver implements and returns
    from :meth:`EventStore.idempotency_backend <cqrskit.eventlog.EventStore.idempotency_backend>`.

    ``claim`` and ``save`` run inside the command's unit of work, so the row commits or
    rolls back with the command's state and events.
    """

    async def create(self) -> None:
        """Create the table if missing (idempotent), and get ready to serve lookups."""
        ...

    async def prepare(self) -> None:
        """Get ready to serve lookups without creating anything (``create_tables=False``)."""
        ...

    async def claim(self, uow: UnitOfWork, key: str, scope: str) -> IdempotencyRecord | None:
        """The committed record for (``scope``, ``key``), or ``None`` after claiming it for
        ``uow`` (a concurrent duplicate waits a bounded time, then raises
        :func:`key_in_progress`)."""
        ...

    async def save(self, uow: UnitOfWork, row: IdempotencyRow) -> None:
        """Store ``row`` in ``uow``'s transaction (the token is known once events are)."""
        ...

    def release(self, key: str, scope: str) -> None:
        """The attempt that claimed (``scope``, ``key``) has ended, committed or not."""
        ...

    def forget(self, uow: UnitOfWork) -> None:
        """Drop anything still pending for ``uow`` (it ended)."""
        ...

    async def lookup(self, key: str, scope: str) -> IdempotencyRecord | None:
        """The committed record for (``scope``, ``key``), outside any command."""
        ...

    async def purge(self, before: datetime) -> int:
        """Delete records created before ``before``; return how many."""
        ...

    def close(self) -> None:
        """Release what :meth:`create` or :meth:`prepare` opened."""
        ...


class _MemoryBackend:
    """Rows live in ``store.state`` under ``"cqrskit_idempotency:<key>"``, applied at commit
    with the events; in-flight keys wait for each other in this process."""

    _PREFIX = "cqrskit_idempotency:"

    def __init__(self, store: InMemoryEventStore, wait_timeout: float) -> None:
        self.store = store
        self.wait_timeout = wait_timeout
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self.waiting = 0  # attempts waiting for a duplicate in flight
        self._pending: dict[int, tuple[InMemoryUnitOfWork, IdempotencyRow]] = {}
        store.add_inline_hook(self._hook)

    async def create(self) -> None:
        return None

    async def prepare(self) -> None:
        return None

    def close(self) -> None:
        return None

    def _name(self, key: str, scope: str) -> str:
        # unambiguous for any (scope, key): JSON quotes both
        return self._PREFIX + (json.dumps([scope, key]) if scope else key)

    async def claim(self, uow: UnitOfWork, key: str, scope: str) -> IdempotencyRecord | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        name = self._name(key, scope)
        for _ in range(1000):
            found = self.store.state.get(name)
            if found is not None:
                return typing.cast(IdempotencyRecord, found)
            other = self._inflight.get(name)
            if other is None:
                self._inflight[name] = loop.create_future()
                return None
            left = deadline - loop.time()
            if left <= 0:
                break
            self.waiting += 1
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(other), left)
            finally:
                self.waiting -= 1
        raise key_in_progress(key, self.wait_timeout)

    async def save(self, uow: UnitOfWork, row: IdempotencyRow) -> None:
        assert isinstance(uow, InMemoryUnitOfWork)
        if row.events:
            self._pending[id(uow)] = (uow, row)  # the token is known in the hook
        else:
            uow.changes[self._name(row.key, row.scope)] = _record(row, None)

    async def _hook(self, uow: UnitOfWork, stored: list[StoredEvent]) -> None:
        pending = self._pending.pop(id(uow), None)
        if pending is not None and pending[0] is uow:
            assert isinstance(uow, InMemoryUnitOfWork)
            row = pending[1]
            token = stored[row.events - 1].position
            uow.changes[self._name(row.key, row.scope)] = _record(row, token)

    def release(self, key: str, scope: str) -> None:
        fut = self._inflight.pop(self._name(key, scope), None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def forget(self, uow: UnitOfWork) -> None:
        self._pending.pop(id(uow), None)

    async def lookup(self, key: str, scope: str) -> IdempotencyRecord | None:
        found = self.store.state.get(self._name(key, scope))
        return typing.cast("IdempotencyRecord | None", found)

    async def purge(self, before: datetime) -> int:
        state = self.store.state
        old = [
            k
            for k, v in state.items()
            if k.startswith(self._PREFIX)
            and isinstance(v, IdempotencyRecord)
            and v.created_at < before
        ]
        for k in old:
            del state[k]
        return len(old)


def _record(row: IdempotencyRow, token: int | None) -> IdempotencyRecord:
    return IdempotencyRecord(
        row.key,
        row.command_type,
        row.payload_hash,
        row.result,
        token,
        datetime.now(UTC),
        row.scope,
    )


def key_in_progress(key: str, timeout: float) -> ConcurrencyError:
    """The error a backend raises when an attempt with ``key`` is still running after
    ``timeout`` seconds."""
    return ConcurrencyError(
        f"another attempt with idempotency key {key[:40]!r} is still running after {timeout} s.",
        hint="retry later with the same key: it returns that attempt's result once it commits.",
    )


# -- whose key: the scope -----------------------------------------------------------------

ScopeHook = Callable[[Any, Any], "str | None"]
"""``scope(principal, command) -> str | None``: whose key a command's key is. ``principal``
is what the :class:`~cqrskit.pipeline.AuthorizationBehavior` granted for this dispatch
(``None`` when none ran, or for an anonymous caller); ``None`` or ``""`` means unscoped."""

_MAX_SCOPE = 1000


def _identity(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


def principal_scope(principal: Any, command: Any) -> str | None:
    """The default :data:`ScopeHook`: the authorized principal, with its tenant.

    ``None`` (no authorization ran, or an anonymous caller) leaves the key unscoped. A
    ``str`` or ``int`` principal is its own identity; another object (or mapping) is
    identified by its ``id`` (or ``sub``) attribute (or key), and its ``tenant_id`` (or
    ``tenant``), if it has one, is part of the scope. The scope is the JSON text
    ``[tenant, id]`` (``tenant`` ``null`` when there is none).

    Raises:
        ConfigurationError: a principal with no ``id`` or ``sub`` to identify it.
    """
    if principal is None:
        return None
    if isinstance(principal, str | int) and not isinstance(principal, bool):
        return json.dumps([None, str(principal)])
    ident = _identity(principal, "id")
    if ident is None:
        ident = _identity(principal, "sub")
    if ident is None:
        raise ConfigurationError(
            f"cannot scope idempotency keys to a principal of type "
            f"{type(principal).__qualname__}: it has no 'id' or 'sub'.",
            hint="give the principal an 'id', or pass Idempotency(store, scope=...) returning "
            "the caller's identity as a str.",
        )
    tenant = _identity(principal, "tenant_id")
    if tenant is None:
        tenant = _identity(principal, "tenant")
    return json.dumps([None if tenant is None else str(tenant), str(ident)])


def _check_scope(scope: object) -> str:
    if scope is None or scope == "":
        return ""
    if (
        not isinstance(scope, str)
        or len(scope) > _MAX_SCOPE
        or "\x00" in scope
        or _SURROGATE.search(scope) is not None
    ):
        raise ConfigurationError(
            "the idempotency scope hook returned "
            + (f"a {type(scope).__name__}" if not isinstance(scope, str) else "a bad string")
            + f"; it must return None or a str of at most {_MAX_SCOPE} characters without NUL "
            "or lone surrogates.",
            hint="return a stable identity such as a user id, or a tenant id and a user id.",
        )
    return scope


# -- the behavior --------------------------------------------------------------------------


class Idempotency:
    """Idempotent commands on one event store (in-memory, SQLite, PostgreSQL, or the
    SQLAlchemy store of :mod:`cqrskit.sqlalchemy`).

    Create it with ``idem = await Idempotency.open(store)`` (creates the table when missing)
    and use ``idem.transaction()`` in place of ``store.transaction()``::

        idem = await Idempotency.open(store)
        mediator = Mediator(registry, behaviors=[idem.transaction()],
                            resolver=store.resolver())

    Args:
        store: the event store whose transactions carry the idempotency rows.
        table: the table name (validated, quoted; in the store's schema on PostgreSQL).
        wait_timeout: how long a duplicate in flight waits for the first attempt before
            :func:`key_in_progress` is raised (in memory: on an in-process future;
            PostgreSQL: on the key's row lock, as its ``lock_timeout``; SQLite waits on its
            write lock, bounded by the store's own lock timeout).
        scope: whose key a command's key is (default :func:`principal_scope`: the
            principal an authorization behavior granted, with its tenant).
    """

    def __init__(
        self,
        store: EventStore,
        *,
        table: str = "cqrskit_idempotency",
        wait_timeout: float = 10.0,
        scope: ScopeHook = principal_scope,
    ) -> None:
        validate_identifier(table, "table name")
        if not (isinstance(wait_timeout, int | float) and 0 < wait_timeout < 86_400):
            raise ConfigurationError(
                f"wait_timeout must be a number of seconds > 0 (and below a day), "
                f"got {wait_timeout!r}.",
                hint="e.g. wait_timeout=10.0.",
            )
        if not callable(scope):
            raise ConfigurationError(
                f"scope must be a callable (principal, command) -> str | None, got {scope!r}."
            )
        self.store = store
        self.table = table
        self.wait_timeout = wait_timeout
        self._scope_hook = scope
        self._backend: IdempotencyBackend = (
            _MemoryBackend(store, wait_timeout)
            if isinstance(store, InMemoryEventStore)
            else store.idempotency_backend(table, wait_timeout)
        )
        self._codecs = ValueCodecs()
        self._specs: dict[type, _Spec] = {}
        self._has_attr: dict[type, bool] = {}

    @classmethod
    async def open(
        cls,
        store: EventStore,
        *,
        table: str = "cqrskit_idempotency",
        create_tables: bool = True,
        wait_timeout: float = 10.0,
        scope: ScopeHook = principal_scope,
    ) -> Idempotency:
        """Make an :class:`Idempotency` for ``store`` and create its table if missing.

        Args:
            store: the event store whose transactions carry the keys.
            table: the idempotency table (default ``"cqrskit_idempotency"``; validated).
            create_tables: create the table when missing (default ``True``); ``False``
                checks that it exists (your migrations created it).
            wait_timeout: seconds a duplicate waits for the first attempt with the same key
                to finish (default 10).
            scope: ``(principal, command) -> str | None``, the scope a key belongs to
                (default :func:`principal_scope`: the authorized principal and tenant).
        """
        idem = cls(store, table=table, wait_timeout=wait_timeout, scope=scope)
        if create_tables:
            await idem._backend.create()
        else:
            await idem._backend.prepare()
        return idem

    def check(self, registry: Registry) -> None:
        """Check now that every command's payload and result can be stored.

        Raises:
            ConfigurationError: naming the first command whose payload or declared result
                type cannot be serialized.
        """
        for command_type in registry.commands():
            self._spec(command_type)

    def transaction(
        self, *, on_publish_error: Callable[[Any, Exception], None] | None = None
    ) -> ScopedBehavior:
        """The store's transaction behavior, plus idempotency for commands with a key."""
        inner = self.store.transaction(on_publish_error=on_publish_error).behavior
        return for_commands(_IdempotentTransaction(self, inner))

    async def lookup(self, key: str, *, scope: str | None = None) -> IdempotencyRecord | None:
        """The committed record for ``key`` in ``scope``, or ``None`` when no command with
        that key committed (never used, rolled back, or purged) — for operations scripts
        and support ("did the payment with key K go through, and with what result?").

        ``scope`` is ``None`` for unscoped keys; the scope of a principal's keys is
        ``principal_scope(principal, None)`` (or what your scope hook returns). Reads the
        committed state only: a command with that key still in flight is not seen until it
        commits. ``record.result`` is the handler's result as JSON text, ``record.token``
        the consistency token of its commit.

        Raises:
            ValidationError: ``key`` is empty, longer than 255 characters, or holds NUL.
        """
        record: IdempotencyRecord | None = await self._backend.lookup(
            _check_key(key), _check_scope(scope)
        )
        return record

    async def purge(self, older_than: timedelta) -> int:
        """Delete records older than ``older_than``; return how many. A retry with a purged
        key runs the command again, so keep records longer than clients retry."""
        count: int = await self._backend.purge(datetime.now(UTC) - older_than)
        return count

    def close(self) -> None:
        """Close the SQLite lookup connection (nothing to do for other stores)."""
        self._backend.close()

    def _spec(self, command_type: type) -> _Spec:
        spec = self._specs.get(command_type)
        if spec is None:
            spec = self._specs[command_type] = _Spec(command_type, self._codecs)
        return spec

    def _scope_of(self, command: object, dispatch: Scope) -> str:
        granted, principal = authorized_principal(dispatch)
        return _check_scope(self._scope_hook(principal if granted else None, command))

    def _key_of(self, command: object) -> str | None:
        key: str | None = _key_var.get()
        if key is not None:
            return key
        cls = type(command)
        has = self._has_attr.get(cls)
        if has is None:
            has = self._has_attr[cls] = hasattr(command, "idempotency_key")
        if not has:
            return None
        own = command.idempotency_key  # type: ignore[attr-defined]
        return None if own is None else _check_key(own)


class _IdempotentTransaction:
    __slots__ = ("_idem", "_inner")

    def __init__(self, idem: Idempotency, inner: Callable[..., Awaitable[Any]]) -> None:
        self._idem = idem
        self._inner = inner

    async def __call__(
        self, message: Any, next: Callable[[Any], Awaitable[Any]], scope: Scope, mediator: Mediator
    ) -> Any:
        idem = self._idem
        key = idem._key_of(message)
        if key is None:
            return await self._inner(message, next, scope, mediator)
        cls = type(message)
        spec = idem._spec(cls)
        digest = spec.digest(message)
        owner = idem._scope_of(message, scope)
        backend = idem._backend
        store = idem.store
        replayed: list[IdempotencyRecord] = []
        uows: list[UnitOfWork] = []
        claimed: list[bool] = []

        async def inside(msg: Any) -> Any:
            uow: UnitOfWork = scope[store]
            uows.append(uow)
            record = await backend.claim(uow, key, owner)
            if record is None:
                claimed.append(True)
            else:
                if record.command_type != spec.name or record.payload_hash != digest:
                    what = "command type" if record.command_type != spec.name else "payload"
                    raise IdempotencyError(
                        f"idempotency key {key[:40]!r} was used for {record.command_type} "
                        f"with a different {what}; it cannot be reused for this "
                        f"{spec.name}.",
                        message_type=cls,
                        hint="use a new key for each distinct command; reuse a key only to "
                        "retry the very same command.",
                    )
                replayed.append(record)
                return spec.load(record.result, cls)
            reset = _key_var.set(None)  # commands sent by the handler join this one
            try:
                result = await next(msg)
            finally:
                _key_var.reset(reset)
            text = spec.dump(result, cls)
            row = IdempotencyRow(key, spec.name, digest, text, len(uow._events), owner)
            await backend.save(uow, row)
            return result

        # Nothing this command causes (nested sends, after-commit event handlers) inherits
        # the caller's key: a follow-up command is a different command.
        key_token = _key_var.set(None)
        try:
            result = await self._inner(message, inside, scope, mediator)
        except CommitOutcomeUnknownError as exc:
            exc.retry_safe = True  # a retry with this key cannot apply the command twice
            raise
        finally:
            _key_var.reset(key_token)
            if claimed:
                backend.release(key, owner)
            for uow in uows:
                backend.forget(uow)
        if replayed and replayed[0].token is not None:
            record_token(replayed[0].token)
        return result


def __getattr__(name: str) -> Any:
    # the DDL helpers moved to their technology packages; the old import path still works
    # without this module importing a driver up front
    if name in ("sqlite_idempotency_ddl", "postgres_idempotency_ddl"):
        import importlib

        return getattr(importlib.import_module(f"cqrskit.{name.split('_')[0]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
