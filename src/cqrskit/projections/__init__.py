"""Read side: projections, checkpoints, consistency tokens, rebuilds and dead letters.

One :class:`Projection` (a named set of event handlers maintaining read-model tables) runs
either inline (:class:`InlineProjections`, inside the command's transaction) or
asynchronously (:class:`Projector`, tailing the event log into the same or another
database; :class:`PartitionedProjector` splits that work into partitions shared by worker
processes). Queries read through a read-only :class:`Session` and can wait for a command's
consistency token with :func:`read_after` / :func:`ask_consistent` and the
:class:`ConsistencyGate` behavior. See ``docs/projections.md``.
"""

from typing import Any

from cqrskit.projections.api import Decoder, Projection, ProjectionContext, physical_table
from cqrskit.projections.consistency import (
    ConsistencyGate,
    ConsistentRead,
    Policy,
    ReadAfter,
    ReadSpec,
    TokenRequest,
    ask_consistent,
    current_read_after,
    read_after,
    read_spec,
    reads,
)
from cqrskit.projections.db import ReadDatabase, Session, SqlFlavor
from cqrskit.projections.inline import InlineProjections
from cqrskit.projections.partitioned import PartitionedProjector
from cqrskit.projections.partitions import PartitionStatus, partition_status
from cqrskit.projections.runner import LeaseLostError, Projector
from cqrskit.projections.signal import Signal
from cqrskit.projections.status import (
    DeadLetter,
    ProjectionStatus,
    RebuildProgress,
    cancel_rebuild,
    dead_letters,
    projection_status,
    rebuild_progress,
    request_rebuild,
    request_retry,
)

ReadSession = Session
"""The type query handlers annotate to receive a read-only session (a scoped dependency)."""

__all__ = [
    "ConsistencyGate",
    "ConsistentRead",
    "DeadLetter",
    "Decoder",
    "InlineProjections",
    "LeaseLostError",
    "PartitionStatus",
    "PartitionedProjector",
    "Policy",
    "Projection",
    "ProjectionContext",
    "ProjectionStatus",
    "Projector",
    "ReadAfter",
    "ReadDatabase",
    "ReadSession",
    "ReadSpec",
    "RebuildProgress",
    "Session",
    "Signal",
    "SqlFlavor",
    "TokenRequest",
    "ask_consistent",
    "cancel_rebuild",
    "current_read_after",
    "dead_letters",
    "partition_status",
    "physical_table",
    "projection_status",
    "read_after",
    "read_spec",
    "reads",
    "rebuild_progress",
    "request_rebuild",
    "request_retry",
]


def __getattr__(name: str) -> Any:
    # SqliteReadDatabase lives in cqrskit.sqlite (one package per technology); the import
    # path of earlier releases keeps working without this package importing a driver
    if name == "SqliteReadDatabase":
        import importlib

        return importlib.import_module("cqrskit.sqlite").SqliteReadDatabase

    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
