"""A switchable asyncio TCP proxy for fault tests (loopback only).

It listens on ``127.0.0.1`` on a free port, forwards bytes both ways to a target, and can be
switched at run time::

    proxy = FaultProxy("127.0.0.1", 5432)
    await proxy.start()                 # proxy.port is the port to connect to
    proxy.latency = 0.05                # add 50 ms before each forwarded chunk
    proxy.mode = Mode.BLACKHOLE         # swallow bytes both ways; connections stay open
    proxy.mode = Mode.RESET             # abort every connection (and each new one) at once
    proxy.mode = Mode.DROP_COMMIT_REPLY # forward COMMIT, drop its reply, reset the client
    proxy.mode = Mode.BLACKHOLE_COMMIT  # never forward COMMIT; reset both sides
    proxy.mode = Mode.HOLD_COMMIT_REPLY # forward COMMIT, hold its reply until released
    proxy.mode = Mode.DROP_REPLIES      # forward requests, drop every reply (lost acks)
    proxy.mode = Mode.FORWARD           # back to normal
    proxy.faults_left = 1               # a COMMIT mode for the next COMMIT only
    proxy.hold_server_close = True      # the server closed: keep the client side open
    await proxy.close()

The two COMMIT modes parse the PostgreSQL frontend protocol in the client-to-server
direction: a simple-protocol ``Query`` ('Q') or an extended-protocol ``Parse`` ('P') whose
SQL contains the keyword ``COMMIT`` (``INSERT ...; COMMIT`` sent as one query counts) is the
trigger. :attr:`FaultProxy.commit_faults` counts triggers and :meth:`FaultProxy.wait_fault`
waits (bounded) for the next one; in ``DROP_COMMIT_REPLY`` a fault is counted only once the
server has answered the COMMIT — its CommandComplete (``COMMIT``, or ``ROLLBACK`` for a
failed transaction), or the ReadyForQuery after an ErrorResponse (the COMMIT failed or an
earlier statement of its round trip did) — i.e. after the server executed it; replies to
statements sent with it, which may come first, are dropped too.

``FaultProxy(host, port, protocol="raw")`` forwards any TCP protocol (a broker's) without
parsing it; the COMMIT modes then do nothing, the others work the same. With
``ack_marker=`` (bytes that start each acknowledgement in the server's replies, e.g.
:data:`ACK_MARKERS` per broker) ``DROP_REPLIES`` also counts the acknowledgements it drops
in :attr:`FaultProxy.dropped_acks`.

With :attr:`FaultProxy.hold_server_close` on, a connection the server ends (after a
``FATAL`` error, e.g. ``pg_terminate_backend``) is forwarded up to the server's last byte,
but the client's side stays open until :attr:`FaultProxy.release_close` is set: the client
has read the server's goodbye and not yet seen the connection close (the window a server
shutdown leaves between the two). :attr:`FaultProxy.server_closed` is set at that point
and :attr:`FaultProxy.held_closes` counts such connections.

Every fault is counted in the run's fault ledger (:mod:`tests.support.faults`): a switch
into ``BLACKHOLE`` or ``RESET``, each dropped or blackholed COMMIT, each held COMMIT reply.

Everything is bounded: reads are chunked, each wait has a timeout, and :meth:`close` aborts
every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import struct

from tests.support import faults

__all__ = ["ACK_MARKERS", "FaultProxy", "Mode"]

# what starts one publish acknowledgement in a broker's reply stream: NATS delivers each
# PubAck as a MSG/HMSG to the publisher's inbox; Redis answers XADD with a bulk string (an
# entry id holds no '$'); RabbitMQ confirms with a Basic.Ack method frame (class 60, method
# 80), which may confirm several messages at once
ACK_MARKERS = {"nats": b"MSG ", "redis": b"$", "rabbitmq": b"\x00\x3c\x00\x50"}

_COMMIT = re.compile(rb"\bCOMMIT\b", re.IGNORECASE)
_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104
_CHUNK = 65536


class Mode(enum.Enum):
    """What the proxy does with traffic."""

    FORWARD = "forward"
    BLACKHOLE = "blackhole"
    RESET = "reset"
    DROP_COMMIT_REPLY = "drop_commit_reply"
    BLACKHOLE_COMMIT = "blackhole_commit"
    HOLD_COMMIT_REPLY = "hold_commit_reply"
    DROP_REPLIES = "drop_replies"


class _FrontendParser:
    """Splits the PostgreSQL client-to-server byte stream into whole messages."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._started = False  # True once the StartupMessage passed (typed messages follow)

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """Return the complete messages in ``data`` (+ earlier leftovers) with a flag telling
        whether each one carries a COMMIT."""
        self._buf += data
        out: list[tuple[bytes, bool]] = []
        for _ in range(1_000_000):
            buf = self._buf
            if not self._started:
                if len(buf) < 8:
                    break
                (length,) = struct.unpack_from("!i", buf, 0)
                if len(buf) < length:
                    break
                (code,) = struct.unpack_from("!i", buf, 4)
                if code not in (_SSL_REQUEST, _GSS_REQUEST):
                    self._started = True
                out.append((bytes(buf[:length]), False))
                del buf[:length]
                continue
            if len(buf) < 5:
                break
            (length,) = struct.unpack_from("!i", buf, 1)
            end = 1 + length
            if len(buf) < end:
                break
            msg = bytes(buf[:end])
            del buf[:end]
            # search the body only: with search(msg, 5), \b would look at the length's
            # last byte (a length of 80 is b"P", a word character, and hid a COMMIT)
            carries = msg[:1] in (b"Q", b"P") and _COMMIT.search(msg[5:]) is not None
            out.append((msg, carries))
        return out


class _Link:
    """One client connection and its upstream connection."""

    def __init__(
        self,
        proxy: FaultProxy,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        server_r: asyncio.StreamReader,
        server_w: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.client_r, self.client_w = client_r, client_w
        self.server_r, self.server_w = server_r, server_w
        self.parser = _FrontendParser()
        self.commit_sent = False  # DROP_COMMIT_REPLY armed on this link
        self.replies = bytearray()  # replies since the COMMIT went out, not yet parsed
        self.reply_error = False  # an ErrorResponse came since
        self.hold = False  # HOLD_COMMIT_REPLY armed on this link
        self.server_gone = False  # the server ended the connection; the client's side held
        self.closed = False

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        for w in (self.client_w, self.server_w):
            transport = w.transport
            if not transport.is_closing():
                transport.abort()

    async def _delay(self) -> None:
        latency = self.proxy.latency
        if latency > 0:
            # injected latency, not synchronization
            await asyncio.sleep(latency)

    async def client_to_server(self) -> None:
        proxy = self.proxy
        while not self.closed:
            data = await self.client_r.read(_CHUNK)
            if not data:
                break
            mode = proxy.mode
            if mode is Mode.RESET:
                break
            if mode is Mode.BLACKHOLE or self.server_gone:
                continue
            await self._delay()
            if proxy.protocol == "raw":
                self.server_w.write(data)
                await self.server_w.drain()
                continue
            for msg, carries_commit in self.parser.feed(data):
                if carries_commit and proxy.mode is Mode.BLACKHOLE_COMMIT:
                    proxy._fault()
                    self.abort()
                    return
                self.server_w.write(msg)
                if carries_commit and proxy.mode is Mode.DROP_COMMIT_REPLY:
                    self.commit_sent = True
                if carries_commit and proxy.mode is Mode.HOLD_COMMIT_REPLY:
                    if not self.hold:
                        faults.record("proxy")
                    self.hold = True
                    proxy.commit_seen.set()
            await self.server_w.drain()
        self.abort()

    def _commit_answered(self, data: bytes) -> bool:
        """Feed replies that came after the COMMIT went out; ``True`` once the server has
        answered the COMMIT: its CommandComplete (``COMMIT``, or ``ROLLBACK`` for a failed
        transaction), or the ReadyForQuery after an ErrorResponse (an earlier statement
        of the round trip failed and the COMMIT was skipped, or the COMMIT itself
        failed). The server is between messages when the COMMIT goes out (the client
        waited for the previous answer), so parsing starts at a message boundary."""
        buf = self.replies
        buf += data
        pos = 0
        while len(buf) - pos >= 5:
            kind = buf[pos]
            (length,) = struct.unpack_from("!i", buf, pos + 1)
            if length < 4:  # not a message boundary after all: cut now, as before
                return True
            end = pos + 1 + length
            if len(buf) < end:
                break
            if kind == ord("C") and bytes(buf[pos + 5 : end]).startswith((b"COMMIT", b"ROLLBACK")):
                return True
            if kind == ord("E"):
                self.reply_error = True
            elif kind == ord("Z") and self.reply_error:
                return True
            pos = end
        del buf[:pos]
        return False

    async def server_to_client(self) -> None:
        proxy = self.proxy
        while not self.closed:
            data = await self.server_r.read(_CHUNK)
            if not data:
                if proxy.hold_server_close:
                    self.server_gone = True
                    faults.record("proxy")
                    proxy.held_closes += 1
                    proxy.server_closed.set()
                    await proxy.release_close.wait()  # released by the test, bounded there
                break
            if self.commit_sent:
                # lose every reply from here on; the fault is counted (and the link cut)
                # at the COMMIT's own CommandComplete: the statements sent with it in one
                # round trip (a Sync after each, as asyncpg's fetch sends) may answer
                # first, while the server has not executed the COMMIT yet
                if self._commit_answered(data):
                    proxy._fault()
                    break
                continue
            mode = proxy.mode
            if mode is Mode.RESET:
                break
            if mode is Mode.BLACKHOLE:
                continue
            if mode is Mode.DROP_REPLIES:
                if not proxy._drop_counted:  # one fault per window that dropped something
                    proxy._drop_counted = True
                    faults.record("proxy")
                proxy.dropped_replies += 1
                if proxy.ack_marker is not None:
                    proxy.dropped_acks += data.count(proxy.ack_marker)
                continue
            if self.hold:
                await proxy.release_replies.wait()  # released by the test, bounded there
            await self._delay()
            self.client_w.write(data)
            await self.client_w.drain()
        self.abort()


class FaultProxy:
    """A TCP proxy between the application and one server, switchable at run time.

    Attributes:
        mode: the current :class:`Mode` (change it any time).
        latency: seconds added before each forwarded chunk.
        port: the listening port (after :meth:`start`).
        commit_faults: how many COMMITs were dropped or blackholed.
        connections: how many client connections were accepted.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        protocol: str = "postgres",
        ack_marker: bytes | None = None,
    ) -> None:
        self.protocol = protocol
        self.dropped_replies = 0  # reply chunks dropped in DROP_REPLIES
        self.ack_marker = ack_marker
        self.dropped_acks = 0  # acknowledgements among them (with ack_marker)
        self._drop_counted = False
        self.target_host = target_host
        self.target_port = target_port
        self._mode = Mode.FORWARD
        self.latency = 0.0
        self.port = 0
        self.commit_faults = 0
        self.faults_left: int | None = None  # COMMIT faults before FORWARD again (None: all)
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self.commit_seen = asyncio.Event()  # HOLD_COMMIT_REPLY: a COMMIT went through
        self.release_replies = asyncio.Event()  # HOLD_COMMIT_REPLY: let held replies go
        self.hold_server_close = False  # keep a client's side open after the server's close
        self.held_closes = 0  # hold_server_close: connections held open so far
        self.server_closed = asyncio.Event()  # hold_server_close: a server ended a connection
        self.release_close = asyncio.Event()  # hold_server_close: close the held client sides

    @property
    def mode(self) -> Mode:
        """The current :class:`Mode`; switching to ``RESET`` aborts open connections too."""
        return self._mode

    @mode.setter
    def mode(self, value: Mode) -> None:
        if value in (Mode.BLACKHOLE, Mode.RESET) and value is not self._mode:
            faults.record("proxy")
        if value is Mode.DROP_REPLIES and value is not self._mode:
            self._drop_counted = False
        self._mode = value
        if value is Mode.RESET:
            self._abort_links()

    async def start(self) -> int:
        """Listen on a free loopback port; return it."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def dsn(self, dsn: str) -> str:
        """``dsn`` (``postgresql://user@host:port/db``) rewritten to go through the proxy,
        with TLS off so that the traffic can be parsed."""
        scheme, rest = dsn.split("://", 1)
        auth, _, tail = rest.rpartition("@")
        _, _, path = tail.partition("/")
        host = f"{auth}@" if auth else ""
        sep = "&" if "?" in path else "?"
        return f"{scheme}://{host}127.0.0.1:{self.port}/{path}{sep}sslmode=disable"

    def reset_all(self) -> None:
        """Abort every open connection now (whatever the mode); one fault if any was open."""
        if self._links:
            faults.record("proxy")
        self._abort_links()

    def _abort_links(self) -> None:
        for link in list(self._links):
            link.abort()

    async def wait_fault(self, count: int, timeout: float = 10.0) -> None:
        """Wait until :attr:`commit_faults` reaches ``count``.

        Raises:
            TimeoutError: it did not within ``timeout`` seconds.
        """
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: self.commit_faults >= count), timeout
            )

    def _fault(self) -> None:
        self.commit_faults += 1
        faults.record("proxy")
        if self.faults_left is not None:
            self.faults_left -= 1
            if self.faults_left <= 0:
                self.faults_left = None
                self._mode = Mode.FORWARD
        task = asyncio.get_running_loop().create_task(self._notify())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode is Mode.RESET:
            client_w.transport.abort()
            return
        try:
            server_r, server_w = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), 10.0
            )
        except (OSError, TimeoutError):
            client_w.transport.abort()
            return
        link = _Link(self, client_r, client_w, server_r, server_w)
        self._links.add(link)
        try:
            pumps = [
                asyncio.ensure_future(link.client_to_server()),
                asyncio.ensure_future(link.server_to_client()),
            ]
            self._tasks.update(pumps)
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
        finally:
            link.abort()
            self._links.discard(link)

    async def close(self) -> None:
        """Stop listening and abort every connection."""
        if self._server is not None:
            self._server.close()
        self._abort_links()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 5.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None
