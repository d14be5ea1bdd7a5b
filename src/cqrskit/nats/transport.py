"""The NATS JetStream transport (see :class:`NatsTransport`)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Sequence
from typing import Any

from cqrskit.errors import BrokerUnavailableError, MissingExtraError
from cqrskit.messaging.envelope import DEFAULT_MAX_BYTES, Envelope
from cqrskit.messaging.partitioning import check_token
from cqrskit.messaging.transport import Transport
from cqrskit.nats._options import check_connect_options

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.js import JetStreamContext
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingExtraError("nats", "nats-py") from exc

__all__ = ["NatsTransport"]

log = logging.getLogger("cqrskit.nats")

# errors after which the outcome of a publish is unknown: publish again later
_UNAVAILABLE = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.TimeoutError,
    nats.errors.NoServersError,
    nats.js.errors.TooManyStalledMsgsError,
    nats.js.errors.ServiceUnavailableError,
    OSError,
    TimeoutError,
)


_STATUS = "Status"
_NO_RESPONDERS = "503"


class _Acks:
    """The acknowledgements one send call waits for."""

    __slots__ = ("acked", "done", "errors", "replies", "total")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.replies: list[str] = []  # this call's reply subjects
        self.total = -1  # acks due, known once every message was handed over
        self.acked = 0
        self.errors: dict[int, dict[str, Any] | None] = {}  # index -> error (None: no stream)
        self.done: asyncio.Future[None] = loop.create_future()

    def count_done(self) -> None:
        if self.acked == self.total and not self.done.done():
            self.done.set_result(None)


class NatsTransport(Transport):
    """Publishes to a JetStream stream, one subject per partition (``<prefix>.<p>``).

    Each message carries the envelope headers plus ``Nats-Msg-Id`` (the event's message
    id), so JetStream drops a republished message within the stream's duplicate window.
    Publishes are pipelined with at most ``window`` acknowledgements outstanding; a call
    returns when all are acknowledged or refused. Each message asks for its ``PubAck`` on
    a reply subject of its own under one inbox subscription per connection, and a batch
    waits on one future: the client's ``publish_async`` (a future, a random token and a
    parsed ``PubAck`` per message) costs about twice the CPU per message.

    Args:
        servers: NATS URL(s), e.g. ``"nats://127.0.0.1:4222"``.
        stream: the JetStream stream name.
        subject_prefix: partition ``p`` is published on ``<subject_prefix>.<p>``.
        create: create the stream (subjects ``<prefix>.*``, file storage) if missing.
        duplicate_window: the stream's dedup window in seconds (used when creating it).
        window: the most acknowledgements outstanding at once.
        ack_timeout: seconds to wait for the acknowledgements of one call before the
            broker counts as unavailable.
        max_bytes: larger payloads are refused without being sent.
        connect_options: extra keyword arguments for ``nats.connect`` (credentials, TLS);
            not the reconnect options (``allow_reconnect`` ...): the transport reconnects
            itself, a :class:`~cqrskit.errors.ConfigurationError` says so.
    """

    name = "nats"
    broker_dedup = True
    max_bytes: int

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        stream: str = "CQRSKIT_EVENTS",
        subject_prefix: str = "cqrskit.events",
        create: bool = True,
        duplicate_window: float = 120.0,
        window: int = 4000,
        ack_timeout: float = 5.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.stream = check_token(stream, "stream name").replace(".", "_")
        self.subject_prefix = check_token(subject_prefix, "subject prefix")
        self.create = create
        self.duplicate_window = duplicate_window
        self.window = window
        self.ack_timeout = ack_timeout
        self.max_bytes = max_bytes
        self.connect_options = check_connect_options(connect_options, "NatsTransport")
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()
        self._subjects: dict[int, str] = {}
        # sends whose outcome is unknown or failed (successful ones leave at once)
        self._issued: set[asyncio.Future[list[str | None]]] = set()
        # reply subject -> (its batch, the message's index) for every ack outstanding
        self._waiting: dict[str, tuple[_Acks, int]] = {}
        self._inbox = ""
        self._tokens = itertools.count()
        self._space = asyncio.Event()  # set when the window has room again

    def __repr__(self) -> str:  # no credentials in logs
        return f"NatsTransport(stream={self.stream!r}, subject_prefix={self.subject_prefix!r})"

    def destination(self, partition: int) -> str:
        """See :meth:`Transport.destination`: ``<subject_prefix>.<partition>``."""
        subject = self._subjects.get(partition)
        if subject is None:
            subject = self._subjects[partition] = f"{self.subject_prefix}.{partition}"
        return subject

    def refusal(self, envelope: Envelope) -> str | None:
        """See :meth:`Transport.refusal`: a payload over ``max_bytes``, or a message
        (headers included) over the server's ``max_payload`` (taken as ``max_bytes``
        until the first connection tells it). The server would answer such a message by
        closing the connection, so it is never sent."""
        size = len(envelope.payload)
        if size > self.max_bytes:
            return f"payload of {size} bytes exceeds {self.max_bytes}"
        if size + _HEADROOM <= self._max_payload():
            return None  # far enough below the limit whatever the headers
        return self._too_large(envelope, _headers(envelope))

    def _max_payload(self) -> int:
        nc = self._nc
        return self.max_bytes if nc is None else nc.max_payload

    def _too_large(self, envelope: Envelope, headers: dict[str, str]) -> str | None:
        size = len(envelope.payload) + _headers_size(headers)
        limit = self._max_payload()
        if size > limit:
            return (
                f"message of {size} bytes (headers included) exceeds the server's "
                f"max_payload of {limit}"
            )
        return None

    @property
    def connection(self) -> Client | None:
        """The ``nats.aio.client.Client`` (``None`` before the first publish)."""
        return self._nc

    async def _connect(self) -> JetStreamContext:
        js, nc = self._js, self._nc
        if js is not None and nc is not None and nc.is_connected:
            return js
        async with self._lock:
            js, nc = self._js, self._nc
            if js is not None and nc is not None and nc.is_connected:
                return js
            if nc is not None:
                self._nc = self._js = None
                await _close_quietly(nc)
            if any(not t.done() or t.cancelled() or t.exception() for t in self._issued):
                # sends on the lost connection are unresolved or failed: connecting now
                # could store this batch ahead of their lost tail (see Transport.send)
                for task in self._issued:
                    task.cancel()
                self._issued.clear()
                raise BrokerUnavailableError(
                    "NATS: the connection was lost with publishes in flight; publish again."
                )
            self._issued.clear()
            # no reconnect inside the client: it would resend buffered publishes on the new
            # connection after ones lost with the old socket, storing a partition out of
            # order. A dead connection is closed; the next publish call connects afresh and
            # republishes the whole batch (the stored prefix is dropped by the msg-id dedup).
            options: dict[str, Any] = {
                "connect_timeout": 2,
                "allow_reconnect": False,
                # the client's first connect tries each server again every
                # reconnect_time_wait, up to max_reconnect_attempts (2 minutes by default):
                # here a refused connection fails the call at once and the relay backs off
                "max_reconnect_attempts": 1,
                "reconnect_time_wait": 0,
                "error_cb": _quiet,
            }
            options.update(self.connect_options)
            try:
                nc = await nats.connect(self.servers, **options)
            except Exception as exc:
                raise BrokerUnavailableError(f"NATS: cannot connect ({exc!r}).") from exc
            js = nc.jetstream(timeout=self.ack_timeout)
            try:
                if self.create:
                    await self._ensure_stream(js)
                inbox = nc.new_inbox() + "."
                await nc.subscribe(inbox + "*", cb=self._on_ack)
            except BaseException:
                await _close_quietly(nc)
                raise
            self._waiting.clear()
            self._inbox = inbox
            self._nc, self._js = nc, js
            return js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        try:
            await js.stream_info(self.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        except _UNAVAILABLE as exc:
            raise BrokerUnavailableError(f"NATS: stream lookup failed ({exc!r}).") from exc
        try:
            await js.add_stream(
                name=self.stream,
                subjects=[f"{self.subject_prefix}.*"],
                duplicate_window=self.duplicate_window,
            )
        except _UNAVAILABLE as exc:
            raise BrokerUnavailableError(f"NATS: cannot create the stream ({exc!r}).") from exc

    async def publish(self, messages: Sequence[Envelope]) -> list[str | None]:
        """See :meth:`Transport.publish`."""
        task = await self.send(messages)
        try:
            return await task
        finally:
            self._issued.discard(task)  # its outcome reached the caller

    async def send(self, messages: Sequence[Envelope]) -> asyncio.Future[list[str | None]]:
        """See :meth:`Transport.send`: every message is handed to the client (in order, on
        one connection) before this returns; the future resolves with the PubAcks."""
        js = await self._connect()
        nc = self._nc
        assert nc is not None
        results: list[str | None] = [None] * len(messages)
        acks = _Acks(asyncio.get_running_loop())
        waiting, inbox, tokens, window = self._waiting, self._inbox, self._tokens, self.window
        try:
            for i, env in enumerate(messages):
                if len(env.payload) > self.max_bytes:
                    results[i] = f"payload of {len(env.payload)} bytes exceeds {self.max_bytes}"
                    continue
                headers = _headers(env)
                reason = self._too_large(env, headers)
                if reason is not None:
                    results[i] = reason
                    continue
                if len(waiting) >= window:
                    await self._wait_for_space()
                reply = f"{inbox}{next(tokens)}"
                waiting[reply] = (acks, i)
                acks.replies.append(reply)
                try:
                    await nc.publish(self.destination(env.partition), env.payload, reply, headers)
                except nats.errors.MaxPayloadError:
                    del waiting[reply]
                    acks.replies.pop()
                    results[i] = "payload exceeds the server's max_payload"
        except BaseException as exc:
            self._forget(acks)
            if isinstance(exc, _UNAVAILABLE):
                raise BrokerUnavailableError(f"NATS: publish failed ({exc!r}).") from exc
            raise
        acks.total = len(acks.replies)
        acks.count_done()
        task = asyncio.ensure_future(self._collect(js, messages, results, acks))
        self._issued.add(task)
        task.add_done_callback(self._settled)
        return task

    async def _wait_for_space(self) -> None:
        """Wait (bounded by ``ack_timeout``) until fewer than ``window`` acks are due."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout
        while len(self._waiting) >= self.window:
            self._space.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise BrokerUnavailableError(
                    f"NATS: {len(self._waiting)} acknowledgements outstanding for more than "
                    f"{self.ack_timeout} s."
                )
            try:
                await asyncio.wait_for(self._space.wait(), left)
            except TimeoutError:
                continue

    async def _on_ack(self, msg: Any) -> None:
        """The inbox subscription's callback: one PubAck (or error) per message."""
        entry = self._waiting.pop(msg.subject, None)
        if entry is None:  # the batch was given up, or a stray message
            return
        acks, i = entry
        headers = msg.headers
        if headers and headers.get(_STATUS) == _NO_RESPONDERS:
            acks.errors[i] = None
        elif b'"error"' in msg.data:
            try:
                error = json.loads(msg.data).get("error")
            except ValueError:
                error = None
            if isinstance(error, dict):
                acks.errors[i] = error
        acks.acked += 1
        acks.count_done()
        if len(self._waiting) < self.window:
            self._space.set()

    def _forget(self, acks: _Acks) -> None:
        """Stop waiting for ``acks`` (late replies are dropped)."""
        waiting = self._waiting
        for reply in acks.replies:
            waiting.pop(reply, None)
        self._space.set()

    def _settled(self, task: asyncio.Future[list[str | None]]) -> None:
        # a future that failed stays until the next reconnect refuses once (module docs)
        if not task.cancelled() and task.exception() is None:
            self._issued.discard(task)

    async def _collect(
        self,
        js: JetStreamContext,
        messages: Sequence[Envelope],
        results: list[str | None],
        acks: _Acks,
    ) -> list[str | None]:
        try:
            if not acks.done.done():
                _done, late = await asyncio.wait([acks.done], timeout=self.ack_timeout)
                if late:
                    raise BrokerUnavailableError(
                        f"NATS: {acks.total - acks.acked} of {acks.total} acknowledgements did not "
                        f"arrive within {self.ack_timeout} s."
                    )
        finally:
            if acks.acked < acks.total:
                self._forget(acks)
        no_stream = False
        for i, error in sorted(acks.errors.items()):
            if error is None:
                no_stream = True
                results[i] = (
                    f"no JetStream stream is bound to {self.destination(messages[i].partition)!r}"
                )
                continue
            try:
                nats.js.errors.APIError.from_error(error)  # raises the typed error
            except (nats.js.errors.ServiceUnavailableError, nats.js.errors.ServerError) as exc:
                raise BrokerUnavailableError(f"NATS: JetStream unavailable ({exc!r}).") from exc
            except nats.js.errors.APIError as exc:
                results[i] = f"JetStream refused the message: {exc.description or exc!r}"
            except Exception as exc:  # a malformed error object
                raise BrokerUnavailableError(f"NATS: publish failed ({error!r}).") from exc
        if no_stream:
            await self._check_no_stream(js, messages, results)
        return results

    async def _check_no_stream(
        self, js: JetStreamContext, messages: Sequence[Envelope], results: list[str | None]
    ) -> None:
        """ "No responders" also happens while a restarting server recovers its streams: it is
        a refusal only when JetStream answers that no stream holds the subject."""
        for i, reason in enumerate(results):
            if reason is None or not reason.startswith("no JetStream stream"):
                continue
            try:
                await js.find_stream_name_by_subject(self.destination(messages[i].partition))
            except nats.js.errors.NotFoundError:
                continue
            except Exception as exc:
                raise BrokerUnavailableError(
                    f"NATS: JetStream is not answering ({exc!r})."
                ) from exc
            raise BrokerUnavailableError("NATS: the stream exists but did not answer yet.")

    async def close(self) -> None:
        """Close the connection (a later publish reconnects; unresolved sends are
        cancelled)."""
        for task in self._issued:
            task.cancel()
        self._issued.clear()
        self._waiting.clear()
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            await _close_quietly(nc)


_HEADROOM = 16384  # header bytes the size check may skip counting (a real block is < 1 KiB)


def _headers(envelope: Envelope) -> dict[str, str]:
    headers = envelope.headers()
    headers["Nats-Msg-Id"] = headers["cqrskit-id"]
    return headers


def _headers_size(headers: dict[str, str]) -> int:
    """Bytes of the header block as sent (``NATS/1.0``, ``key: value`` lines, blank line);
    envelope headers are ASCII, so characters are bytes."""
    return 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())


async def _close_quietly(nc: Client) -> None:
    if nc.is_closed:
        return
    try:
        await nc.close()
    except Exception:
        log.debug("NATS: error while closing", exc_info=True)


async def _quiet(exc: Exception) -> None:
    log.debug("NATS client: %r", exc)
