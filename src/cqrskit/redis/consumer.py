"""The Redis Streams source (see :class:`RedisSource`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from cqrskit.errors import BrokerUnavailableError, MissingExtraError
from cqrskit.messaging.partitioning import check_token
from cqrskit.messaging.source import Delivery, Source, Subscription

try:
    import redis.asyncio as aioredis
    import redis.exceptions as rexc
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingExtraError("redis", "redis") from exc

__all__ = ["RedisSource"]

_DOWN = (rexc.ConnectionError, rexc.TimeoutError, OSError, TimeoutError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _delivery(entry_id: Any, fields: dict[Any, Any], redelivered: bool) -> Delivery:
    body = fields.pop(b"body", None)
    if body is None:
        body = fields.pop("body", b"")
    cursor = _text(entry_id)
    return Delivery(fields, bytes(body), cursor, cursor, redelivered)


class _RedisSubscription(Subscription):
    def __init__(self, source: RedisSource, client: Any, key: str, group: str) -> None:
        self.source = source
        self.client = client
        self.key = key
        self.group = group
        self.consumer = source.consumer_name
        self.claim_from: str | None = "0-0"
        #: entries the broker reported deleted (trimmed) while still pending
        self.deleted = 0

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        out: list[Delivery] = []
        try:
            if self.claim_from is not None:
                # entries delivered to an earlier holder (a dead consumer) and never
                # acknowledged come first, in id order
                reply = await self.client.xautoclaim(
                    self.key,
                    self.group,
                    self.consumer,
                    min_idle_time=0,
                    start_id=self.claim_from,
                    count=max_messages,
                )
                nxt, entries = reply[0], reply[1]
                self.deleted += len(reply[2]) if len(reply) > 2 else 0
                out += [_delivery(i, dict(f), True) for i, f in entries if f is not None]
                nxt = _text(nxt)
                self.claim_from = None if nxt == "0-0" else nxt
            if self.claim_from is None and len(out) < max_messages:
                block = None if out else max(1, int(timeout * 1000))
                reply = await self.client.xreadgroup(
                    self.group,
                    self.consumer,
                    {self.key: ">"},
                    count=max_messages - len(out),
                    block=block,
                )
                for _key, entries in reply or []:
                    out += [_delivery(i, dict(f), False) for i, f in entries]
        except _DOWN as exc:
            await self.source._drop()
            raise BrokerUnavailableError(f"Redis: read failed ({exc!r}).") from exc
        except rexc.ResponseError as exc:
            raise BrokerUnavailableError(f"Redis: {exc}") from exc
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        try:
            await self.client.xack(self.key, self.group, *(d.handle for d in deliveries))
        except (*_DOWN, rexc.ResponseError) as exc:
            await self.source._drop()
            raise BrokerUnavailableError(f"Redis: ack failed ({exc!r}).") from exc


class RedisSource(Source):
    """Reads the relay's Redis streams with one consumer group per target.

    Partition ``p`` is the stream ``<key_prefix>:<p>``; a group is created at the stream's
    start if missing. On subscribe the group's read position is set to the cursor stored
    with the read model's checkpoint (so a read model that starts over replays the
    stream), then entries left pending by a dead consumer are taken over with
    ``XAUTOCLAIM`` and delivered first, in id order; ``XREADGROUP`` follows. Acks are
    ``XACK``. The stream is never trimmed here: a trimmed entry no consumer read shows as a
    gap, held and reported.

    Args:
        url: ``redis://host:port/db``.
        key_prefix: the relay's key prefix.
        consumer_name: this process's consumer name in the groups (default: unique).
        client_options: extra keyword arguments for ``redis.asyncio.from_url``.
    """

    name = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        key_prefix: str = "cqrskit:events",
        consumer_name: str | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        for part in key_prefix.split(":"):
            check_token(part, "Redis key prefix")
        self.url = url
        self.key_prefix = key_prefix
        if consumer_name is None:
            import os
            import uuid

            consumer_name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.consumer_name = consumer_name
        self.client_options = dict(client_options or {})
        self._client: Any = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:  # the URL may hold a password: never shown
        return f"RedisSource(key_prefix={self.key_prefix!r})"

    def destination(self, partition: int) -> str:
        """See :meth:`Source.destination`: ``<key_prefix>:<partition>``."""
        return f"{self.key_prefix}:{partition}"

    def _connect(self) -> Any:
        if self._client is None:
            options: dict[str, Any] = {"socket_timeout": 10.0, "socket_connect_timeout": 2.0}
            options.update(self.client_options)
            self._client = aioredis.from_url(self.url, **options)
        return self._client

    async def subscribe(self, group: str, partition: int, cursor: str) -> Subscription:
        """See :meth:`Source.subscribe`."""
        client = self._connect()
        key = self.destination(partition)
        group = check_token(group, "group name")
        start = cursor or "0"
        try:
            try:
                await client.xgroup_create(key, group, id=start, mkstream=True)
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                await client.xgroup_setid(key, group, start)
        except _DOWN as exc:
            await self._drop()
            raise BrokerUnavailableError(f"Redis: cannot subscribe ({exc!r}).") from exc
        except rexc.ResponseError as exc:
            raise BrokerUnavailableError(f"Redis: cannot subscribe ({exc}).") from exc
        return _RedisSubscription(self, client, key, group)

    async def backlog(self, group: str, partition: int) -> int | None:
        """See :meth:`Source.backlog`: the group's lag plus its pending entries."""
        try:
            groups = await self._connect().xinfo_groups(self.destination(partition))
        except (*_DOWN, rexc.ResponseError):
            return None
        for g in groups:
            if _text(g.get("name")) == group:
                lag = g.get("lag")
                return int(lag or 0) + int(g.get("pending") or 0)
        return None

    async def _drop(self) -> None:
        async with self._lock:
            client, self._client = self._client, None
            if client is not None:
                try:
                    await client.aclose()
                except Exception:  # noqa: BLE001 - closing a broken client
                    pass

    async def close(self) -> None:
        """Close the connection pool (a later subscribe reconnects)."""
        await self._drop()
