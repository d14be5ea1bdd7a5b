"""FastAPI integration: the mediator as a dependency, one scope per request, problem+json.

``install(app, mediator)`` wires three things into an application:

* **a per-request scope** — every request runs inside ``mediator.scope(...)`` with a
  correlation id taken from the ``X-Correlation-ID`` header (or a new one), so every command,
  query and event dispatched while serving it shares that id; the id is echoed in the
  response header;
* **consistency tokens** — commands sent through :class:`Cqrs` (the ``CqrsDep``
  dependency) return their token in the ``CQRS-Consistency-Token`` response header; a later
  request that sends it back gets queries that wait until the read models they declare
  (``@reads(...)``) have caught up with it — a client reads its own writes across requests;
* **typed errors as RFC 9457 problem details** (``application/problem+json``)::

      ValidationError        422  every failing field in "errors"
      NotFoundError          404
      ConcurrencyError       409
      NotAuthorizedError     403
      StaleReadError         503  with Retry-After: the write happened, the read model lags
      UnavailableError       503  with Retry-After: a database is down, lost or out of
                                  connections (drivers' own connection errors too)
      ReadModelMissingError  503  a read-model table nobody set up (the log names the step)
      ReplicaUnavailableError 503 with Retry-After: no read replica could answer
      ConnectionLostError    503  with Retry-After: the database connection was lost, nothing saved
      TokenFromFutureError   400  (and a malformed token header)
      any other error        500  generic text only: nothing internal reaches the client

  Your own exception types are mapped with ``install(..., problems={MyError: Problem(...)})``;
* **a request body limit** — a body over ``max_body_size`` bytes (default 1 MiB) is answered
  413 before it is read in full: at once from ``Content-Length``, or as soon as a streamed
  body passes the limit.

Usage — the application's services (stores, projectors, the mediator) open in the
lifespan and close when the server stops, projectors releasing their leases::

    @asynccontextmanager
    async def services(app: FastAPI) -> AsyncIterator[Mediator]:
        async with SqliteEventStore("app.db") as store:
            yield Mediator(registry, behaviors=recommended(store), resolver=store.resolver())

    app = FastAPI()
    install(app, services)

    @app.post("/accounts")
    async def open_account(body: OpenBody, cqrs: CqrsDep) -> dict[str, str]:
        return {"id": await cqrs.send(OpenAccount(body.owner))}

``install(app, mediator)`` with a mediator built beforehand works as well.

Needs the ``fastapi`` extra (``pip install 'cqrskit[fastapi]'``).
"""

from __future__ import annotations

import logging
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeAlias, TypeVar

from cqrskit._faults import missing_table, unavailable
from cqrskit.errors import (
    CommitOutcomeUnknownError,
    ConcurrencyError,
    ConfigurationError,
    ConnectionLostError,
    CqrsError,
    DispatchTimeoutError,
    IdempotencyError,
    MissingExtraError,
    NotAuthorizedError,
    NotFoundError,
    ReadModelMissingError,
    ReplicaUnavailableError,
    StaleReadError,
    TokenFromFutureError,
    UnavailableError,
    ValidationError,
)
from cqrskit.mediator import Mediator
from cqrskit.messages import Command, Event, Metadata, Query
from cqrskit.projections.consistency import ask_consistent, read_spec

try:
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise MissingExtraError("fastapi", "fastapi") from exc

__all__ = [
    "CORRELATION_HEADER",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_PROBLEMS",
    "STALE_HEADER",
    "TOKEN_HEADER",
    "Cqrs",
    "CqrsDep",
    "MediatorDep",
    "Problem",
    "Services",
    "get_cqrs",
    "get_mediator",
    "install",
]

R = TypeVar("R")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Services: TypeAlias = Callable[[Any], AbstractAsyncContextManager[Mediator]]
"""An async context manager factory: given the app, it opens what the application needs
and yields the mediator; leaving it stops projectors and closes stores (see :func:`install`)."""

_log = logging.getLogger("cqrskit.fastapi")

DEFAULT_MAX_BODY_SIZE = 1024 * 1024
"""The default request body limit of :func:`install`, in bytes (1 MiB)."""

CORRELATION_HEADER = "X-Correlation-ID"
"""The request/response header carrying the correlation id."""
TOKEN_HEADER = "CQRS-Consistency-Token"
"""The request/response header carrying the consistency token."""
STALE_HEADER = "CQRS-Stale"
"""Response header set to ``true`` when a query served data behind the request's token."""

_SCOPE_KEY = "cqrskit"
# matched with fullmatch: a pattern ending in "$" would accept a trailing newline
_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_TOKEN = re.compile(r"[0-9]{1,19}")
_PROBLEM_JSON = "application/problem+json"
_REQUEST_PARTS = ("body", "query", "path", "header", "cookie")


@dataclass(frozen=True, slots=True)
class Problem:
    """How an exception type becomes an RFC 9457 problem response.

    Attributes:
        status: the HTTP status code.
        slug: the last part of the problem ``type`` URI (``urn:cqrskit:problem:<slug>``).
        title: a short, fixed summary of the problem type.
        detail: the ``detail`` text; ``None`` shows the exception's own text, which is only
            right for errors whose text is written for clients (your domain errors,
            ``NotFoundError``).
        retry_after: seconds for a ``Retry-After`` header, if any.
    """

    status: int
    slug: str
    title: str
    detail: str | None = None
    retry_after: int | None = None


DEFAULT_PROBLEMS: dict[type[Exception], Problem] = {
    ValidationError: Problem(
        422, "validation-error", "Invalid request", "One or more fields are invalid."
    ),
    NotFoundError: Problem(404, "not-found", "Not found"),
    ConcurrencyError: Problem(
        409,
        "concurrency-conflict",
        "Conflicting update",
        "The resource was changed by another request; reload it and try again.",
    ),
    NotAuthorizedError: Problem(
        403, "not-authorized", "Forbidden", "You are not allowed to perform this operation."
    ),
    StaleReadError: Problem(
        503,
        "stale-read",
        "Read model behind",
        "The data you asked for has not caught up with your last change yet; retry shortly.",
        retry_after=1,
    ),
    ReplicaUnavailableError: Problem(
        503,
        "replica-unavailable",
        "Read replica unavailable",
        "The data could not be read right now; retry shortly.",
        retry_after=1,
    ),
    TokenFromFutureError: Problem(
        400,
        "invalid-consistency-token",
        "Invalid consistency token",
        f"The {TOKEN_HEADER} header does not name a committed change; send back the "
        "value a previous response gave you, unmodified.",
    ),
    IdempotencyError: Problem(
        422,
        "idempotency-key-reused",
        "Idempotency key reused",
        "This Idempotency-Key was already used for a different request; use a new key.",
    ),
    CommitOutcomeUnknownError: Problem(
        503,
        "outcome-unknown",
        "Outcome unknown",
        "The change may or may not have been saved. Retry with the same Idempotency-Key: "
        "it is applied at most once.",
        retry_after=1,
    ),
    ConnectionLostError: Problem(
        503,
        "database-unavailable",
        "Database connection lost",
        "Nothing was saved; retry the request.",
        retry_after=1,
    ),
    DispatchTimeoutError: Problem(
        504,
        "timeout",
        "Timed out",
        "The request did not finish in time; its outcome is unknown. Retry with the same "
        "Idempotency-Key.",
    ),
    UnavailableError: Problem(
        503,
        "unavailable",
        "Service unavailable",
        "A database this request needs is unavailable right now; nothing was changed. "
        "Retry shortly.",
        retry_after=2,
    ),
    ReadModelMissingError: Problem(
        503,
        "read-model-missing",
        "Read model not set up",
        "A read model this request needs has not been set up yet: the projection that "
        "builds it never ran against this read database. Start its projector (or call "
        "InlineProjections.setup() at startup); the server log names the table.",
        retry_after=5,
    ),
    CqrsError: Problem(
        500,
        "internal-error",
        "Internal error",
        "The request could not be completed. Quote the correlation id when reporting this.",
    ),
}
"""The built-in mapping of cqrskit errors to problem responses (``install(problems=...)``
adds to it or overrides entries; the most derived registered class of an error wins)."""


class Cqrs:
    """The request's view of the mediator: tracks consistency tokens across requests.

    Get it with the ``CqrsDep`` dependency. ``send`` records the command's consistency
    token (returned to the client in the ``CQRS-Consistency-Token`` header); ``ask`` makes
    queries that declare their projections (``@reads(...)``) wait for the newest token this
    request knows — the one the client sent, or one produced earlier in this request.

    Attributes:
        mediator: the application's mediator.
        correlation_id: the id shared by every dispatch of this request.
        token: the newest consistency token known to this request, or ``None``.
        stale: ``True`` once a query of this request served data behind ``token``
            (queries whose policy is ``"stale"``); sets the ``CQRS-Stale`` header.
    """

    __slots__ = ("mediator", "correlation_id", "token", "stale")

    def __init__(self, mediator: Mediator, correlation_id: str, token: int | None) -> None:
        self.mediator = mediator
        self.correlation_id = correlation_id
        self.token = token
        self.stale = False

    async def send(self, command: Command[R]) -> R:
        """Send ``command`` and remember its consistency token for the response."""
        receipt = await self.mediator.send_tracked(command)
        position = receipt.token
        if position is not None and (self.token is None or position > self.token):
            self.token = position
        result: R = receipt.result
        return result

    async def ask(self, query: Query[R]) -> R:
        """Ask ``query``, first waiting for the request's token when the query declares
        the projections it reads (see :func:`cqrskit.projections.reads`)."""
        token = self.token
        if token is None or read_spec(type(query)) is None:
            return await self.mediator.ask(query)
        result = await ask_consistent(self.mediator, query, token)
        if result.stale:
            self.stale = True
        return result.value

    async def publish(self, event: Event) -> None:
        """Publish ``event`` to its in-process handlers."""
        await self.mediator.publish(event)


def _context(request: Request) -> Cqrs:
    ctx = request.scope.get(_SCOPE_KEY)
    if not isinstance(ctx, Cqrs):
        raise ConfigurationError(
            "the cqrskit FastAPI dependencies need install(app, mediator) on the application.",
            hint="call cqrskit.fastapi.install(app, mediator) when building the app.",
        )
    return ctx


def get_cqrs(request: Request) -> Cqrs:
    """FastAPI dependency: the request's :class:`Cqrs`."""
    return _context(request)


def get_mediator(request: Request) -> Mediator:
    """FastAPI dependency: the application's mediator (inside the request's scope)."""
    return _context(request).mediator


CqrsDep = Annotated[Cqrs, Depends(get_cqrs)]
"""Annotate an endpoint parameter with this to receive the request's :class:`Cqrs`."""

MediatorDep = Annotated[Mediator, Depends(get_mediator)]
"""Annotate an endpoint parameter with this to receive the :class:`Mediator`."""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            try:
                return bytes(value).decode("latin-1")
            except (TypeError, ValueError):
                return None
    return None


class _Problems:
    def __init__(self, problems: Mapping[type[Exception], Problem]) -> None:
        self._problems = dict(problems)

    @property
    def types(self) -> list[type[Exception]]:
        return list(self._problems)

    def lookup(self, exc_type: type[BaseException]) -> Problem:
        for cls in exc_type.__mro__:
            problem = self._problems.get(cls)
            if problem is not None:
                return problem
        return self._problems[CqrsError]

    def classify(self, exc: Exception) -> tuple[Problem, Exception]:
        """The problem for ``exc``; an error only the catch-all would map is looked at once
        more for an infrastructure fault (a missing read-model table, a database down)."""
        problem = self.lookup(type(exc))
        generic = (self._problems[CqrsError], self._problems.get(Exception))
        if problem not in generic:
            return problem, exc
        table = missing_table(exc)
        if table is not None:
            fault: Exception = (
                exc if isinstance(exc, ReadModelMissingError) else ReadModelMissingError(table)
            )
            return self.lookup(ReadModelMissingError), fault
        if unavailable(exc):
            return self.lookup(UnavailableError), exc
        return problem, exc

    def response(
        self,
        problem: Problem,
        detail: str,
        correlation_id: str | None,
        extra: Mapping[str, Any] | None = None,
    ) -> JSONResponse:
        body: dict[str, Any] = {
            "type": f"urn:cqrskit:problem:{problem.slug}",
            "title": problem.title,
            "status": problem.status,
            "detail": detail,
        }
        if correlation_id is not None:
            body["correlation_id"] = correlation_id
        if extra:
            body.update(extra)
        headers = {"Retry-After": str(problem.retry_after)} if problem.retry_after else None
        return JSONResponse(
            body, status_code=problem.status, headers=headers, media_type=_PROBLEM_JSON
        )

    def _log(self, request: Request, cid: str | None, problem: Problem, exc: Exception) -> None:
        where = f"{request.method} {request.url.path} (correlation id {cid})"
        if problem.slug == "read-model-missing":
            fault = exc if isinstance(exc, ReadModelMissingError) else None
            table = fault.table if fault else missing_table(exc)
            hint = fault.hint if fault else ReadModelMissingError(str(table)).hint
            _log.error("request %s: read-model table %r does not exist: %s", where, table, hint)
        elif problem.slug == "unavailable":
            _log.error("request %s: a database is unavailable: %r", where, exc, exc_info=exc)
        elif problem.status >= 500 and not isinstance(exc, StaleReadError):
            _log.error("request %s failed: %s", where, type(exc).__name__, exc_info=exc)

    async def handle(self, request: Request, exc: Exception) -> JSONResponse:
        problem, exc = self.classify(exc)
        ctx = request.scope.get(_SCOPE_KEY)
        cid = ctx.correlation_id if isinstance(ctx, Cqrs) else None
        self._log(request, cid, problem, exc)
        if problem.detail is not None:
            detail = problem.detail
        elif isinstance(exc, CqrsError):
            detail = exc.text
        else:
            detail = str(exc)
        extra: dict[str, Any] | None = None
        if isinstance(exc, ValidationError):
            extra = {"errors": [e.as_dict() for e in exc.errors]}
        response = self.response(problem, detail, cid, extra)
        if cid is not None:
            # a handler for Exception itself runs outside the request-scope middleware
            # (Starlette answers unhandled errors last), which would not add it
            response.headers[CORRELATION_HEADER] = cid
        return response

    async def handle_request_validation(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors: list[dict[str, str]] = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                errors.append(_json_error(err, getattr(exc, "body", None)))
                continue
            loc = [str(part) for part in err.get("loc", ())]
            if loc and loc[0] in _REQUEST_PARTS and len(loc) > 1:
                loc = loc[1:]
            errors.append({"field": ".".join(loc) or "body", "message": str(err.get("msg"))})
        ctx = request.scope.get(_SCOPE_KEY)
        cid = ctx.correlation_id if isinstance(ctx, Cqrs) else None
        problem = self.lookup(ValidationError)
        return self.response(problem, problem.detail or "invalid request", cid, {"errors": errors})


def _json_error(err: Mapping[str, Any], document: object) -> dict[str, str]:
    """A malformed JSON body: FastAPI gives a character offset; say line and column."""
    loc = list(err.get("loc", ()))
    reason = str((err.get("ctx") or {}).get("error") or "invalid JSON")
    offset = loc[-1] if loc and isinstance(loc[-1], int) else None
    if isinstance(document, bytes):
        document = document.decode("utf-8", "replace")
    if offset is None or not isinstance(document, str):
        return {"field": "body", "message": f"the body is not valid JSON: {reason}"}
    line = document.count("\n", 0, offset) + 1
    column = offset - (document.rfind("\n", 0, offset) + 1) + 1
    return {
        "field": "body",
        "message": f"the body is not valid JSON: {reason} at line {line}, column {column}",
    }


class _Holder:
    """The mediator the middleware serves: given at install time, or set by the lifespan."""

    __slots__ = ("mediator", "lifespan")

    def __init__(self, mediator: Mediator | None, lifespan: bool) -> None:
        self.mediator = mediator
        self.lifespan = lifespan


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once a streamed body passes the limit."""


class _RequestScopeMiddleware:
    """Pure ASGI middleware: body limit, correlation id, token header, the mediator's scope."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        holder: _Holder,
        problems: _Problems,
        max_body_size: int | None,
    ) -> None:
        self.app = app
        self.holder = holder
        self.problems = problems
        self.max_body_size = max_body_size
        self._correlation = CORRELATION_HEADER.lower().encode("latin-1")
        self._token = TOKEN_HEADER.lower().encode("latin-1")

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, problem: Problem, detail: str, cid: str
    ) -> None:
        response = self.problems.response(problem, detail, cid)
        response.headers[CORRELATION_HEADER] = cid
        await response(scope, receive, send)

    def _too_large(self, cid: str) -> JSONResponse:
        limit = self.max_body_size
        response = self.problems.response(
            _TOO_LARGE, f"The request body is larger than the limit of {limit} bytes.", cid
        )
        response.headers[CORRELATION_HEADER] = cid
        response.headers["Connection"] = "close"
        return response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cid = _header(scope, self._correlation)
        if cid is None or not _CORRELATION_ID.fullmatch(cid):
            cid = uuid.uuid4().hex
        mediator = self.holder.mediator
        if mediator is None:
            await self._answer(scope, receive, send, _NOT_READY, _NOT_READY.detail or "", cid)
            return
        limit = self.max_body_size
        if limit is not None:
            length = _header(scope, b"content-length")
            if length is not None and length.strip().isdigit() and int(length) > limit:
                await self._too_large(cid)(scope, receive, send)
                return
            receive = _limited(receive, limit)
        raw_token = _header(scope, self._token)
        token: int | None = None
        if raw_token is not None and raw_token.strip():
            if not _TOKEN.fullmatch(raw_token.strip()):
                await self._answer(
                    scope,
                    receive,
                    send,
                    self.problems.lookup(TokenFromFutureError),
                    f"The {TOKEN_HEADER} header must be a non-negative integer as returned by "
                    "a previous response.",
                    cid,
                )
                return
            token = int(raw_token.strip())
        ctx = Cqrs(mediator, cid, token)
        scope[_SCOPE_KEY] = ctx
        started = False
        replaced = False

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            nonlocal started, replaced
            if replaced:
                return  # the app's own answer to a body that was cut off: 413 went instead
            if message["type"] == "http.response.start":
                if getattr(receive, "exceeded", False):
                    # FastAPI turns any error while reading the body into its own 400
                    replaced = started = True
                    await self._too_large(cid)(scope, receive, send)
                    return
                started = True
                headers = list(message.get("headers", ()))
                if not any(name == self._correlation for name, _ in headers):
                    headers.append((self._correlation, cid.encode("latin-1")))
                if ctx.token is not None:
                    headers.append((self._token, str(ctx.token).encode("latin-1")))
                if ctx.stale:
                    headers.append((STALE_HEADER.lower().encode("latin-1"), b"true"))
                message["headers"] = headers
            await send(message)

        try:
            async with mediator.scope(metadata=Metadata(correlation_id=cid)):
                await self.app(scope, receive, send_with_headers)
        except _BodyTooLarge:
            if started:
                raise
            await self._too_large(cid)(scope, receive, send)


class _LimitedReceive:
    """``receive`` that counts body bytes and raises once they pass the limit."""

    __slots__ = ("receive", "limit", "seen", "exceeded")

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.seen = 0
        self.exceeded = False

    async def __call__(self) -> MutableMapping[str, Any]:
        if self.exceeded:
            raise _BodyTooLarge
        message = await self.receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                self.exceeded = True
                raise _BodyTooLarge
        return message


def _limited(receive: Receive, limit: int) -> Receive:
    return _LimitedReceive(receive, limit)


_TOO_LARGE = Problem(413, "request-too-large", "Request body too large")
_NOT_READY = Problem(
    503,
    "not-ready",
    "Not ready",
    "The service is starting or stopping; retry shortly.",
    retry_after=1,
)

# raw driver and OS errors that may mean a database is unavailable (classified per error;
# the others become the generic 500 problem); registered so Starlette's inner exception
# layer answers them, with the correlation id, instead of its plain-text 500
_RAW_FAULTS: tuple[type[Exception], ...] = (OSError, sqlite3.Error)


def _driver_faults() -> list[type[Exception]]:
    import sys

    found: list[type[Exception]] = []
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is not None:
        for name in ("PostgresError", "InterfaceError", "InternalClientError"):
            cls = getattr(asyncpg, name, None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                found.append(cls)
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    if sqlalchemy_exc is not None:
        cls = getattr(sqlalchemy_exc, "SQLAlchemyError", None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            found.append(cls)
    return found


def _chain_lifespan(app: FastAPI, services: Services, holder: _Holder) -> None:
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with services(app_) as mediator:
            if not isinstance(mediator, Mediator):
                raise ConfigurationError(
                    f"the services given to install() yielded {type(mediator).__name__}, "
                    "not a Mediator.",
                    hint="end the services context manager with `yield mediator`.",
                )
            holder.mediator = mediator
            app.state.cqrskit_mediator = mediator
            try:
                async with inner(app_) as state:
                    yield state
            finally:
                holder.mediator = None  # stopping: new requests get 503 not-ready

    app.router.lifespan_context = lifespan


def install(
    app: FastAPI,
    mediator: Mediator | Services,
    *,
    problems: Mapping[type[Exception], Problem] | None = None,
    request_validation: bool = True,
    max_body_size: int | None = DEFAULT_MAX_BODY_SIZE,
) -> None:
    """Wire cqrskit into ``app``: dependencies, per-request scope, error mapping, limits.

    Args:
        app: the FastAPI application (call when building it, before it starts serving).
        mediator: the application's mediator, or — the recommended shape — its services:
            a function taking the app and returning an async context manager that opens
            stores and read databases, starts in-process projectors and yields the
            mediator (an ``@asynccontextmanager``). It runs in the app's lifespan, around
            any lifespan the app has: entered at server startup, left at shutdown (SIGTERM,
            SIGINT), when projectors finish their batch and release their leases and
            stores close. Requests that arrive before startup finished or after shutdown
            began get 503 ``not-ready``.
        problems: extra or overriding exception type → :class:`Problem` mappings (e.g. your
            domain errors); the most derived registered class of an exception wins.
            Map ``Exception`` to change the catch-all 500.
        request_validation: also render FastAPI's own request-validation errors as
            problem+json 422 with the same ``errors`` list (default ``True``).
        max_body_size: the largest request body accepted, in bytes (default 1 MiB); a larger
            one is answered 413 before it is read in full. ``None`` turns the limit off.

    Raises:
        ConfigurationError: ``install`` was already called on ``app``, the app already
            started (``install`` called in its lifespan), or ``mediator`` is neither a
            Mediator nor a callable.
    """
    if app.middleware_stack is not None:
        # Starlette builds the middleware stack on the app's first call (the lifespan's
        # startup): it would refuse our middleware with a RuntimeError that does not say
        # what to do instead
        raise ConfigurationError(
            "cqrskit.fastapi.install() was called after the application started (inside "
            "its lifespan?): middleware can only be added before.",
            hint="call install(app, services) when building the app; services(app) opens "
            "the stores at startup and yields the mediator (docs/fastapi.md).",
        )
    if getattr(app.state, "cqrskit_installed", False):
        raise ConfigurationError(
            "cqrskit.fastapi.install() was called twice on the same application.",
            hint="install one mediator per application, once, when building it.",
        )
    if max_body_size is not None and max_body_size < 0:
        raise ConfigurationError(f"max_body_size must be >= 0 or None, not {max_body_size}.")
    if isinstance(mediator, Mediator):
        holder = _Holder(mediator, lifespan=False)
        app.state.cqrskit_mediator = mediator
    elif callable(mediator):
        holder = _Holder(None, lifespan=True)
        _chain_lifespan(app, mediator, holder)
    else:
        raise ConfigurationError(
            f"install() needs a Mediator or a services function, not {type(mediator).__name__}.",
            hint="pass the mediator, or an @asynccontextmanager function that yields it.",
        )
    app.state.cqrskit_installed = True
    generic = Problem(
        500,
        "internal-error",
        "Internal error",
        "The request could not be completed. Quote the correlation id when reporting this.",
    )
    table = _Problems({Exception: generic, **DEFAULT_PROBLEMS, **(problems or {})})
    app.add_middleware(
        _RequestScopeMiddleware, holder=holder, problems=table, max_body_size=max_body_size
    )
    for exc_type in [*table.types, *_RAW_FAULTS, *_driver_faults()]:
        app.add_exception_handler(exc_type, table.handle)
    if request_validation:
        app.add_exception_handler(RequestValidationError, table.handle_request_validation)
