"""The transport port: how the relay hands envelopes to a broker.

A transport knows one thing the relay does not: how to put an envelope on its broker so
that it is stored durably, and how to tell an acknowledgement from a refusal. It is one
class with two methods to implement (:meth:`Transport.publish` and
:meth:`Transport.destination`) plus optional :meth:`Transport.refusal` and
:meth:`Transport.close`, so a Kafka or SQS adapter is one short module.

The contract of :meth:`Transport.publish`:

* messages of one partition reach the broker in the order given;
* it returns only when *every* message is either acknowledged by the broker (stored
  durably, per the broker's settings) or refused for good (too large, no such destination,
  not allowed) — one result per message, ``None`` for acknowledged, the refusal reason
  otherwise;
* a broker that is down, slow past the transport's ack timeout, or that drops the
  connection raises :class:`~cqrskit.errors.BrokerUnavailableError`: the outcome of every
  message in the call is then unknown and the relay publishes the same envelopes again
  (same message ids and sequence numbers) after a back-off;
* it holds at most the messages of the call (a bounded window of outstanding acks inside),
  never an unbounded buffer.

:meth:`Transport.send` is the pipelined form the relay uses to keep a few batches in
flight: it puts the messages on their way and returns a future of the same results. The
base class implements it with :meth:`~Transport.publish` (nothing overlaps); a transport
that overrides it keeps two more promises:

* messages of a later ``send`` reach the broker after those of every earlier one;
* it never opens a new connection while a future of an earlier ``send`` on the old one
  is unresolved or failed: that ``send`` raises
  :class:`~cqrskit.errors.BrokerUnavailableError` instead (once), so a later batch can
  never be stored ahead of an earlier batch's lost tail.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence

from cqrskit.messaging.envelope import Envelope

__all__ = ["Transport"]


class Transport(ABC):
    """A broker adapter used by :class:`~cqrskit.messaging.Relay` (see the module docs).

    Attributes:
        name: short name of the broker, for logs and status (``"nats"``, ``"memory"``...).
        broker_dedup: whether the broker itself drops a republished message id (NATS
            JetStream within its duplicate window); without it, consumers drop duplicates
            by partition sequence.
        max_bytes: the largest payload the transport accepts (``None``: no limit of its
            own); the relay parks larger events before sending them.
    """

    name: str = "transport"
    broker_dedup: bool = False
    max_bytes: int | None = None

    @abstractmethod
    def destination(self, partition: int) -> str:
        """The broker's name for ``partition`` (a subject, routing key or stream key)."""

    @abstractmethod
    async def publish(self, messages: Sequence[Envelope]) -> list[str | None]:
        """Publish ``messages`` in order; one result per message: ``None`` when the broker
        acknowledged it, else why it was refused for good.

        Raises:
            BrokerUnavailableError: the broker could not be reached or did not acknowledge
                in time; the outcome of every message in this call is unknown.
        """

    def refusal(self, envelope: Envelope) -> str | None:
        """Why :meth:`publish` would refuse ``envelope`` without sending it (too large for
        this transport or its broker), or ``None``.

        The relay asks before publishing, so it parks such an event in place: the later
        events of its stream wait behind it instead of reaching the broker first, and the
        partition's sequence stays whole. :meth:`publish` refuses the same envelopes.
        """
        return None

    async def send(self, messages: Sequence[Envelope]) -> asyncio.Future[list[str | None]]:
        """Start publishing ``messages`` and return a future of :meth:`publish`'s results
        (or of its :class:`~cqrskit.errors.BrokerUnavailableError`), without waiting for
        the acknowledgements when the transport can overlap them (see the module docs).

        The caller awaits or cancels every returned future. This default publishes at
        once and returns a finished future.

        Raises:
            BrokerUnavailableError: the messages could not be sent at all.
        """
        future: asyncio.Future[list[str | None]] = asyncio.get_running_loop().create_future()
        future.set_result(await self.publish(messages))
        return future

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Close the broker connection (publish reconnects when called again)."""

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
