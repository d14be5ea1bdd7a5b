"""End to end through a real uvicorn server: read your own writes across two HTTP requests
with an asynchronous projection."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import uvicorn
from tests.support.notes_app import Harness

from cqrskit.fastapi import TOKEN_HEADER


async def test_read_your_writes_across_requests_through_uvicorn(tmp_path: Path) -> None:
    harness = Harness(tmp_path, lifespan=True)
    # bind and listen first: the port is ours before uvicorn starts, and a connection made
    # before uvicorn accepts waits in the backlog instead of being refused
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    config = uvicorn.Config(harness.app, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(100):  # bounded readiness poll on a condition: /health answers
                if serving.done():
                    serving.result()  # startup failed: raise its error
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.wait({serving}, timeout=0.05)
            assert server.started

            harness.release.clear()  # hold the async projection so it lags behind
            written = await client.post("/notes/e2e", json={"text": "over the wire"})
            assert written.status_code == 200, written.text
            token = written.headers[TOKEN_HEADER]
            assert int(token) >= 1

            lagging = await client.get("/notes/e2e")
            assert lagging.json() == []  # the projection really is asynchronous

            reading = asyncio.create_task(client.get("/notes/e2e", headers={TOKEN_HEADER: token}))
            harness.release.set()
            fresh = await asyncio.wait_for(reading, 10)
            assert fresh.status_code == 200, fresh.text
            assert fresh.json() == ["over the wire"]
    finally:
        harness.release.set()
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        sock.close()
        await harness.read_db.close()
        harness.store.close()
    assert serving.exception() is None
