"""Inline mode: projections applied inside the command's transaction (one database).

The write side calls an inline hook after appending a command's events and before COMMIT;
the hook applies them to the read-model tables through the command's own connection and
raises the checkpoint there too. A read model kept this way is never stale, and a handler
error fails the command (nothing is parked in this mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cqrskit.errors import ConfigurationError
from cqrskit.eventlog import EventStore, StoredEvent
from cqrskit.projections import schema
from cqrskit.projections.api import Projection
from cqrskit.projections.apply import Applier
from cqrskit.projections.db import ReadDatabase

__all__ = ["InlineProjections"]


class InlineProjections:
    """Runs projections inline in the write transaction.

    Args:
        read_db: a read database on the *write* database (same SQLite file or PostgreSQL
            database); used to set the tables up and to wrap the command's connection.
        projections: the projections to apply inline.
        decoder: stored event -> event.

    Usage::

        inline = InlineProjections(read_db, [balances], decoder)
        await inline.setup()
        inline.attach(store)     # store.add_inline_hook(inline.hook)
    """

    def __init__(
        self, read_db: ReadDatabase, projections: Sequence[Projection], decoder: Any
    ) -> None:
        self.read_db = read_db
        self.projections = tuple(projections)
        self._appliers = [Applier(p, decoder) for p in self.projections]
        self._generations: dict[str, int] | None = None

    async def setup(self, store: EventStore | None = None) -> None:
        """Create the bookkeeping and the tables; mark the projections ``inline``.

        Given the ``store``, also check that each projection is caught up with the log
        (needed when moving a projection from async to inline: events between its
        checkpoint and the head would otherwise never be applied).

        Raises:
            ConfigurationError: a rebuild is in progress, or the projection lags the log.
        """
        head = await store.last_position() if store is not None else None
        generations: dict[str, int] = {}
        async with self.read_db.transaction() as s:
            for p in self.projections:
                row = await schema.ensure_projection(s, p, "inline")
                if row.building_generation is not None:
                    raise ConfigurationError(
                        f"projection {p.name!r} is being rebuilt asynchronously; it cannot "
                        "run inline until the rebuild switched over.",
                        hint="let the projector finish the rebuild, then switch to inline.",
                    )
                generations[p.name] = row.active_generation
                if head is not None:
                    checkpoint = await schema.get_checkpoint(s, p.name, row.active_generation)
                    if checkpoint < head:
                        raise ConfigurationError(
                            f"projection {p.name!r} is at {checkpoint}, behind the log "
                            f"({head}); running it inline now would skip those events.",
                            hint="let its projector catch up (lag 0), stop it, then switch.",
                        )
        self._generations = generations

    def attach(self, store: Any) -> None:
        """Register :meth:`hook` with the store (``store.add_inline_hook``)."""
        store.add_inline_hook(self.hook)

    async def hook(self, uow: Any, stored_events: Sequence[StoredEvent]) -> None:
        """Apply ``stored_events`` inside the command's transaction."""
        generations = self._generations
        if generations is None:
            raise ConfigurationError(
                "InlineProjections.hook ran before setup().",
                hint="await inline.setup() when the application starts.",
            )
        if not stored_events:
            return
        session = self.read_db.inline(uow.connection)
        # on a server (PostgreSQL) the events' writes go together (round trips); on SQLite
        # they run as issued: no round trip to save, and a handler may catch its own
        # statement's error
        batched = session.flavor.batches_statements
        last = max(e.position for e in stored_events)
        for applier in self._appliers:
            name = applier.projection.name
            generation = generations[name]
            ctx = applier.context(session, generation, batched=batched)
            for stored in stored_events:
                await applier.apply_one(ctx, stored)
            # with the handlers' statements: one round trip on PostgreSQL
            await schema.set_checkpoint(ctx.session, name, generation, last)
            await applier.flush(ctx)
