"""Recognizing infrastructure faults in an exception chain, without importing a driver.

HTTP integrations answer these differently from application errors: a database that cannot
be reached, lost its connection or has no free connection is a 503 with ``Retry-After``
(retrying later can succeed); a read-model table that does not exist is an operator's
missing setup step. Drivers are recognized by attributes and text (``sqlstate``, the
``sqlite3.OperationalError`` wording, class names), as :func:`cqrskit.pipeline.is_transient`
does, so nothing here imports asyncpg, psycopg or SQLAlchemy.
"""

from __future__ import annotations

import errno
import re

from cqrskit.errors import (
    CqrsError,
    DispatchTimeoutError,
    ReadModelMissingError,
    UnavailableError,
)

__all__ = ["missing_table", "unavailable"]

_MAX_CHAIN = 16
# class 08: connection exception; 53: insufficient resources (53300 too_many_connections);
# 57P01-57P03: admin/crash shutdown, cannot connect now
_UNAVAILABLE_SQLSTATE = re.compile(r"^(08...|53...|57P0[123])$")
_UNAVAILABLE_ERRNO = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
        errno.EPIPE,
    }
)
_SQLITE_UNAVAILABLE = ("database is locked", "unable to open database file", "disk i/o error")
_CLOSED_TEXT = ("connection is closed", "pool is closed", "pool is closing", "not connected")
_SQLITE_MISSING = re.compile(r"^no such table: (?P<table>\S+)")
_PG_MISSING = re.compile(r'relation "(?P<table>[^"]+)" does not exist')


def _chain(error: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and len(out) < _MAX_CHAIN and seen not in out:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


def _unavailable_one(error: BaseException) -> bool:
    if isinstance(error, UnavailableError):
        return True
    if isinstance(error, DispatchTimeoutError):
        return False  # the handler ran out of time: a 504 with an unknown outcome
    if isinstance(error, CqrsError):
        return False  # a translated error says itself what it is; its cause may say more
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    if isinstance(error, OSError) and error.errno in _UNAVAILABLE_ERRNO:
        return True
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if isinstance(code, str) and _UNAVAILABLE_SQLSTATE.match(code):
        return True
    name = type(error).__name__
    text = str(error).lower()
    if name == "OperationalError" and any(t in text for t in _SQLITE_UNAVAILABLE):
        return True
    if name in ("TimeoutError", "DisconnectionError"):  # SQLAlchemy: pool exhausted, lost
        return True
    if name == "InternalClientError" and text.startswith("cannot switch to state"):
        # asyncpg, on a session that read the server's goodbye (shutdown, terminated,
        # idle timeout) while idle: the statement was refused before it was sent
        return True
    return name == "InterfaceError" and any(t in text for t in _CLOSED_TEXT)


def unavailable(error: BaseException) -> bool:
    """Whether ``error`` (or a cause in its chain) says a database cannot be reached, lost
    its connection, or has no free connection — a fault that retrying later can cure."""
    return any(_unavailable_one(e) for e in _chain(error))


def missing_table(error: BaseException) -> str | None:
    """The read-model table ``error`` (or a cause) says does not exist, or ``None``."""
    for e in _chain(error):
        if isinstance(e, ReadModelMissingError):
            return e.table
        text = str(e)
        if type(e).__name__ == "OperationalError":
            m = _SQLITE_MISSING.match(text)
            if m:
                return m.group("table")
        if getattr(e, "sqlstate", None) == "42P01" or getattr(e, "pgcode", None) == "42P01":
            m = _PG_MISSING.search(text)
            return m.group("table") if m else "?"
    return None
