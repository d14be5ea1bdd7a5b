"""cqrskit.fastapi through a real ASGI app: scope, correlation ids, tokens, problem+json."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from cqrskit import ConfigurationError
from cqrskit.fastapi import (
    CORRELATION_HEADER,
    STALE_HEADER,
    TOKEN_HEADER,
    MediatorDep,
    Problem,
    install,
)
from tests.support.notes_app import Harness

PROBLEM = "application/problem+json"


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    await h.start()
    yield h
    await h.stop()


@pytest.fixture
async def client(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=harness.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def problem(response: httpx.Response, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"] == f"urn:cqrskit:problem:{slug}"
    assert body["status"] == status
    assert isinstance(body["title"], str)
    assert isinstance(body["detail"], str)
    assert body["correlation_id"] == response.headers[CORRELATION_HEADER]
    return dict(body)


async def test_command_returns_token_and_echoes_correlation_id(
    client: httpx.AsyncClient, harness: Harness
) -> None:
    r = await client.post(
        "/notes/a", json={"text": "hello", "twice": True}, headers={CORRELATION_HEADER: "req-42"}
    )
    assert r.status_code == 200, r.text
    assert r.headers[CORRELATION_HEADER] == "req-42"
    events = await harness.store.read_after(0)
    assert [e.stream for e in events] == ["a", "a"]
    assert r.headers[TOKEN_HEADER] == str(events[-1].position)
    # both commands of the request share the request's correlation id, each its own cause
    assert {e.metadata["correlation_id"] for e in events} == {"req-42"}
    assert events[0].metadata["causation_id"] != events[1].metadata["causation_id"]


async def test_correlation_id_generated_when_missing_or_unsafe(
    client: httpx.AsyncClient, harness: Harness
) -> None:
    r1 = await client.post("/notes/b", json={"text": "x"})
    r2 = await client.post(
        "/notes/b", json={"text": "y"}, headers={CORRELATION_HEADER: "bad id\twith<script>"}
    )
    # a trailing line break would split a log line or a response header
    r3 = await client.post("/notes/b", json={"text": "z"}, headers={CORRELATION_HEADER: "req\n"})
    generated = [r.headers[CORRELATION_HEADER] for r in (r1, r2, r3)]
    assert all(len(g) == 32 and int(g, 16) >= 0 for g in generated)
    assert len(set(generated)) == 3
    events = await harness.store.read_after(0)
    assert [e.metadata["correlation_id"] for e in events] == generated


async def test_query_without_token_sends_no_token_header(client: httpx.AsyncClient) -> None:
    r = await client.get("/notes/nothing")
    assert r.status_code == 200
    assert r.json() == []
    assert TOKEN_HEADER not in r.headers


async def test_token_makes_a_later_request_read_its_own_write(
    client: httpx.AsyncClient, harness: Harness
) -> None:
    harness.release.clear()  # the async projection is held: the read model lags
    r = await client.post("/notes/c", json={"text": "first"})
    token = r.headers[TOKEN_HEADER]
    stale = await client.get("/notes/c")
    assert stale.json() == []  # without the token: whatever the read model has now
    pending = asyncio.create_task(client.get("/notes/c", headers={TOKEN_HEADER: token}))
    harness.release.set()
    fresh = await asyncio.wait_for(pending, 10)
    assert fresh.status_code == 200
    assert fresh.json() == ["first"]
    assert fresh.headers[TOKEN_HEADER] == token
    assert STALE_HEADER not in fresh.headers


async def test_stale_read_error_is_503_with_retry_after(
    client: httpx.AsyncClient, harness: Harness
) -> None:
    harness.release.clear()
    token = (await client.post("/notes/d", json={"text": "x"})).headers[TOKEN_HEADER]
    r = await client.get("/notes/d/now", headers={TOKEN_HEADER: token})
    body = problem(r, 503, "stale-read")
    assert r.headers["retry-after"] == "1"
    assert "notes" not in str(body["detail"])  # projection names stay internal
    harness.release.set()


async def test_stale_policy_answers_and_flags_the_response(
    client: httpx.AsyncClient, harness: Harness
) -> None:
    harness.release.clear()
    token = (await client.post("/notes/s", json={"text": "x"})).headers[TOKEN_HEADER]
    r = await client.get("/notes/s/anyway", headers={TOKEN_HEADER: token})
    assert r.status_code == 200
    assert r.json() == []
    assert r.headers[STALE_HEADER] == "true"
    harness.release.set()
    fresh = await client.get("/notes/s", headers={TOKEN_HEADER: token})
    assert fresh.json() == ["x"]
    assert STALE_HEADER not in fresh.headers


async def test_token_from_the_future_is_400(client: httpx.AsyncClient) -> None:
    await client.post("/notes/e", json={"text": "x"})
    r = await client.get("/notes/e", headers={TOKEN_HEADER: "999999"})
    problem(r, 400, "invalid-consistency-token")


@pytest.mark.parametrize("raw", ["abc", "-3", "1.5", "9" * 40])
async def test_malformed_token_is_400(client: httpx.AsyncClient, raw: str) -> None:
    r = await client.get("/notes/e", headers={TOKEN_HEADER: raw})
    body = problem(r, 400, "invalid-consistency-token")
    assert TOKEN_HEADER in str(body["detail"])


async def test_validation_error_is_422_listing_every_field(client: httpx.AsyncClient) -> None:
    r = await client.post("/notes/f", json={"text": "  ", "author": "ADA"})
    body = problem(r, 422, "validation-error")
    assert body["errors"] == [
        {"field": "text", "message": "must not be blank"},
        {"field": "author", "message": "must be lower case"},
    ]


async def test_request_body_errors_use_the_same_shape(client: httpx.AsyncClient) -> None:
    r = await client.post("/notes/f", json={"author": 3})
    body = problem(r, 422, "validation-error")
    fields = {e["field"] for e in body["errors"]}  # type: ignore[attr-defined]
    assert fields == {"text", "author"}


async def test_not_found_is_404_with_the_handlers_text(client: httpx.AsyncClient) -> None:
    r = await client.get("/lookup/zzz")
    body = problem(r, 404, "not-found")
    assert body["detail"] == "no note called 'zzz'"


async def test_concurrency_error_is_409(client: httpx.AsyncClient, harness: Harness) -> None:
    r = await client.post("/notes/g", json={"text": "x", "expected_version": 3})
    problem(r, 409, "concurrency-conflict")
    assert await harness.store.read_after(0) == []  # nothing committed


async def test_not_authorized_is_403_without_policy_details(client: httpx.AsyncClient) -> None:
    r = await client.get("/secret")
    body = problem(r, 403, "not-authorized")
    assert "policy" not in str(body).lower()
    assert "vault" not in r.text


async def test_other_cqrs_errors_are_500_without_internals(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="cqrskit.fastapi"):
        r = await client.post("/explode", headers={CORRELATION_HEADER: "boom-1"})
    problem(r, 500, "internal-error")
    for secret in ("hunter2", "postgres", "PersistenceError", "notes_app", "Traceback"):
        assert secret not in r.text
    assert any("boom-1" in rec.getMessage() for rec in caplog.records)


async def test_application_errors_are_mapped_by_problems(client: httpx.AsyncClient) -> None:
    r = await client.post("/refuse")
    body = problem(r, 429, "quota")
    assert body["detail"] == "you have used all 3 notes of your plan"


async def test_dependencies_without_install_name_the_fix() -> None:
    app = FastAPI()

    @app.get("/")
    async def root(mediator: MediatorDep) -> str:
        return "unreachable"

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        with pytest.raises(ConfigurationError, match="install"):
            await c.get("/")


def test_install_twice_is_refused(harness: Harness) -> None:
    with pytest.raises(ConfigurationError, match="twice"):
        install(harness.app, harness.mediator)


def test_missing_fastapi_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from cqrskit.errors import MissingExtraError\n"
        "try:\n"
        "    import cqrskit.fastapi\n"
        "except MissingExtraError as e:\n"
        "    print(e.extra)\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "fastapi"


@pytest.mark.parametrize(
    ("error", "status", "slug"),
    [
        ("idempotency", 422, "idempotency-key-reused"),
        ("unknown", 503, "outcome-unknown"),
        ("lost", 503, "database-unavailable"),
        ("timeout", 504, "timeout"),
    ],
)
async def test_retry_related_errors_are_mapped(error: str, status: int, slug: str) -> None:
    from cqrskit import (
        CommitOutcomeUnknownError,
        ConnectionLostError,
        DispatchTimeoutError,
        IdempotencyError,
        Mediator,
        Registry,
    )

    app = FastAPI()
    install(app, Mediator(Registry()))
    errors: dict[str, Exception] = {
        "idempotency": IdempotencyError("key k used for another command"),
        "unknown": CommitOutcomeUnknownError("connection lost during COMMIT to db-secret-host"),
        "lost": ConnectionLostError("connection to db-secret-host lost before COMMIT"),
        "timeout": DispatchTimeoutError("handler took too long"),
    }

    @app.post("/fail/{name}")
    async def fail(name: str) -> None:
        raise errors[name]

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.post(f"/fail/{error}")
    body = problem(r, status, slug)
    assert "db-secret-host" not in r.text
    assert "Idempotency-Key" in str(body["detail"]) or status == 422 or slug.startswith("data")
    if status == 503:
        assert r.headers["retry-after"] == "1"


async def test_every_error_can_be_a_problem_without_its_text() -> None:
    from cqrskit import Mediator, Registry

    app = FastAPI()
    install(
        app,
        Mediator(Registry()),
        problems={
            Exception: Problem(
                500, "internal-error", "Internal error", "An unexpected error occurred."
            )
        },
    )

    @app.post("/crash")
    async def crash() -> None:
        raise RuntimeError("password=hunter2 at db-secret-host")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.post("/crash", headers={"X-Correlation-ID": "req-42"})
    body = problem(r, 500, "internal-error")
    assert body["detail"] == "An unexpected error occurred."
    assert body["correlation_id"] == "req-42"
    assert "hunter2" not in r.text


async def test_replica_unavailable_is_503_with_retry_after_and_no_detail_leak() -> None:
    from cqrskit import Mediator, Registry, ReplicaUnavailableError

    app = FastAPI()
    install(app, Mediator(Registry()))

    @app.get("/read")
    async def read() -> None:
        raise ReplicaUnavailableError("replica eu1 at db-secret-host did not answer", replica="eu1")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.get("/read")
    body = problem(r, 503, "replica-unavailable")
    assert r.headers["retry-after"] == "1"
    assert "db-secret-host" not in r.text
    assert body["title"] == "Read replica unavailable"
