"""Inspection: group tables (tabulate), networkx graphs and DOT pictures.

networkx and tabulate are imported here only; the core analysis does not need them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fxprune.groups import ChannelGroup, GroupAnalysis


def analysis_table(analysis: "GroupAnalysis", *, max_members: int = 4,
                   tablefmt: str = "simple") -> str:
    """One row per group: id, name, size, granularity, exact, members, coupling nodes."""
    from tabulate import tabulate

    rows = []
    for g in analysis.groups:
        shown = [f"{m.fqn}[{m.dim}]:{m.role}" for m in g.members[:max_members]]
        more = len(g.members) - len(shown)
        rows.append((g.id, g.name, g.size, g.granularity, "yes" if g.exact else "no",
                     len(g.members), ", ".join(shown) + (f" +{more}" if more > 0 else ""),
                     len(g.merged_by)))
    head = ["id", "group", "units", "gran", "exact", "#slices", "slices", "#merges"]
    return tabulate(rows, headers=head, tablefmt=tablefmt)


def group_graph(group: "ChannelGroup"):
    """DiGraph: FX nodes carrying the group (data edges), the consumer nodes that read it
    (``consumer=True``: their input columns are sliced, their output is another space) and
    parameter slices (``param`` edges to the node whose op uses them)."""
    import networkx as nx

    g = nx.DiGraph(group=group.name, size=group.size, exact=group.exact)
    for name in group.nodes:
        g.add_node(name, kind="node", coupling=name in group.merged_by)
    for _, user in group.slice_users:
        if user not in g:  # a consumer: it reads the group's channels, its output is
            g.add_node(user, kind="node", coupling=False, consumer=True)  # another space
    g.add_edges_from(group.edges, kind="data")
    for m in group.members:
        g.add_node(f"{m.fqn}[{m.dim}]", kind="slice", role=m.role, fqn=m.fqn, dim=m.dim,
                   index_map=m.index_map)
    g.add_edges_from(group.slice_users, kind="param")
    return g


def analysis_graph(analysis: "GroupAnalysis"):
    """Group graph: one node per group, an edge where a parameter is sliced by both."""
    import networkx as nx

    g = nx.Graph()
    by_fqn: dict[str, list[int]] = {}
    for grp in analysis.groups:
        g.add_node(grp.id, name=grp.name, size=grp.size, exact=grp.exact)
        for m in grp.members:
            by_fqn.setdefault(m.fqn, []).append(grp.id)
    for fqn, ids in by_fqn.items():
        for a in ids:
            for b in ids:
                if a < b:
                    g.add_edge(a, b, shared=fqn)
    return g


def group_dot(group: "ChannelGroup") -> str:
    """Graphviz DOT text of ``group_graph`` (render with ``dot -Tsvg``)."""
    graph = group_graph(group)
    colors = {"out": "palegreen", "in": "lightsalmon", "dep": "lightblue"}
    lines = [f'digraph "{group.name}" {{', "  rankdir=TB; node [fontname=Helvetica];",
             f'  label="group {group.id}: {group.name} ({group.size} units, '
             f'{"exact" if group.exact else "inexact"})";']
    for node, data in graph.nodes(data=True):
        if data["kind"] == "slice":
            lines.append(f'  "{node}" [shape=box, style=filled, fillcolor={colors[data["role"]]}, '
                         f'label="{node}\\n{data["role"]}, {data["index_map"]}"];')
        else:
            shape = "diamond" if data.get("coupling") else "ellipse"
            style = ", style=dashed" if data.get("consumer") else ""
            lines.append(f'  "{node}" [shape={shape}{style}];')
    for a, b, data in graph.edges(data=True):
        style = "dashed" if data.get("kind") == "param" else "solid"
        lines.append(f'  "{a}" -> "{b}" [style={style}];')
    lines.append("}")
    return "\n".join(lines)


def explain(group: "ChannelGroup") -> str:
    """Plain-text provenance: where the group was born, what merged it, what limits it."""
    parts = [f"group {group.id} ({group.name}): {group.size} units x {group.granularity}",
             f"  born at: {group.origin}"]
    if group.merged_by:
        parts.append("  coupled by: " + ", ".join(group.merged_by))
    if group.inexact_because:
        parts.append("  inexact because: " + "; ".join(group.inexact_because))
    if group.pinned_because:
        parts.append("  some units pinned: " + "; ".join(group.pinned_because[:5]))
    return "\n".join(parts)
