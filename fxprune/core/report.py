"""Inspection: group tables (tabulate), networkx graphs and DOT pictures.

networkx and tabulate are imported here only; the core analysis does not need them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fxprune.core.groups import ChannelGroup, GroupAnalysis, Pin


def analysis_table(analysis: "GroupAnalysis", *, max_members: int = 4,
                   tablefmt: str = "simple") -> str:
    """One row per group: id, name, size, granularity, exact, members, coupling nodes."""
    from tabulate import tabulate

    rows = []
    for g in analysis.groups:
        shown = [f"{m.fqn}[{m.dim}]:{m.role}" for m in g.members[:max_members]]
        more = len(g.members) - len(shown)
        exact = "yes" if g.exact else f"no ({g.inexact_kind or 'mixer'})"
        rows.append((g.id, g.name, g.size, g.granularity, exact,
                     len(g.members), ", ".join(shown) + (f" +{more}" if more > 0 else ""),
                     len(g.merged_by)))
    head = ["id", "group", "units", "gran", "exact", "#slices", "slices", "#merges"]
    table = tabulate(rows, headers=head, tablefmt=tablefmt)
    footer = "\n".join(filter(None, [ties_footer(analysis), count_ties_footer(analysis),
                                     *analysis.notes]))
    return table + ("\n" + footer if footer else "")


def count_ties_footer(analysis: "GroupAnalysis") -> str:
    """The reshapes whose size is read off another group's width, per leader ('' when none)."""
    if not analysis.count_ties:
        return ""
    tied: dict[tuple[str, str, str], list[str]] = {}
    for t in analysis.count_ties:
        tied.setdefault((t.leader or "several groups", t.follower or "several groups",
                         t.why), []).append(t.node)
    lines = [f"  {follow} follows {lead}: {', '.join(nodes[:4])}"
             f"{' ...' if len(nodes) > 4 else ''}" + (f" (held whole: {why})" if why else "")
             for (lead, follow, why), nodes in tied.items()]
    return ("count ties (a reshape size read off another group's width): default plans "
            "make the follower keep what the leader's count implies "
            "(fxprune.core.count_ties)\n" + "\n".join(lines))


def ties_footer(analysis: "GroupAnalysis") -> str:
    """The chunk / split(int) nodes whose equal pieces tie each group ('' when none)."""
    if not analysis.split_ties:
        return ""
    tied = {}
    for t in analysis.split_ties:
        tied.setdefault(t.groups if len(t.groups) > 1 else t.groups[0], []).append(t.node)
    lines = [f"  {g if isinstance(g, str) else ' + '.join(g) + ' (untied)'}: "
             f"{', '.join(nodes[:4])}{' ...' if len(nodes) > 4 else ''}"
             for g, nodes in tied.items()]
    return ("equal pieces (chunk / split(int)): default plans keep the same count "
            "in each piece of a group's ties (fxprune.core.ties)\n" + "\n".join(lines))


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


def find_pins(analysis: "GroupAnalysis") -> tuple["Pin", ...]:
    """Pins of every parameter (and tracked buffer) dim, in graph order of their tensors.

    A tracked dim is pinned where its labels are -1; its reasons come from the analysis
    (``"node: why"``). A parameter no rule ever read (it lives inside a module without a
    rule, or is computed from in forward) is listed on dim 0 with the module's node.
    """
    import numpy as np

    from fxprune.core.groups import Pin

    gm = analysis.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    out: list[Pin] = []
    seen: set[str] = set()
    for (fqn, dim), labels in analysis.tensor_labels.items():
        seen.add(fqn)
        pinned = int((np.asarray(labels) < 0).sum())
        if not pinned:
            continue
        reasons = analysis.pin_reasons.get((fqn, dim), ())
        if not reasons:
            reasons = (f"{fqn}[{dim}]: its channels belong to no group (a fixed size, or "
                       "units shared with an untracked tensor)",)
        out.append(_pin(fqn, dim, pinned, len(labels), reasons, nodes))
    aliased = {a for names in analysis.tensor_aliases.values() for a in names}
    for fqn, t in gm.named_parameters():
        if fqn in seen or fqn in aliased or t.dim() == 0 or t.shape[0] <= 1:
            continue
        node = _reader(gm, fqn)
        if node is None:
            why = "not read by the traced graph"
        elif node.op == "call_module":
            why = (f"inside module '{node.target}' ({type(gm.get_submodule(node.target)).__name__}),"
                   " which has no rule (a barrier); register one or trace through it")
        else:
            why = f"read by {node.op} {getattr(node.target, '__name__', node.target)}, " \
                  "which no rule slices (e.g. a weight computed in forward)"
        name = node.name if node is not None else ""
        out.append(_pin(fqn, 0, int(t.shape[0]), int(t.shape[0]),
                        (f"{name}: {why}" if name else why,), nodes))
    known = seen | {f for f, _ in gm.named_parameters(remove_duplicate=False)}
    for mode in analysis.other_modes:  # tensors only another mode's graph reads (aux heads)
        out.extend(p for p in find_pins(mode.analysis) if p.fqn not in known)
    return tuple(out)


def _reader(gm, fqn: str):
    """The first node that reads ``fqn``: its get_attr, or the call_module that owns it."""
    owner = None
    for n in gm.graph.nodes:
        if n.op == "get_attr" and (n.target == fqn or fqn.startswith(n.target + ".")):
            users = list(n.users)
            return users[0] if users else n
        if n.op == "call_module" and fqn.startswith(n.target + ".") and owner is None:
            owner = n
    return owner


def _pin(fqn: str, dim: int, pinned: int, size: int, reasons: tuple[str, ...],
         nodes: dict) -> "Pin":
    from fxprune.core.errors import source_line
    from fxprune.core.groups import Pin

    first = reasons[0]
    name, _, why = first.partition(": ")
    node = nodes.get(name)
    if node is None:
        name, why = "", first
    return Pin(fqn, dim, pinned, size, why, name, source_line(node) if node is not None else "",
               tuple(reasons))


def pins_table(analysis: "GroupAnalysis", *, tablefmt: str = "simple") -> str:
    """One row per pinned parameter dim: how much is pinned, why, node, source line."""
    from tabulate import tabulate

    rows = [(f"{p.fqn}[{p.dim}]", "all" if p.whole else f"{p.pinned}/{p.size}", p.reason,
             p.node, p.source) for p in analysis.pins()]
    return tabulate(rows, headers=["parameter dim", "pinned", "reason", "node", "source"],
                    tablefmt=tablefmt)
