"""A small FastAPI application on SQLite with an async projection, for the HTTP tests.

The projection can be held (``harness.release.clear()``) so a test can see the read model
lag behind a command and then catch up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel

from cqrskit import (
    Command,
    Dependencies,
    Event,
    FieldError,
    Mediator,
    NotFoundError,
    PersistenceError,
    Query,
    Registry,
)
from cqrskit.eventlog import UnitOfWork
from cqrskit.fastapi import CqrsDep, MediatorDep, Problem, install
from cqrskit.pipeline import AuthorizationBehavior, ValidationBehavior, allow_all, for_queries
from cqrskit.projections import (
    ConsistencyGate,
    Projection,
    ProjectionContext,
    Projector,
    ReadSession,
    reads,
)
from cqrskit.serialization import EventTypes, JsonSerializer
from cqrskit.sqlite import SqliteEventStore, SqliteReadDatabase

event_types = EventTypes()


@event_types.register("note.added")
@dataclass(frozen=True, slots=True)
class NoteAdded(Event):
    stream: str
    text: str


@dataclass(frozen=True, slots=True)
class AddNote(Command[int]):
    stream: str
    text: str
    author: str = "ada"
    expected_version: int | None = None


@reads("notes", policy="wait", timeout=5.0)
@dataclass(frozen=True, slots=True)
class ListNotes(Query[list[str]]):
    stream: str


@reads("notes", policy="fail")
@dataclass(frozen=True, slots=True)
class ListNotesNow(Query[list[str]]):
    stream: str


@reads("notes", policy="stale", timeout=0.0)
@dataclass(frozen=True, slots=True)
class ListNotesAnyway(Query[list[str]]):
    stream: str


@dataclass(frozen=True, slots=True)
class Lookup(Query[str]):
    key: str


@dataclass(frozen=True, slots=True)
class Explode(Command[None]):
    pass


@dataclass(frozen=True, slots=True)
class Secret(Query[str]):
    pass


@dataclass(frozen=True, slots=True)
class Refuse(Command[None]):
    pass


class QuotaExceeded(Exception):
    """A domain error the app maps to 429 itself."""


registry = Registry()


@registry.handler
async def add_note(cmd: AddNote, uow: UnitOfWork) -> int:
    uow.record(cmd.stream, NoteAdded(cmd.stream, cmd.text), expected_version=cmd.expected_version)
    return len(uow.recorded)


@registry.handler
async def list_notes(q: ListNotes, session: ReadSession) -> list[str]:
    rows = await session.fetchall("SELECT text FROM notes WHERE stream = ? ORDER BY pos", q.stream)
    return [str(r[0]) for r in rows]


@registry.handler
async def list_notes_now(q: ListNotesNow, session: ReadSession) -> list[str]:
    return await list_notes(ListNotes(q.stream), session)


@registry.handler
async def list_notes_anyway(q: ListNotesAnyway, session: ReadSession) -> list[str]:
    return await list_notes(ListNotes(q.stream), session)


@registry.handler
async def lookup(q: Lookup) -> str:
    raise NotFoundError(f"no note called {q.key!r}", message_type=Lookup)


@registry.handler
async def explode(cmd: Explode) -> None:
    raise PersistenceError("connect to postgres://admin:hunter2@db.internal failed")


@registry.handler
async def secret(q: Secret) -> str:
    return "the vault code"


@registry.handler
async def refuse(cmd: Refuse) -> None:
    raise QuotaExceeded("you have used all 3 notes of your plan")


def check_note(cmd: AddNote) -> list[FieldError]:
    errors = []
    if not cmd.text.strip():
        errors.append(FieldError("text", "must not be blank"))
    if cmd.author != cmd.author.lower():
        errors.append(FieldError("author", "must be lower case"))
    return errors


class NoteBody(BaseModel):
    text: str
    author: str = "ada"
    expected_version: int | None = None
    twice: bool = False


class Harness:
    """The store, read database, projector and app of one test."""

    def __init__(self, directory: Path, *, lifespan: bool = False) -> None:
        self.release = asyncio.Event()
        self.release.set()
        serializer = JsonSerializer(event_types)
        self.store = SqliteEventStore(directory / "write.db", encoder=serializer.encode)
        self.read_db = SqliteReadDatabase(str(directory / "read.db"))
        notes = Projection(
            "notes",
            tables={
                "notes": (
                    "CREATE TABLE {notes} (pos INTEGER PRIMARY KEY, stream TEXT NOT NULL, "
                    "text TEXT NOT NULL)",
                )
            },
        )
        release = self.release

        @notes.on
        async def added(e: NoteAdded, ctx: ProjectionContext) -> None:
            await release.wait()
            assert ctx.stored is not None
            await ctx.execute(
                f"INSERT INTO {ctx.table('notes')} (pos, stream, text) VALUES (?, ?, ?)",
                ctx.stored.position,
                e.stream,
                e.text,
            )

        self.projector = Projector(self.store, self.read_db, [notes], serializer, lease_ttl=2.0)
        gate = ConsistencyGate(self.store, self.read_db, signal=self.projector.signal)
        deps = Dependencies()
        deps.scoped(ReadSession, self.read_db.session)
        policies = {AddNote: allow_all, ListNotes: allow_all, ListNotesNow: allow_all}
        policies[ListNotesAnyway] = allow_all
        policies.update({Lookup: allow_all, Explode: allow_all, Refuse: allow_all})
        self.mediator = Mediator(
            registry,
            behaviors=[
                AuthorizationBehavior(policies, principal=lambda: None),
                ValidationBehavior({AddNote: check_note}),
                self.store.transaction(),
                for_queries(gate.behavior),
            ],
            resolver=[self.store.resolver(), deps],
        )
        self.app = self._build_app(lifespan)

    async def start(self) -> None:
        await self.projector.start()

    async def stop(self) -> None:
        self.release.set()
        await self.projector.stop()
        await self.read_db.close()
        self.store.close()

    def _build_app(self, lifespan: bool) -> FastAPI:
        @asynccontextmanager
        async def run(app: FastAPI) -> AsyncIterator[None]:
            await self.projector.start()
            try:
                yield
            finally:
                self.release.set()
                await self.projector.stop()

        app = FastAPI(lifespan=run if lifespan else None)
        install(app, self.mediator, problems={QuotaExceeded: Problem(429, "quota", "Quota")})

        @app.post("/notes/{stream}")
        async def post_note(stream: str, body: NoteBody, cqrs: CqrsDep) -> dict[str, int]:
            cmd = AddNote(stream, body.text, body.author, body.expected_version)
            count = await cqrs.send(cmd)
            if body.twice:
                count += await cqrs.send(AddNote(stream, body.text + " (again)", body.author))
            return {"recorded": count}

        @app.get("/notes/{stream}")
        async def get_notes(stream: str, cqrs: CqrsDep) -> list[str]:
            return await cqrs.ask(ListNotes(stream))

        @app.get("/notes/{stream}/now")
        async def get_notes_now(stream: str, cqrs: CqrsDep) -> list[str]:
            return await cqrs.ask(ListNotesNow(stream))

        @app.get("/notes/{stream}/anyway")
        async def get_notes_anyway(stream: str, cqrs: CqrsDep) -> list[str]:
            return await cqrs.ask(ListNotesAnyway(stream))

        @app.get("/lookup/{key}")
        async def get_lookup(key: str, mediator: MediatorDep) -> str:
            return await mediator.ask(Lookup(key))

        @app.post("/explode")
        async def post_explode(cqrs: CqrsDep) -> None:
            await cqrs.send(Explode())

        @app.get("/secret")
        async def get_secret(cqrs: CqrsDep) -> str:
            return await cqrs.ask(Secret())

        @app.post("/refuse")
        async def post_refuse(cqrs: CqrsDep) -> None:
            await cqrs.send(Refuse())

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        return app
