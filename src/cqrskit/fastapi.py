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
      ConnectionLostError    503  with Retry-After: the database connection was lost, nothing saved
      TokenFromFutureError   400  (and a malformed token header)
      any other CqrsError    500  generic text only: nothing internal reaches the client

  Your own exception types are mapped with ``install(..., problems={MyError: Problem(...)})``.

Usage::

    app = FastAPI()
    install(app, mediator)

    @app.post("/accounts")
    async def open_account(body: OpenBody, cqrs: CqrsDep) -> dict[str, str]:
        return {"id": await cqrs.send(OpenAccount(body.owner))}

Needs the ``fastapi`` extra (``pip install 'cqrskit[fastapi]'``).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

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
    StaleReadError,
    TokenFromFutureError,
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
    "DEFAULT_PROBLEMS",
    "STALE_HEADER",
    "TOKEN_HEADER",
    "Cqrs",
    "CqrsDep",
    "MediatorDep",
    "Problem",
    "get_cqrs",
    "get_mediator",
    "install",
]

R = TypeVar("R")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_log = logging.getLogger("cqrskit.fastapi")

CORRELATION_HEADER = "X-Correlation-ID"
"""The request/response header carrying the correlation id."""
TOKEN_HEADER = "CQRS-Consistency-Token"
"""The request/response header carrying the consistency token."""
STALE_HEADER = "CQRS-Stale"
"""Response header set to ``true`` when a query served data behind the request's token."""

_SCOPE_KEY = "cqrskit"
_CORRELATION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_TOKEN = re.compile(r"^[0-9]{1,19}$")
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

    def lookup(self, exc_type: type[Exception]) -> Problem:
        for cls in exc_type.__mro__:
            problem = self._problems.get(cls)
            if problem is not None:
                return problem
        return self._problems[CqrsError]

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

    async def handle(self, request: Request, exc: Exception) -> JSONResponse:
        problem = self.lookup(type(exc))
        ctx = request.scope.get(_SCOPE_KEY)
        cid = ctx.correlation_id if isinstance(ctx, Cqrs) else None
        if problem.status >= 500 and not isinstance(exc, StaleReadError):
            _log.error(
                "request %s %s failed (correlation id %s): %s",
                request.method,
                request.url.path,
                cid,
                type(exc).__name__,
                exc_info=exc,
            )
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
            loc = [str(part) for part in err.get("loc", ())]
            if loc and loc[0] in _REQUEST_PARTS and len(loc) > 1:
                loc = loc[1:]
            errors.append({"field": ".".join(loc) or "body", "message": str(err.get("msg"))})
        ctx = request.scope.get(_SCOPE_KEY)
        cid = ctx.correlation_id if isinstance(ctx, Cqrs) else None
        problem = self.lookup(ValidationError)
        return self.response(problem, problem.detail or "invalid request", cid, {"errors": errors})


class _RequestScopeMiddleware:
    """Pure ASGI middleware: correlation id, token header, and the mediator's scope."""

    def __init__(self, app: ASGIApp, *, mediator: Mediator, problems: _Problems) -> None:
        self.app = app
        self.mediator = mediator
        self.problems = problems
        self._correlation = CORRELATION_HEADER.lower().encode("latin-1")
        self._token = TOKEN_HEADER.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cid = _header(scope, self._correlation)
        if cid is None or not _CORRELATION_ID.match(cid):
            cid = uuid.uuid4().hex
        raw_token = _header(scope, self._token)
        token: int | None = None
        if raw_token is not None and raw_token.strip():
            if not _TOKEN.match(raw_token.strip()):
                problem = self.problems.lookup(TokenFromFutureError)
                response = self.problems.response(
                    problem,
                    f"The {TOKEN_HEADER} header must be a non-negative integer as returned by "
                    "a previous response.",
                    cid,
                )
                response.headers[CORRELATION_HEADER] = cid
                await response(scope, receive, send)
                return
            token = int(raw_token.strip())
        ctx = Cqrs(self.mediator, cid, token)
        scope[_SCOPE_KEY] = ctx

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name == self._correlation for name, _ in headers):
                    headers.append((self._correlation, cid.encode("latin-1")))
                if ctx.token is not None:
                    headers.append((self._token, str(ctx.token).encode("latin-1")))
                if ctx.stale:
                    headers.append((STALE_HEADER.lower().encode("latin-1"), b"true"))
                message["headers"] = headers
            await send(message)

        async with self.mediator.scope(metadata=Metadata(correlation_id=cid)):
            await self.app(scope, receive, send_with_headers)


def install(
    app: FastAPI,
    mediator: Mediator,
    *,
    problems: Mapping[type[Exception], Problem] | None = None,
    request_validation: bool = True,
) -> None:
    """Wire ``mediator`` into ``app``: dependencies, per-request scope, error mapping.

    Args:
        app: the FastAPI application (call before it starts serving).
        mediator: the application's mediator.
        problems: extra or overriding exception type → :class:`Problem` mappings (e.g. your
            domain errors); the most derived registered class of an exception wins.
        request_validation: also render FastAPI's own request-validation errors as
            problem+json 422 with the same ``errors`` list (default ``True``).

    Raises:
        ConfigurationError: ``install`` was already called on ``app``.
    """
    if getattr(app.state, "cqrskit_mediator", None) is not None:
        raise ConfigurationError(
            "cqrskit.fastapi.install() was called twice on the same application.",
            hint="install one mediator per application, once, when building it.",
        )
    table = _Problems({**DEFAULT_PROBLEMS, **(problems or {})})
    app.state.cqrskit_mediator = mediator
    app.add_middleware(_RequestScopeMiddleware, mediator=mediator, problems=table)
    for exc_type in table.types:
        app.add_exception_handler(exc_type, table.handle)
    if request_validation:
        app.add_exception_handler(RequestValidationError, table.handle_request_validation)
