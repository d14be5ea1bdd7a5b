"""The Redis Streams transport (see :class:`RedisTransport`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from cqrskit.errors import BrokerUnavailableError, MissingExtraError
from cqrskit.messaging.envelope import DEFAULT_MAX_BYTES, Envelope
from cqrskit.messaging.partitioning import check_token
from cqrskit.messaging.transport import Transport

try:
    import redis.asyncio as aioredis
    import redis.exceptions as rexc
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingExtraError("redis", "redis") from exc

__all__ = ["RedisTransport"]

# entry field names, encoded once
_NAMES = {
    name: name.encode()
    for name in (
        "cqrskit-id", "cqrskit-type", "cqrskit-schema", "cqrskit-stream", "cqrskit-version",
        "cqrskit-position", "cqrskit-partition", "cqrskit-sequence", "cqrskit-correlation",
        "cqrskit-causation", "cqrskit-timestamp", "traceparent", "cqrskit-kind",
        "cqrskit-key", "cqrskit-signature",
    )
}  # fmt: skip

# the same names as RESP bulk strings, ready to be joined into a packed command
_SEGMENTS = {name: b"$%d\r\n%b\r\n" % (len(raw), raw) for name, raw in _NAMES.items()}
_XADD = b"$4\r\nXADD\r\n"
_AUTO_ID = b"$1\r\n*\r\n"
_NOMKSTREAM = b"$10\r\nNOMKSTREAM\r\n"
_BODY = b"$4\r\nbody\r\n"


def _segment(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


# refusals that stay refusals when retried (everything else means "try again later")
_REFUSED = ("WRONGTYPE", "NOPERM", "NOAUTH", "ERR The ID specified", "NOSCRIPT")


class RedisTransport(Transport):
    """Appends to one Redis stream per partition (``<key_prefix>:<p>``) with ``XADD``.

    One pipeline (no MULTI, packed here) per call, so a batch costs one round trip; Redis runs the
    commands of a connection in order, so a partition is stored in order and a dropped
    connection loses a suffix, never a middle part. Entry fields are the envelope headers
    plus ``body``. The stream is never trimmed here (trimming can drop entries a consumer
    has not read: configure retention deliberately, see docs/messaging.md).

    Args:
        url: ``redis://host:port/db`` (credentials in the URL or ``client_options``).
        key_prefix: partition ``p`` is the stream key ``<key_prefix>:<p>``.
        create: ignored for Redis (``XADD`` creates the stream); with ``create=False``
            a missing key is refused, like a missing NATS stream.
        ack_timeout: seconds one pipeline may take before the broker counts as unavailable.
        max_bytes: larger payloads are refused without being sent.
        client_options: extra keyword arguments for ``redis.asyncio.from_url``.
    """

    name = "redis"
    broker_dedup = False
    max_bytes: int

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        key_prefix: str = "cqrskit:events",
        create: bool = True,
        ack_timeout: float = 5.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        for part in key_prefix.split(":"):
            check_token(part, "Redis key prefix")
        self.url = url
        self.key_prefix = key_prefix
        self.create = create
        self.ack_timeout = ack_timeout
        self.max_bytes = max_bytes
        self.client_options = dict(client_options or {})
        self._client: Any = None
        self._keys: dict[int, str] = {}
        self._key_segments: dict[int, bytes] = {}
        self._last: asyncio.Future[list[str | None]] | None = None
        # sends whose outcome is unknown or failed (successful ones leave at once)
        self._issued: set[asyncio.Future[list[str | None]]] = set()

    def __repr__(self) -> str:  # the URL may hold a password: never shown
        return f"RedisTransport(key_prefix={self.key_prefix!r})"

    def refusal(self, envelope: Envelope) -> str | None:
        """See :meth:`Transport.refusal`: a payload over ``max_bytes``."""
        if len(envelope.payload) > self.max_bytes:
            return f"payload of {len(envelope.payload)} bytes exceeds {self.max_bytes}"
        return None

    def destination(self, partition: int) -> str:
        """See :meth:`Transport.destination`: ``<key_prefix>:<partition>``."""
        key = self._keys.get(partition)
        if key is None:
            key = self._keys[partition] = f"{self.key_prefix}:{partition}"
        return key

    def _connect(self) -> Any:
        if self._client is None:
            # no socket_timeout: redis-py would arm a timer for every reply it reads; the
            # whole pipeline is bounded by ack_timeout instead (see _execute)
            options: dict[str, Any] = {"socket_connect_timeout": 2.0}
            options.update(self.client_options)
            self._client = aioredis.from_url(self.url, **options)
        return self._client

    async def publish(self, messages: Sequence[Envelope]) -> list[str | None]:
        """See :meth:`Transport.publish`."""
        task = await self.send(messages)
        try:
            return await task
        finally:
            self._issued.discard(task)  # its outcome reached the caller

    async def send(self, messages: Sequence[Envelope]) -> asyncio.Future[list[str | None]]:
        """See :meth:`Transport.send`: the pipeline is built now and runs once the previous
        call's pipeline has been answered (so the server stores the calls in order); it
        does not run at all if that one failed."""
        if any(t.done() and (t.cancelled() or t.exception()) for t in self._issued):
            # an earlier send failed and this one may be its successor, not its retry
            # (see Transport.send): refuse once, then start afresh
            for t in self._issued:
                t.cancel()
            self._issued.clear()
            raise BrokerUnavailableError("Redis: an earlier pipeline failed; publish again.")
        client = self._connect()
        results: list[str | None] = [None] * len(messages)
        sent: list[int] = []
        # each XADD packed here as RESP (its arguments' headers are constants): redis-py's
        # own packer runs its encoder on every argument, the largest part of the client's
        # CPU per entry
        parts: list[bytes] = []
        add = parts.append
        head = _AUTO_ID if self.create else _NOMKSTREAM + _AUTO_ID
        fixed = 2 + (1 if self.create else 2) + 2  # XADD key [NOMKSTREAM] * ... body payload
        segments, keys = _SEGMENTS, self._key_segments
        for i, env in enumerate(messages):
            reason = self.refusal(env)
            if reason is not None:
                results[i] = reason
                continue
            key = keys.get(env.partition)
            if key is None:
                key = keys[env.partition] = _segment(self.destination(env.partition).encode())
            headers = env.headers()
            add(b"*%d\r\n" % (fixed + 2 * len(headers)))
            add(_XADD)
            add(key)
            add(head)
            for name, value in headers.items():
                add(segments.get(name) or _segment(name.encode()))
                add(_segment(value.encode()))
            add(_BODY)
            add(_segment(env.payload))
            sent.append(i)
        packed = b"".join(parts)
        previous = self._last if self._last is not None and not self._last.done() else None
        task = asyncio.ensure_future(
            self._execute(previous, client, packed, messages, results, sent)
        )
        self._last = task
        self._issued.add(task)
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Future[list[str | None]]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._issued.discard(task)

    async def _execute(
        self,
        previous: asyncio.Future[list[str | None]] | None,
        client: Any,
        packed: bytes,
        messages: Sequence[Envelope],
        results: list[str | None],
        sent: list[int],
    ) -> list[str | None]:
        if previous is not None:  # unresolved when this call was made: wait for it
            await asyncio.wait([previous])
            if previous.cancelled() or previous.exception() is not None:
                raise BrokerUnavailableError("Redis: an earlier pipeline failed; publish again.")
        if not sent:
            return results
        try:
            replies = await asyncio.wait_for(
                self._round_trip(client, packed, len(sent)), self.ack_timeout + 1.0
            )
        except (rexc.ConnectionError, rexc.TimeoutError, OSError, TimeoutError) as exc:
            await self._drop()
            raise BrokerUnavailableError(f"Redis: pipeline failed ({exc!r}).") from exc
        for i, reply in zip(sent, replies, strict=True):
            if reply is None:
                results[i] = f"no stream {self.destination(messages[i].partition)!r}"
            elif isinstance(reply, rexc.ResponseError):
                text = str(reply)
                if text.startswith(_REFUSED):
                    results[i] = f"Redis refused the entry: {text}"
                else:  # OOM, LOADING, BUSY, READONLY ...: the server may accept it later
                    raise BrokerUnavailableError(f"Redis: {text}") from reply
            elif isinstance(reply, Exception):
                await self._drop()
                raise BrokerUnavailableError(f"Redis: {reply!r}") from reply
        return results

    async def _round_trip(self, client: Any, packed: bytes, count: int) -> list[Any]:
        """Send ``packed`` (``count`` commands) on one pooled connection and read the
        ``count`` replies (an error reply is returned, not raised). A connection left with
        replies unread (an error, a cancellation) is disconnected before it goes back."""
        pool = client.connection_pool
        try:
            conn = await pool.get_connection()
        except TypeError:  # redis-py < 5.3 wants a command name
            conn = await pool.get_connection("XADD")
        clean = False
        try:
            await conn.send_packed_command(packed, check_health=False)
            replies: list[Any] = []
            for _ in range(count):
                try:
                    replies.append(await conn.read_response())
                except rexc.ResponseError as exc:
                    replies.append(exc)
            clean = True
            return replies
        finally:
            if not clean:
                await asyncio.shield(conn.disconnect())
            await pool.release(conn)

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001 - closing a broken client
                pass

    async def close(self) -> None:
        """Close the connection pool (a later publish reconnects; unresolved sends are
        cancelled)."""
        for t in self._issued:
            t.cancel()
        self._issued.clear()
        self._last = None
        await self._drop()
