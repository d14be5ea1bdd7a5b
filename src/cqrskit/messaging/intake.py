"""Intake: what a consumer does with each message of a partition before applying anything.

:func:`plan_batch` walks a fetched batch in broker order and decides, message by message:

* **rejected** — not a cqrskit envelope, a failing signature, or an envelope of another
  partition. Nothing in it is trusted, so it takes no sequence number (a forged message
  cannot make the real one look like a duplicate); it is parked with the reason and acked.
* **duplicate** — a sequence number at or below the last one processed, for an event at or
  below the last position processed: acked and skipped.
* **backwards** — a sequence number at or below the last one, for an event *past* the last
  position: new data under an old number (a relay whose counters were reset). Parked with
  the reason (its stream is held), never dropped.
* **gap** — a sequence number above the next one expected: processing stops there; the
  message and the rest of the batch are not acked, and the consumer re-reads.
* in sequence: a ``parked`` placeholder from the relay (the relay holds that stream) or an
  event at or below the partition's floor (applied by a log reader) advances the sequence
  and is skipped; an oversized payload, a payload that is not UTF-8 text or an unknown event
  type is parked with the reason (its stream is held); anything else is applied.
"""

from __future__ import annotations

import base64
import json
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cqrskit.errors import EnvelopeError, SerializationError
from cqrskit.eventlog import StoredEvent
from cqrskit.messaging.envelope import Envelope
from cqrskit.messaging.signing import HmacSigner
from cqrskit.messaging.source import Delivery
from cqrskit.projections.db import Session
from cqrskit.projections.partitions import PartitionState

__all__ = ["Batch", "Item", "TypeCheck", "admit", "plan_batch", "read_envelope", "type_check"]

DDL = """CREATE TABLE IF NOT EXISTS cqrskit_parked_messages (
    projection TEXT NOT NULL,
    generation INTEGER NOT NULL,
    position BIGINT NOT NULL,
    partition INTEGER NOT NULL,
    headers TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (projection, generation, position))"""

REJECTED_TYPE = "(rejected)"
_MAX_ERROR = 2000
_MAX_HEADERS = 64


@dataclass(slots=True)
class Item:
    """One message to write in the batch transaction.

    ``kind`` is ``"apply"`` (``stored`` is applied), ``"park"`` (``stored`` is parked with
    ``reason``) or ``"reject"`` (the raw message is parked under a synthetic negative
    position, with ``reason``).
    """

    kind: str
    delivery: Delivery
    stored: StoredEvent | None = None
    reason: str = ""


@dataclass(slots=True)
class Batch:
    """The outcome of :func:`plan_batch`.

    Attributes:
        items: what to write, in order.
        done: the deliveries to acknowledge after the commit (a prefix of the batch).
        state: the partition's checkpoint after the batch.
        gap: the missing sequence number, if processing stopped at a gap.
        counts: duplicates, backwards, rejected, placeholders, floor (skipped as applied
            by a log reader), parked, applied.
    """

    items: list[Item]
    done: list[Delivery]
    state: PartitionState
    gap: int | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        """Add one to counter ``what``."""
        self.counts[what] = self.counts.get(what, 0) + 1


TypeCheck = Callable[[str], bool]
"""``known(type_name)``: whether the application's decoder knows an event type."""


def type_check(decoder: Any) -> TypeCheck | None:
    """A check of event type names from a serializer's registry (``None`` if it has none)."""
    types = getattr(decoder, "event_types", None)
    type_for = getattr(types, "type_for", None)
    if type_for is None:
        return None
    known: dict[str, bool] = {}

    def check(name: str) -> bool:
        hit = known.get(name)
        if hit is None:
            try:
                type_for(name)
                hit = True
            except SerializationError:
                hit = False
            if len(known) < 10_000:
                known[name] = hit
        return hit

    return check


def read_envelope(
    delivery: Delivery,
    destination: str,
    verifier: HmacSigner | None,
    partition: int,
    partitions: int,
) -> Envelope | str:
    """The envelope of ``delivery``, or why it cannot be trusted."""
    try:
        env = Envelope.from_wire(delivery.headers, delivery.body, max_bytes=sys.maxsize)
    except EnvelopeError as exc:
        text = str(exc)
        return (
            text if text.startswith("not a cqrskit envelope") else f"not a valid envelope: {text}"
        )
    except Exception as exc:  # noqa: BLE001 - anything a broker hands over is data, never a crash
        return f"not a valid envelope: {type(exc).__name__}: {exc}"
    if verifier is not None:
        try:
            verifier.verify(env.key_id, env.signature, env.signing_input(destination))
        except EnvelopeError as exc:
            return f"signature refused: {exc}"
    if env.partition != partition or env.partitions != partitions:
        return (
            f"envelope of partition {env.partition}/{env.partitions} read from partition "
            f"{partition}/{partitions} ({destination!r})"
        )
    return env


def plan_batch(
    deliveries: Sequence[Delivery],
    state: PartitionState,
    *,
    destination: str,
    partition: int,
    partitions: int,
    verifier: HmacSigner | None,
    max_bytes: int,
    known: TypeCheck | None,
) -> Batch:
    """Classify a fetched batch (see the module docs).

    Messages are taken in sequence order, not broker order: a number that arrives early
    waits (within this batch) for the ones before it — the relay publishes the placeholder
    of an event the broker refused after the rest of its batch. What is still waiting at
    the end is a gap; it is neither processed nor acknowledged, and ``state.cursor`` stays
    before the first such message so that a re-read brings it again.
    """
    st = PartitionState(state.position, state.floor, state.sequence, state.cursor)
    batch = Batch([], [], st)
    expected = st.sequence + 1
    done = [False] * len(deliveries)
    envelopes: list[Envelope | None] = [None] * len(deliveries)
    ahead: dict[int, int] = {}

    def take(i: int, env: Envelope) -> None:
        nonlocal expected
        expected += 1
        st.sequence = env.sequence
        st.position = max(st.position, env.position)
        done[i] = True
        if env.kind != "event":
            batch.count("placeholders")
        elif env.position <= st.floor:
            batch.count("floor")
        else:
            batch.items.append(admit(deliveries[i], env, max_bytes, known))

    for i, d in enumerate(deliveries):
        env = read_envelope(d, destination, verifier, partition, partitions)
        if isinstance(env, str):
            batch.items.append(Item("reject", d, reason=env))
            done[i] = True
            continue
        envelopes[i] = env
        if env.sequence < expected:
            done[i] = True
            if env.kind == "event" and env.position > st.position:
                reason = (
                    f"sequence went backwards: {env.sequence} after {expected - 1}, for an "
                    f"event past the last one processed (position {env.position} > "
                    f"{st.position}); were the relay's counters reset?"
                )
                batch.items.append(Item("park", d, _stored(env), reason))
                batch.count("backwards")
            else:
                batch.count("duplicates")
        elif env.sequence > expected:
            ahead.setdefault(env.sequence, i)
        else:
            take(i, env)
            while expected in ahead:
                j = ahead.pop(expected)
                env_j = envelopes[j]
                assert env_j is not None
                take(j, env_j)
    for i, seen in enumerate(envelopes):  # copies of numbers taken after they were seen
        if seen is not None and not done[i] and seen.sequence < expected:
            done[i] = True
            batch.count("duplicates")
    if ahead:
        batch.gap = expected
    batch.done = [d for i, d in enumerate(deliveries) if done[i]]
    prefix = 0
    while prefix < len(deliveries) and done[prefix]:
        prefix += 1
    for d in reversed(deliveries[:prefix]):
        if d.cursor:
            st.cursor = d.cursor
            break
    applied = sum(1 for item in batch.items if item.kind == "apply")
    if applied:
        batch.counts["applied"] = applied
    if applied != len(batch.items):
        for item in batch.items:
            if item.kind != "apply":
                batch.count("parked" if item.kind == "park" else "rejected")
    return batch


def _stored(env: Envelope) -> StoredEvent:
    try:
        return env.to_stored()
    except EnvelopeError:
        return StoredEvent(
            env.position, env.stream, env.version, env.type, env.schema_version, "", {}
        )


def admit(d: Delivery, env: Envelope, max_bytes: int, known: TypeCheck | None) -> Item:
    """An in-sequence event's item: parked (too large, not UTF-8, unknown type) or applied."""
    if len(env.payload) > max_bytes:
        reason = f"payload of {len(env.payload)} bytes exceeds max_bytes={max_bytes}"
        return Item("park", d, _stored(env), reason)
    try:
        stored = env.to_stored()
    except EnvelopeError as exc:
        return Item("park", d, _stored(env), str(exc))
    if known is not None and not known(env.type):
        reason = (
            f"unknown event type {env.type!r} (schema {env.schema_version}): not registered "
            "in this process's event types"
        )
        return Item("park", d, stored, reason)
    return Item("apply", d, stored)


# -- parked messages -----------------------------------------------------------------------


def _wire(delivery: Delivery, max_bytes: int) -> tuple[str, str]:
    headers: dict[str, str] = {}
    for k, v in list(delivery.headers.items())[:_MAX_HEADERS]:
        key = k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)
        value = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        headers[key[:256]] = value[:4096]
    body = base64.b64encode(bytes(delivery.body[:max_bytes])).decode("ascii")
    return json.dumps(headers, sort_keys=True), body


def unwire(headers: str, body: str) -> tuple[dict[str, str], bytes]:
    """The (headers, body) of a parked message as stored by :func:`save_message`."""
    return dict(json.loads(headers)), base64.b64decode(body)


async def save_message(
    session: Session,
    name: str,
    generation: int,
    position: int,
    partition: int,
    delivery: Delivery,
    max_bytes: int,
) -> None:
    """Keep a parked message's wire form, so a retry needs neither the log nor the broker."""
    headers, body = _wire(delivery, max_bytes)
    await session.execute(
        "INSERT INTO cqrskit_parked_messages (projection, generation, position, partition, "
        "headers, body) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (projection, generation, position) DO NOTHING",
        name,
        generation,
        position,
        partition,
        headers,
        body,
    )


async def reject(
    session: Session,
    name: str,
    generation: int,
    partition: int,
    delivery: Delivery,
    reason: str,
    max_bytes: int,
) -> None:
    """Park an untrusted message under a synthetic negative position (it has no trusted
    one): listed by ``dead-letters``, never blocking a stream."""
    position = -(secrets.randbits(52) + 1)
    await session.execute(
        "INSERT INTO cqrskit_dead_letters (projection, generation, position, stream, "
        "version, type, error, attempts, parked_at) VALUES (?, ?, ?, '', 0, ?, ?, 1, ?)",
        name,
        generation,
        position,
        REJECTED_TYPE,
        reason[:_MAX_ERROR],
        time.time(),
    )
    await save_message(session, name, generation, position, partition, delivery, max_bytes)
