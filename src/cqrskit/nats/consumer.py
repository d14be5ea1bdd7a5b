"""The NATS JetStream source (see :class:`NatsSource`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from cqrskit.errors import BrokerUnavailableError, MissingExtraError
from cqrskit.messaging.partitioning import check_token
from cqrskit.messaging.source import Delivery, Source, Subscription
from cqrskit.nats._options import check_connect_options

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingExtraError("nats", "nats-py") from exc

__all__ = ["NatsSource"]

log = logging.getLogger("cqrskit.nats")

_UNAVAILABLE = (
    nats.errors.Error,
    nats.js.errors.Error,
    OSError,
    TimeoutError,
)


def _ack_tokens(reply: str) -> tuple[str, int]:
    """(stream sequence, delivery count) from a JetStream ack subject —
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>``,
    or with ``<domain>.<account hash>`` after ``$JS.ACK`` (and a trailing token) in the v2
    form. A split instead of nats-py's ``msg.metadata``, which also builds a timestamp."""
    tokens = reply.split(".")
    base = 2 if len(tokens) == 9 else 4
    try:
        return tokens[base + 3], int(tokens[base + 2])
    except (IndexError, ValueError) as exc:
        raise BrokerUnavailableError(f"NATS: not a JetStream ack subject: {reply!r}.") from exc


_PULL_EXPIRES = 10.0
_PULL_HEARTBEAT = 1.0


class _NatsSubscription(Subscription):
    """A pull consumer read through one long-lived pull request at a time.

    ``fetch`` returns as soon as messages are there — not when a whole batch is filled, as
    nats-py's ``fetch`` does (that holds a message up to the fetch timeout at low rates).
    The request asks for up to a batch, expires after 10 s and carries idle heartbeats; a
    new one is sent when the batch was delivered, before the old one expires, or when
    neither messages nor heartbeats came for three heartbeat intervals (a request the
    server lost), so a message never waits for a request.
    """

    def __init__(self, nc: Client, api: str) -> None:
        self.nc = nc
        self.api = api
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self.sub: Any = None
        self.expecting = 0
        self.renew_at = 0.0
        self.heard = 0.0

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(self.inbox, cb=self._arrived)

    async def _arrived(self, msg: Msg) -> None:
        self.queue.put_nowait(msg)

    def _take(self, msg: Msg, out: list[Delivery]) -> None:
        self.heard = time.monotonic()
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self.expecting -= 1
            stream_seq, delivered = _ack_tokens(msg.reply)
            out.append(Delivery(msg.headers or {}, msg.data, stream_seq, msg, delivered > 1))
            return
        if status == "100":
            return  # an idle heartbeat: the request is alive
        self.expecting = 0  # 404 no messages, 408 request expired, 409 conflict: it ended
        description = " ".join(str(v) for v in (msg.headers or {}).values())
        if status == "409" and "deleted" in description.lower():
            raise BrokerUnavailableError(f"NATS: the consumer was deleted ({description}).")

    async def _request(self, batch: int, now: float) -> None:
        request = {
            "batch": batch,
            "expires": int(_PULL_EXPIRES * 1_000_000_000),
            "idle_heartbeat": int(_PULL_HEARTBEAT * 1_000_000_000),
        }
        try:
            await self.nc.publish(self.api, json.dumps(request).encode(), reply=self.inbox)
        except _UNAVAILABLE as exc:
            raise BrokerUnavailableError(f"NATS: pull request failed ({exc!r}).") from exc
        self.expecting, self.renew_at, self.heard = batch, now + _PULL_EXPIRES * 0.8, now

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        out: list[Delivery] = []
        queue = self.queue
        while not queue.empty() and len(out) < max_messages:
            self._take(queue.get_nowait(), out)
        now = time.monotonic()
        lost = now - self.heard > 3 * _PULL_HEARTBEAT
        if self.expecting <= 0 or now >= self.renew_at or lost:
            await self._request(max_messages, now)
        if out:
            return out
        if self.nc.is_closed or not self.nc.is_connected:
            raise BrokerUnavailableError("NATS: the connection is closed.")
        try:
            msg = await asyncio.wait_for(queue.get(), max(timeout, 0.001))
        except TimeoutError:
            return []
        self._take(msg, out)
        while not queue.empty() and len(out) < max_messages:
            self._take(queue.get_nowait(), out)
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        try:
            for d in deliveries:
                await d.handle.ack()
        except _UNAVAILABLE as exc:
            raise BrokerUnavailableError(f"NATS: ack failed ({exc!r}).") from exc

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        try:
            for d in deliveries:
                await d.handle.in_progress()
        except _UNAVAILABLE as exc:
            log.debug("NATS: in-progress failed (%r)", exc)

    async def close(self) -> None:
        try:
            if self.sub is not None:
                await self.sub.unsubscribe()
        except Exception:
            log.debug("NATS: unsubscribe failed", exc_info=True)


class NatsSource(Source):
    """Reads the relay's JetStream stream: one durable pull consumer per (group, partition).

    The consumer ``<group>_<p>`` filters subject ``<subject_prefix>.<p>``, acknowledges
    explicitly, has at most ``max_ack_pending`` messages outstanding and an ``ack_wait``
    that the consumer extends ("in progress") while a batch is being applied. When a worker
    takes a partition, the durable consumer is created afresh, starting right after the
    stream sequence recorded with the read model's checkpoint — so a dead worker's
    unacknowledged messages come again at once, in order, instead of after ``ack_wait``.

    Args:
        servers: NATS URL(s).
        stream: the JetStream stream (as given to :class:`~cqrskit.nats.NatsTransport`).
        subject_prefix: the relay's subject prefix.
        ack_wait: seconds before JetStream redelivers an unacknowledged message.
        max_ack_pending: the most unacknowledged messages per consumer (the look-ahead past
            a gap is bounded by it).
        connect_options: extra keyword arguments for ``nats.connect`` (credentials, TLS);
            not the reconnect options, as for :class:`~cqrskit.nats.NatsTransport`.
    """

    name = "nats"

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        stream: str = "CQRSKIT_EVENTS",
        subject_prefix: str = "cqrskit.events",
        ack_wait: float = 30.0,
        max_ack_pending: int = 10_000,
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.stream = check_token(stream, "stream name").replace(".", "_")
        self.subject_prefix = check_token(subject_prefix, "subject prefix")
        self.ack_wait = ack_wait
        self.extend_interval = ack_wait / 3
        self.max_unacked = max_ack_pending
        self.connect_options = check_connect_options(connect_options, "NatsSource")
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:  # no credentials in logs
        return f"NatsSource(stream={self.stream!r}, subject_prefix={self.subject_prefix!r})"

    def destination(self, partition: int) -> str:
        """See :meth:`Source.destination`: ``<subject_prefix>.<partition>``."""
        return f"{self.subject_prefix}.{partition}"

    async def _connect(self) -> JetStreamContext:
        async with self._lock:
            nc, js = self._nc, self._js
            if nc is not None and js is not None and nc.is_connected:
                return js
            if nc is not None:
                self._nc = self._js = None
                await _close_quietly(nc)
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
            self._nc, self._js = nc, nc.jetstream(timeout=5.0)
            return self._js

    async def subscribe(self, group: str, partition: int, cursor: str) -> Subscription:
        """See :meth:`Source.subscribe`: (re)creates the durable consumer after ``cursor``
        (a stream sequence)."""
        js = await self._connect()
        durable = f"{check_token(group, 'group name')}_{partition}"
        start = int(cursor) + 1 if cursor else 0
        config = ConsumerConfig(
            durable_name=durable,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start else DeliverPolicy.ALL,
            opt_start_seq=start or None,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_unacked,
            max_deliver=-1,
            filter_subject=self.destination(partition),
        )
        try:
            try:
                await js.delete_consumer(self.stream, durable)
            except nats.js.errors.NotFoundError:
                pass
            await js.add_consumer(self.stream, config)
            assert self._nc is not None
            sub = _NatsSubscription(self._nc, f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{durable}")
            await sub.start()
        except nats.js.errors.NotFoundError as exc:
            raise BrokerUnavailableError(
                f"NATS: no stream {self.stream!r} yet (the relay creates it)."
            ) from exc
        except _UNAVAILABLE as exc:
            raise BrokerUnavailableError(f"NATS: cannot subscribe ({exc!r}).") from exc
        return sub

    async def backlog(self, group: str, partition: int) -> int | None:
        """See :meth:`Source.backlog`: pending plus unacknowledged messages."""
        try:
            js = await self._connect()
            info = await js.consumer_info(self.stream, f"{group}_{partition}")
        except (BrokerUnavailableError, *_UNAVAILABLE):
            return None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def close(self) -> None:
        """Close the connection (a later subscribe reconnects)."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            await _close_quietly(nc)


async def _close_quietly(nc: Client) -> None:
    if nc.is_closed:
        return
    try:
        await nc.close()
    except Exception:
        log.debug("NATS: error while closing", exc_info=True)


async def _quiet(exc: Exception) -> None:
    log.debug("NATS client: %r", exc)
