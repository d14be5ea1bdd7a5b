"""FastAPI in production: services in the lifespan, body limit, infrastructure faults as
503, a read database never set up, malformed JSON, and no text/plain 500."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from cqrskit import (
    Command,
    ConfigurationError,
    Dependencies,
    Mediator,
    PersistenceError,
    Query,
    Registry,
)
from cqrskit.fastapi import CqrsDep, install
from cqrskit.projections import ReadSession
from cqrskit.sqlite import SqliteEventStore, SqliteReadDatabase

PROBLEM = "application/problem+json"


@dataclass(frozen=True)
class Ping(Command[str]):
    text: str


@dataclass(frozen=True)
class Fail(Command[None]):
    how: str


@dataclass(frozen=True)
class Balance(Query[int]):
    account: str


registry = Registry()


@registry.handler
async def ping(cmd: Ping) -> str:
    return cmd.text


@registry.handler
async def fail(cmd: Fail) -> None:
    if cmd.how == "refused":
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        except ConnectionRefusedError as exc:
            raise PersistenceError("could not reach the database") from exc
    if cmd.how == "raw-oserror":
        raise OSError(errno.EHOSTUNREACH, "No route to host")
    if cmd.how == "ended-session":  # what asyncpg raises on a session the server ended
        import asyncpg

        raise asyncpg.InternalClientError(
            "cannot switch to state 15; another operation (2) is in progress"
        )
    if cmd.how == "bug":
        raise KeyError("a bug with internal text")
    raise PersistenceError("a constraint said no")  # not infrastructure: a plain 500


@registry.handler
async def balance(q: Balance, session: ReadSession) -> int:
    row = await session.fetchone("SELECT total FROM balances WHERE account = ?", q.account)
    return int(row[0]) if row else 0


class Body(BaseModel):
    text: str


def make(read_db: object = None, store: SqliteEventStore | None = None) -> Mediator:
    """A mediator over ``registry``; query handlers read ``read_db`` (default: an empty
    in-memory one)."""
    deps = Dependencies()
    db = read_db if read_db is not None else SqliteReadDatabase(":memory:")
    deps.scoped(ReadSession, db.session)  # type: ignore[attr-defined]
    if store is None:
        return Mediator(registry, resolver=deps)
    return Mediator(registry, behaviors=[store.transaction()], resolver=[store.resolver(), deps])


def build(mediator: object, **options: object) -> FastAPI:
    app = FastAPI()
    install(app, mediator, **options)  # type: ignore[arg-type]

    @app.post("/ping")
    async def post_ping(body: Body, cqrs: CqrsDep) -> dict[str, str]:
        return {"echo": await cqrs.send(Ping(body.text))}

    @app.post("/fail/{how}")
    async def post_fail(how: str, cqrs: CqrsDep) -> None:
        await cqrs.send(Fail(how))

    @app.get("/balance/{account}")
    async def get_balance(account: str, cqrs: CqrsDep) -> int:
        return await cqrs.ask(Balance(account))

    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://app")


# -- services in the lifespan ----------------------------------------------------------


async def test_services_open_in_the_lifespan_around_the_apps_own(tmp_path: Path) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def services(app: FastAPI) -> AsyncIterator[Mediator]:
        async with SqliteEventStore(tmp_path / "w.db") as store:
            events.append("services open")
            yield make(store=store)
            events.append("services close")

    @asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[None]:
        events.append("app start")
        yield
        events.append("app stop")

    app = FastAPI(lifespan=own)
    install(app, services)

    @app.post("/ping")
    async def post_ping(body: Body, cqrs: CqrsDep) -> dict[str, str]:
        return {"echo": await cqrs.send(Ping(body.text))}

    async with client(app) as c:
        r = await c.post("/ping", json={"text": "early"})
        assert (r.status_code, r.headers["content-type"]) == (503, PROBLEM)
        assert r.json()["type"] == "urn:cqrskit:problem:not-ready"
        assert r.headers["Retry-After"] == "1"
        async with app.router.lifespan_context(app):
            assert isinstance(app.state.cqrskit_mediator, Mediator)
            r = await c.post("/ping", json={"text": "hi"})
            assert (r.status_code, r.json()) == (200, {"echo": "hi"})
        r = await c.post("/ping", json={"text": "late"})
        assert r.status_code == 503
    assert events == ["services open", "app start", "app stop", "services close"]


async def test_services_must_yield_a_mediator() -> None:
    @asynccontextmanager
    async def services(app: FastAPI) -> AsyncIterator[object]:
        yield "not a mediator"

    app = FastAPI()
    install(app, services)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="yielded str, not a Mediator"):
        async with app.router.lifespan_context(app):
            pass


async def test_install_inside_a_lifespan_says_what_to_do_instead() -> None:
    """The pattern users tried first: open the store in the lifespan, install there."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install(app, make())
        yield

    app = FastAPI(lifespan=lifespan)
    sent: list[dict[str, object]] = []
    incoming = iter([{"type": "lifespan.startup"}])

    async def receive() -> dict[str, object]:
        return next(incoming)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    with pytest.raises(ConfigurationError, match="after the application started") as caught:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert "install(app, services)" in (caught.value.hint or "")
    assert sent[-1]["type"] == "lifespan.startup.failed"


def test_install_refuses_something_else() -> None:
    with pytest.raises(Exception, match="needs a Mediator or a services function"):
        install(FastAPI(), 42)  # type: ignore[arg-type]


async def test_services_under_a_real_uvicorn_server(tmp_path: Path) -> None:
    """Starlette refuses middleware once an app started; install() adds it at build time,
    so a normal lifespan under a real server works (the old failure mode)."""
    opened: list[SqliteEventStore] = []

    @asynccontextmanager
    async def services(app: FastAPI) -> AsyncIterator[Mediator]:
        async with SqliteEventStore(tmp_path / "w.db") as store:
            opened.append(store)
            yield make(store=store)

    app = build(services)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for _ in range(200):  # bounded readiness poll on a condition
                if server.started or serving.done():
                    break
                await asyncio.wait({serving}, timeout=0.05)
            assert server.started
            r = await c.post("/ping", json={"text": "served"})
            assert r.json() == {"echo": "served"}
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 20)
        sock.close()
    assert serving.exception() is None
    [store] = opened
    with pytest.raises(Exception, match="closed"):
        store._writer.execute("SELECT 1")  # the lifespan closed the store


# -- request body limit ----------------------------------------------------------------


async def test_a_declared_oversized_body_is_refused_before_reading(tmp_path: Path) -> None:
    app = build(make(), max_body_size=1000)
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield b"x" * 1000

    async with client(app) as c:
        r = await c.post(
            "/ping",
            content=body(),
            headers={"content-type": "application/json", "content-length": "100000"},
        )
    assert (r.status_code, r.headers["content-type"]) == (413, PROBLEM)
    assert r.json()["type"] == "urn:cqrskit:problem:request-too-large"
    assert "1000 bytes" in r.json()["detail"]
    assert r.headers["X-Correlation-ID"]
    assert pulled <= 1  # answered from Content-Length, the body was not read


async def test_a_streamed_oversized_body_is_cut_off(tmp_path: Path) -> None:
    app = build(make(), max_body_size=10_000)
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(1000):
            pulled += 1
            yield b"x" * 1000

    async with client(app) as c:
        r = await c.post("/ping", content=body(), headers={"content-type": "application/json"})
    assert (r.status_code, r.headers["content-type"]) == (413, PROBLEM)
    assert pulled < 100  # stopped just past the limit, not after 1 MB


async def test_bodies_within_the_limit_and_no_limit(tmp_path: Path) -> None:
    small = build(make(), max_body_size=100)
    unlimited = build(make(), max_body_size=None)
    text = "y" * 5000
    async with client(small) as c:
        assert (await c.post("/ping", json={"text": "ok"})).status_code == 200
        assert (await c.post("/ping", json={"text": text})).status_code == 413
    async with client(unlimited) as c:
        assert (await c.post("/ping", json={"text": text})).json() == {"echo": text}


async def test_the_default_limit_is_one_mebibyte() -> None:
    app = build(make())
    async with client(app) as c:
        ok = await c.post("/ping", json={"text": "z" * 1_000_000})
        big = await c.post("/ping", json={"text": "z" * 1_100_000})
    assert (ok.status_code, big.status_code) == (200, 413)


async def test_an_oversized_body_over_a_real_socket_is_answered_early() -> None:
    """300 MB announced: uvicorn answers 413 while the client has sent almost nothing."""
    app = build(make(), max_body_size=1 << 20)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(200):
            if server.started or serving.done():
                break
            await asyncio.wait({serving}, timeout=0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /ping HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 300000000\r\n\r\n" + b"x" * 4096
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 413"), head
        assert b"application/problem+json" in head
        writer.close()

        # chunked, no length announced: cut off once past the limit
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /ping HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        sent = 0
        answer = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
        for _ in range(300):  # at most ~19 MB; the answer must come long before
            if answer.done():
                break
            writer.write(chunk)
            sent += 0x10000
            await writer.drain()
            await asyncio.wait({answer}, timeout=0.01)
        head = await asyncio.wait_for(answer, 10)
        assert head.startswith(b"HTTP/1.1 413"), head
        assert sent < 8 << 20, sent
        writer.close()
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 20)
        sock.close()


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(Exception, match="max_body_size"):
        install(FastAPI(), make(), max_body_size=-1)


# -- infrastructure faults, missing read models, malformed JSON ------------------------


async def test_an_unreachable_database_is_503_with_retry_after() -> None:
    async with client(build(make())) as c:
        for how in ("refused", "raw-oserror", "ended-session"):
            r = await c.post(f"/fail/{how}")
            assert (r.status_code, r.headers["content-type"]) == (503, PROBLEM), how
            assert r.json()["type"] == "urn:cqrskit:problem:unavailable"
            assert r.headers["Retry-After"] == "2"
            assert "refused" not in r.json()["detail"]  # nothing internal


async def test_other_errors_stay_500_and_are_problems_too() -> None:
    async with client(build(make())) as c:
        r = await c.post("/fail/constraint")
        assert (r.status_code, r.json()["type"]) == (500, "urn:cqrskit:problem:internal-error")
        r = await c.post("/fail/bug")
        assert (r.status_code, r.headers["content-type"]) == (500, PROBLEM)
        assert "internal text" not in r.text
        assert r.headers["X-Correlation-ID"] == r.json()["correlation_id"]


async def test_a_real_refused_connection_is_503() -> None:
    pytest.importorskip("asyncpg")
    from cqrskit.postgres import PostgresReadDatabase

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: a real ECONNREFUSED
    read_db = PostgresReadDatabase(f"postgresql://postgres@127.0.0.1:{port}/none")
    async with client(build(make(read_db))) as c:
        r = await c.get("/balance/a")
    assert (r.status_code, r.json()["type"]) == (503, "urn:cqrskit:problem:unavailable")


async def test_a_read_database_never_set_up_names_the_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    read_db = SqliteReadDatabase(str(tmp_path / "empty.db"))
    caplog.set_level(logging.ERROR, "cqrskit.fastapi")
    async with client(build(make(read_db))) as c:
        r = await c.get("/balance/a")
    await read_db.close()
    assert (r.status_code, r.headers["content-type"]) == (503, PROBLEM)
    assert r.json()["type"] == "urn:cqrskit:problem:read-model-missing"
    assert "projector" in r.json()["detail"]
    assert "balances" not in r.json()["detail"]
    logged = caplog.text
    assert "'balances' does not exist" in logged
    assert "cqrskit projections run" in logged
    assert "InlineProjections.setup()" in logged


async def test_malformed_json_says_line_and_column() -> None:
    async with client(build(make())) as c:
        r = await c.post(
            "/ping",
            content=b'{\n  "text": ,\n}',
            headers={"content-type": "application/json"},
        )
    assert r.status_code == 422
    [error] = r.json()["errors"]
    assert error["field"] == "body"
    assert "line 2, column 11" in error["message"]
    assert "not valid JSON" in error["message"]
