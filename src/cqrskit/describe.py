"""Describe an application as a graph: messages, handlers, events and projections.

``describe_text(registry)`` lists every route; ``describe_mermaid(registry)`` draws the same as
a Mermaid flowchart (command → handler → event → event handler / projection → read model ←
query). Projections are anything with a ``name`` and either ``event_types`` or a
``handles()`` method returning event classes, and optionally ``tables``; edges from command
handlers to the events they emit come from the ``emits`` mapping, which an application can
fill by hand or from the event log (see docs/debugging.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cqrskit.errors import describe as qualname
from cqrskit.registry import Registry

__all__ = ["Graph", "describe_mermaid", "describe_text", "graph_of"]


@dataclass(frozen=True)
class Graph:
    """Nodes and edges of an application.

    Attributes:
        nodes: node id → (kind, label); kinds: command, query, event, handler, projection,
            table.
        edges: (from id, to id, label) triples.
    """

    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, kind: str, label: str) -> str:
        """Add (or find) a node and return its id."""
        node_id = f"{kind}_{re.sub(r'[^A-Za-z0-9_]', '_', label)}"
        self.nodes.setdefault(node_id, (kind, label))
        return node_id

    def link(self, src: str, dst: str, label: str = "") -> None:
        """Add an edge once."""
        edge = (src, dst, label)
        if edge not in self.edges:
            self.edges.append(edge)


def _short(tp: Any) -> str:
    return getattr(tp, "__qualname__", None) or getattr(tp, "__name__", None) or repr(tp)


def _projection_events(projection: Any) -> Iterable[type]:
    events = getattr(projection, "event_types", None)
    if events is None and callable(getattr(projection, "handles", None)):
        events = projection.handles()
    return list(events or ())


def graph_of(
    registry: Registry,
    *,
    projections: Sequence[Any] = (),
    emits: Mapping[type, Iterable[type]] | None = None,
    reads: Mapping[type, Iterable[str]] | None = None,
) -> Graph:
    """Build the graph of ``registry`` (plus projections, emitted events and read models).

    Args:
        projections: projection objects (``name``, ``event_types``/``handles()``, ``tables``).
        emits: command type → event types its handler records.
        reads: query type → names of the projections (or tables) it reads.
    """
    graph = Graph()
    for mtype, spec in sorted(registry.commands().items(), key=lambda kv: _short(kv[0])):
        c = graph.add("command", _short(mtype))
        h = graph.add("handler", qualname(spec.owner))
        graph.link(c, h)
        for event in (emits or {}).get(mtype, ()):
            graph.link(h, graph.add("event", _short(event)), "records")
    for mtype, specs in sorted(registry.events().items(), key=lambda kv: _short(kv[0])):
        e = graph.add("event", _short(mtype))
        for spec in specs:
            graph.link(e, graph.add("handler", qualname(spec.owner)))
    projection_names: set[str] = set()
    for projection in projections:
        name = str(getattr(projection, "name", _short(type(projection))))
        projection_names.add(name)
        p = graph.add("projection", name)
        for event in _projection_events(projection):
            graph.link(graph.add("event", _short(event)), p)
        for table in getattr(projection, "tables", ()) or ():
            graph.link(p, graph.add("table", str(table)), "writes")
    for mtype, spec in sorted(registry.queries().items(), key=lambda kv: _short(kv[0])):
        q = graph.add("query", _short(mtype))
        h = graph.add("handler", qualname(spec.owner))
        graph.link(q, h)
        for source in (reads or {}).get(mtype, ()):
            kind = "projection" if source in projection_names else "table"
            graph.link(graph.add(kind, source), h, "read by")
    return graph


def describe_text(registry: Registry, **options: Any) -> str:
    """Routes as plain text, one line per edge, grouped by source kind."""
    graph = graph_of(registry, **options)
    lines: list[str] = []
    order = ["command", "query", "event", "handler", "projection", "table"]
    for kind in order:
        edges = [e for e in graph.edges if graph.nodes[e[0]][0] == kind]
        if not edges:
            continue
        lines.append("queries:" if kind == "query" else f"{kind}s:")
        for src, dst, label in edges:
            arrow = f" -[{label}]-> " if label else " -> "
            dkind, dlabel = graph.nodes[dst]
            lines.append(f"  {graph.nodes[src][1]}{arrow}{dlabel} ({dkind})")
    return "\n".join(lines) + ("\n" if lines else "")


_SHAPES = {
    "command": ('["', '"]'),
    "query": ('["', '"]'),
    "event": ('(["', '"])'),
    "handler": ('("', '")'),
    "projection": ('[["', '"]]'),
    "table": ('[("', '")]'),
}


def describe_mermaid(registry: Registry, **options: Any) -> str:
    """The graph as a Mermaid ``flowchart LR`` block (paste into Markdown)."""
    graph = graph_of(registry, **options)
    lines = ["flowchart LR"]
    for node_id, (kind, label) in graph.nodes.items():
        left, right = _SHAPES[kind]
        safe = label.replace('"', "'")
        lines.append(f"    {node_id}{left}{kind}: {safe}{right}")
    for src, dst, label in graph.edges:
        lines.append(f"    {src} -->|{label}| {dst}" if label else f"    {src} --> {dst}")
    return "\n".join(lines) + "\n"
