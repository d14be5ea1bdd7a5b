"""The NATS JetStream transport (see :class:`NatsTransport`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from cqrskit.errors import BrokerUnavailableError, MissingExtraError
from cqrskit.messaging.envelope import DEFAULT_MAX_BYTES, Envelope
from cqrskit.messaging.partitioning import check_token
from cqrskit.messaging.transport import Transport

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


class NatsTransport(Transport):
    """Publishes to a JetStream stream, one subject per partition (``<prefix>.<p>``).

    Each message carries the envelope headers plus ``Nats-Msg-Id`` (the event's message
    id), so JetStream drops a republished message within the stream's duplicate window.
    Publishes are pipelined (``publish_async``) with at most ``window`` acknowledgements
    outstanding; a call returns when all are acknowledged or refused.

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
        connect_options: extra keyword arguments for ``nats.connect`` (credentials, TLS).
    """

    name = "nats"
    broker_dedup = True

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
        self.connect_options = dict(connect_options or {})
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()
        self._subjects: dict[int, str] = {}

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
            # no reconnect inside the client: it would resend buffered publishes on the new
            # connection after ones lost with the old socket, storing a partition out of
            # order. A dead connection is closed; the next publish call connects afresh and
            # republishes the whole batch (the stored prefix is dropped by the msg-id dedup).
            options: dict[str, Any] = {
                "connect_timeout": 2,
                "allow_reconnect": False,
                "error_cb": _quiet,
            }
            options.update(self.connect_options)
            try:
                nc = await nats.connect(self.servers, **options)
            except Exception as exc:
                raise BrokerUnavailableError(f"NATS: cannot connect ({exc!r}).") from exc
            js = nc.jetstream(timeout=self.ack_timeout, publish_async_max_pending=self.window)
            if self.create:
                try:
                    await self._ensure_stream(js)
                except BaseException:
                    await nc.close()
                    raise
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
        js = await self._connect()
        results: list[str | None] = [None] * len(messages)
        pending: list[tuple[int, asyncio.Future[Any]]] = []
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
                try:
                    fut = await js.publish_async(
                        self.destination(env.partition),
                        env.payload,
                        wait_stall=self.ack_timeout,
                        headers=headers,
                    )
                except nats.errors.MaxPayloadError:
                    results[i] = "payload exceeds the server's max_payload"
                    continue
                pending.append((i, fut))
            if pending:
                _done, late = await asyncio.wait([f for _, f in pending], timeout=self.ack_timeout)
                if late:
                    raise BrokerUnavailableError(
                        f"NATS: {len(late)} of {len(pending)} acknowledgements did not arrive "
                        f"within {self.ack_timeout} s."
                    )
        except _UNAVAILABLE as exc:
            raise BrokerUnavailableError(f"NATS: publish failed ({exc!r}).") from exc
        finally:
            for _, fut in pending:
                if not fut.done():
                    fut.cancel()
        no_stream = False
        for i, fut in pending:
            error = fut.exception()
            if error is None:
                continue
            if isinstance(error, nats.js.errors.NoStreamResponseError):
                no_stream = True
                results[i] = (
                    f"no JetStream stream is bound to {self.destination(messages[i].partition)!r}"
                )
            elif isinstance(
                error, nats.js.errors.ServiceUnavailableError | nats.js.errors.ServerError
            ):
                raise BrokerUnavailableError(f"NATS: JetStream unavailable ({error!r}).") from error
            elif isinstance(error, nats.js.errors.APIError):
                results[i] = f"JetStream refused the message: {error.description or error!r}"
            else:
                raise BrokerUnavailableError(f"NATS: publish failed ({error!r}).") from error
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
        """Close the connection (a later publish reconnects)."""
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
