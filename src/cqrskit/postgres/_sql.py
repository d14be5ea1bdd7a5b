"""PostgreSQL SQL text: the event-log DDL and the literal rendering of event rows.

Events ride in the COMMIT's query string as SQL literals (see :mod:`cqrskit.postgres.eventlog`),
so rendering them safely is this module's whole job: escape-string literals with backslashes
and quotes doubled mean the same whatever ``standard_conforming_strings`` a session sets, and
so does a plain literal of a value with nothing to escape (ASCII, no quote, no backslash,
no NUL), the commonest case.
"""

from __future__ import annotations

from cqrskit.errors import (
    PersistenceError,
)
from cqrskit.eventlog import (
    validate_identifier,
)

SCHEMA_VERSION = 1
"""Version of the event-log table layout this module writes."""

_CONFLICT_STATE = "CQ409"
_NO_SUCH_STATEMENT = "26000"  # invalid_sql_statement_name: EXECUTE of an unknown statement
_MAX_PER_TX = 1 << 20


def postgres_ddl(schema: str = "public", table: str = "cqrskit_events") -> str:
    """The DDL for the event log in ``schema`` (for users who run their own migrations).

    Raises:
        ConfigurationError: ``schema`` or ``table`` is not a valid identifier.
    """
    s = validate_identifier(schema, "schema name")
    t = validate_identifier(table, "table name")
    fn = validate_identifier(f"{table}_conflict"[:63], "function name")
    nv = validate_identifier(f"{table}_next_version"[:63], "function name")
    idx = validate_identifier(f"{table}_stream_version"[:63], "index name")
    return f"""CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.{t} (
    position bigint PRIMARY KEY,
    stream text NOT NULL,
    version integer NOT NULL,
    type text NOT NULL,
    schema_version integer NOT NULL,
    data text NOT NULL,
    message_id text NOT NULL,
    correlation_id text,
    causation_id text,
    recorded_at timestamptz NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS {idx} ON {s}.{t} (stream, version);
CREATE OR REPLACE FUNCTION {s}.{fn}(
    stream text, expected integer, actual integer, reason text
) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'cqrskit: stream % is at version %, expected %', stream, actual, expected
        USING ERRCODE = '{_CONFLICT_STATE}', DETAIL = actual::text, HINT = reason;
END $$;
CREATE OR REPLACE FUNCTION {s}.{nv}(
    p_stream text, p_expected integer, p_base bigint
) RETURNS integer LANGUAGE plpgsql STABLE AS $$
DECLARE
    v integer;
    p bigint;
BEGIN
    SELECT e.version, e.position INTO v, p FROM {s}.{t} e
        WHERE e.stream = p_stream ORDER BY e.version DESC LIMIT 1;
    v := coalesce(v, 0);
    IF p >= p_base THEN
        RETURN {s}.{fn}(p_stream, p_expected, v, 'younger');
    END IF;
    IF p_expected IS NOT NULL AND p_expected <> v THEN
        RETURN {s}.{fn}(p_stream, p_expected, v, 'expected');
    END IF;
    RETURN v + 1;
END $$;
CREATE TABLE IF NOT EXISTS {s}."cqrskit_schema" (
    name text PRIMARY KEY,
    version integer NOT NULL
);
INSERT INTO {s}."cqrskit_schema" (name, version) VALUES ('{table}', {SCHEMA_VERSION})
    ON CONFLICT (name) DO NOTHING;
"""


def _literal(value: str) -> str:
    """``value`` as a string literal that means the same whatever
    ``standard_conforming_strings`` a session has set: plain ``'...'`` when there is nothing
    to escape (ASCII, no quote, no backslash: read the same under either setting), else an
    escape-string literal, ``E'...'`` with backslashes and quotes doubled."""
    if (
        type(value) is str
        and value.isascii()
        and "'" not in value
        and "\\" not in value
        and "\x00" not in value
    ):
        return "'" + value + "'"
    return _escaped(value)


def _escaped(value: str) -> str:
    """``value`` as an escape-string literal (see :func:`_literal`), or the error that
    says why it cannot be stored."""
    if type(value) is not str:
        raise PersistenceError(
            f"cannot store a {type(value).__name__} in a text column of the event log.",
            hint="stream ids, event types and metadata ids must be strings.",
        )
    if "\x00" in value:
        raise PersistenceError(
            "a NUL character cannot be stored in a PostgreSQL text column.",
            hint="remove NUL characters from event data and stream ids.",
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PersistenceError(
                "a string with a lone surrogate cannot be stored as UTF-8.",
                hint="remove unpaired surrogates from event data and stream ids.",
            ) from exc
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


_XID_NOTICE = "cqrskit-xid "
# sent before COMMIT when the caller wants the positions: the notice carries the writing
# transaction's id, from which the positions follow ((xid << 20) + n); SET LOCAL makes sure
# a client_min_messages above NOTICE does not swallow it
_SQL_REPORT_XID = (
    "SET LOCAL client_min_messages = notice; "
    f"DO $$BEGIN RAISE NOTICE '{_XID_NOTICE}%', pg_current_xact_id(); END$$; "
)


def _nullable(value: str | None) -> str:
    return "NULL" if value is None else _literal(value)


def _parse_conflict(exc: Exception) -> tuple[str, int, int | None]:
    text = str(getattr(exc, "message", exc))
    prefix = "cqrskit: stream "
    body = text[len(prefix) :] if text.startswith(prefix) else text
    stream, _, rest = body.rpartition(" is at version ")
    actual_s, _, expected_s = rest.partition(", expected ")
    try:
        actual = int(getattr(exc, "detail", None) or actual_s)
    except ValueError:
        actual = -1
    expected = int(expected_s) if expected_s.strip().lstrip("-").isdigit() else None
    return stream, actual, expected


def _stream_from_detail(detail: str) -> str | None:
    # "Key (stream, version)=(acc-1, 3) already exists."
    start = detail.find(")=(")
    end = detail.rfind(", ")
    if start < 0 or end < start:
        return None
    return detail[start + 3 : end]
