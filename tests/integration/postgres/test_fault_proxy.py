"""The fault proxy itself: forwarding, latency, blackhole, reset, and the COMMIT modes."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import asyncpg
import pytest
from tests.support.proxy import FaultProxy, Mode, _FrontendParser

pytestmark = pytest.mark.postgres


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", 5432)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def test_forward_and_latency(postgres_dsn: str, proxy: FaultProxy) -> None:
    conn = await asyncpg.connect(proxy.dsn(postgres_dsn))
    try:
        assert await conn.fetchval("SELECT 41 + 1") == 42
        proxy.latency = 0.05
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await conn.fetchval("SELECT 1") == 1
        assert loop.time() - started >= 0.1  # one chunk each way
        proxy.latency = 0.0
    finally:
        await conn.close()
    assert proxy.connections == 1


async def test_blackhole_then_forward(postgres_dsn: str, proxy: FaultProxy) -> None:
    conn = await asyncpg.connect(proxy.dsn(postgres_dsn))
    try:
        proxy.mode = Mode.BLACKHOLE
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT 1", timeout=0.3)
    finally:
        conn.terminate()
    proxy.mode = Mode.FORWARD
    again = await asyncpg.connect(proxy.dsn(postgres_dsn))
    try:
        assert await again.fetchval("SELECT 2") == 2
    finally:
        await again.close()


async def test_reset_aborts_open_and_new_connections(postgres_dsn: str, proxy: FaultProxy) -> None:
    conn = await asyncpg.connect(proxy.dsn(postgres_dsn))
    proxy.mode = Mode.RESET
    with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1", timeout=5)
    with pytest.raises((asyncpg.PostgresConnectionError, OSError, asyncpg.InterfaceError)):
        await asyncpg.connect(proxy.dsn(postgres_dsn), timeout=5)
    proxy.mode = Mode.FORWARD
    ok = await asyncpg.connect(proxy.dsn(postgres_dsn))
    try:
        assert await ok.fetchval("SELECT 3") == 3
    finally:
        await ok.close()


async def test_drop_commit_reply_commits_on_the_server(
    postgres_dsn: str, pg_schema: str, proxy: FaultProxy
) -> None:
    direct = await asyncpg.connect(postgres_dsn)
    try:
        await direct.execute(f'CREATE SCHEMA "{pg_schema}"; CREATE TABLE "{pg_schema}".t (x int)')
        conn = await asyncpg.connect(proxy.dsn(postgres_dsn))
        await conn.execute("BEGIN")
        await conn.execute(f'INSERT INTO "{pg_schema}".t VALUES (1)')
        proxy.mode = Mode.DROP_COMMIT_REPLY
        with pytest.raises(asyncpg.PostgresConnectionError):
            await conn.execute("COMMIT")
        await proxy.wait_fault(1)
        assert await direct.fetchval(f'SELECT count(*) FROM "{pg_schema}".t') == 1
    finally:
        await direct.close()


def test_parser_finds_commit_in_simple_and_extended_messages() -> None:
    parser = _FrontendParser()
    startup = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"  # SSLRequest
    params = b"\x00\x03\x00\x00user\x00u\x00\x00"
    startup += len(params + b"1234").to_bytes(4, "big") + params
    query = b"INSERT INTO t VALUES (1); commit\x00"
    q = b"Q" + (len(query) + 4).to_bytes(4, "big") + query
    parse_body = b"\x00COMMIT\x00\x00\x00"
    p = b"P" + (len(parse_body) + 4).to_bytes(4, "big") + parse_body
    other = b"SELECT committed FROM t\x00"
    o = b"Q" + (len(other) + 4).to_bytes(4, "big") + other
    data = startup + q + p + o
    got: list[tuple[bytes, bool]] = []
    for i in range(0, len(data), 7):  # arbitrary chunking
        got.extend(parser.feed(data[i : i + 7]))
    assert [flag for _, flag in got] == [False, False, True, True, False]
    assert b"".join(m for m, _ in got) == data


def test_parser_finds_commit_whatever_the_length_byte() -> None:
    """A Query of 80 bytes has b"P" as its length's last byte: still a COMMIT."""
    body = b"COMMIT; BEGIN; SELECT 1".ljust(75) + b"\x00"
    q = b"Q" + (len(body) + 4).to_bytes(4, "big") + body
    assert q[4:5] == b"P"
    parser = _FrontendParser()
    parser.feed(b"\x00\x00\x00\x08\x00\x03\x00\x00")  # a startup message
    assert parser.feed(q) == [(q, True)]


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


async def test_drop_commit_reply_cuts_the_link_when_the_commit_fails() -> None:
    # a fake server: the round trip "INSERT ...; COMMIT" fails at the INSERT, so no
    # COMMIT tag ever comes; the ReadyForQuery after the error ends the wait
    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)  # the startup message
        writer.write(_msg(b"R", struct.pack("!I", 0)) + _msg(b"Z", b"I"))
        await writer.drain()
        await reader.read(1 << 16)  # the query
        error = b"SERROR\x00C23505\x00Mduplicate key\x00\x00"
        writer.write(_msg(b"E", error) + _msg(b"Z", b"E"))
        await writer.drain()
        await reader.read(1 << 16)  # until the proxy cuts the link
        writer.close()

    fake = await asyncio.start_server(server, "127.0.0.1", 0)
    port = fake.sockets[0].getsockname()[1]
    proxy = FaultProxy("127.0.0.1", port)
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        params = b"\x00\x03\x00\x00user\x00u\x00\x00"
        writer.write(struct.pack("!I", len(params) + 4) + params)
        await writer.drain()
        assert (await asyncio.wait_for(reader.read(100), 5)).endswith(b"Z\x00\x00\x00\x05I")
        proxy.mode = Mode.DROP_COMMIT_REPLY
        writer.write(_msg(b"Q", b"INSERT INTO t VALUES (1); COMMIT\x00"))
        await writer.drain()
        await proxy.wait_fault(1)
        try:  # cut (EOF or a reset), the error's reply not forwarded
            assert await asyncio.wait_for(reader.read(100), 5) == b""
        except ConnectionResetError:
            pass
        writer.close()
    finally:
        await proxy.close()
        fake.close()
        await fake.wait_closed()
