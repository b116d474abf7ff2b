"""Rewrite pass: per-unit gates on the edges where a group's channels are consumed.

Requires: a ``GroupAnalysis``.
Ensures: a deep copy of the analysed module with one parameter ``_fxprune_gates`` (one
scalar per global unit label, initialised to ones) and, on every *consumption edge*,
``x * gates[labels]`` along the channel axis. The user's module is never touched (no
hooks). Setting a unit's gate to 0 computes exactly what removing it computes (for
exact groups), and every path that carries the unit into a consumer crosses one gate,
so ``dL/dgate`` is the first-order change of the loss when the unit is removed.

A consumption edge ``u -> v`` for group G: ``u`` carries G's units on an axis that ``v``
sums over and either ``v`` owns an ``"in"`` member of G (conv/linear columns, attention
in-projections) or the axis is contracted with another input (q.k in attention: only the
first operand of each contraction is gated, so that the product sees one gate). Which axes
an op sums over comes from its op entry's ``contractions`` rule; an op without one
consumes every input axis (for its columns) and, otherwise, the groups its output no
longer carries. A contracted axis is consumed even where the same units flow on through
another input (fused qkv under ``split_policy="head_dim"``: q, k and v share units).
Groups consumed inside one node (a node reads their weight columns but no contracted
input carries them: recurrent hidden units, the heads of ``nn.MultiheadAttention`` and of
Swin's window attention) and groups on no graph edge are gated on their source rows
instead (``GatedModel`` scales those parameter slices), never on an edge.

Before/after::

    conv1 = self.conv1(x)                    conv1 = self.conv1(x)
    relu = self.relu(bn1)                    relu = self.relu(bn1)
    conv2 = self.conv2(relu)         ->      _fxprune_gates = self._fxprune_gates
                                             gate = passes.gates.apply_gate(relu, _fxprune_gates, idx, 1)
                                             conv2 = self.conv2(gate)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from fxprune.core.groups import GroupAnalysis
from fxprune.core.errors import RewriteError
from fxprune.core.pipeline import checked_pass, ensure_new_module
from passes.rules.meta import tensor_shapes
from passes.rules.registry import MacContext, iter_units, lookup

__all__ = ["GateSite", "GatedGraph", "GatedModel", "insert_gates", "apply_gate", "GATES"]

GATES = "_fxprune_gates"


def apply_gate(x: torch.Tensor, gates: torch.Tensor, index: torch.Tensor, axis: int
               ) -> torch.Tensor:
    """``x * gates[index]`` along ``axis``; ``index == len(gates)`` means "not gated" (1).

    A gate at exactly 0 selects 0: a removed unit contributes nothing, as its removal
    does, even where its value is nan/inf (``nan * 0`` is nan). The select saves only
    the gate-shaped condition for backward; ``dL/dgate`` of a gate at 0 is then 0."""
    full = torch.cat([gates, gates.new_ones(1)])
    view = [1] * x.dim()
    view[axis] = -1
    g = full[index].reshape(view).to(x.dtype)
    return torch.where(g == 0, 0.0, x * g)


@dataclass(frozen=True)
class GateSite:
    """One gated edge: ``consumer`` reads ``producer``'s ``axis`` through a gate."""

    producer: str
    consumer: str
    axis: int
    groups: tuple[int, ...]


@dataclass(frozen=True)
class GatedGraph:
    """Result of ``insert_gates``: the gated copy, its sites and its parameter gates."""

    gm: torch.fx.GraphModule = field(repr=False)
    sites: tuple[GateSite, ...]
    param_gates: tuple[tuple[str, int, np.ndarray], ...] = field(repr=False)  # fqn, dim, labels
    gated_groups: frozenset[int] = field(repr=False, default=frozenset())

    @property
    def gates(self) -> torch.nn.Parameter:
        return getattr(self.gm, GATES)

    def model(self) -> "GatedModel":
        return GatedModel(self)


class GatedModel(nn.Module):
    """Runs the gated graph; parameter gates scale their slices via ``functional_call``."""

    def __init__(self, gated: GatedGraph) -> None:
        super().__init__()
        self.gm = gated.gm
        self._specs = [(fqn, dim, torch.as_tensor(np.where(lab < 0, len(gated.gates), lab)))
                       for fqn, dim, lab in gated.param_gates]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._specs:
            return self.gm(*args, **kwargs)
        gates = getattr(self.gm, GATES)
        params: dict[str, torch.Tensor] = {}
        for fqn, dim, index in self._specs:
            p = params.get(fqn, self.gm.get_parameter(fqn))
            params[fqn] = apply_gate(p, gates, index.to(gates.device), dim)
        return torch.func.functional_call(self.gm, params, args, kwargs)


def ensures_gated(gated: GatedGraph, analysis: GroupAnalysis) -> None:
    """A new module with one gate per unit label, all 1 (the same function as the source),
    every site's gate indices inside the gate vector."""
    ensure_new_module(gated.gm, analysis.gm)
    gates = gated.gates
    if gates.shape != (analysis.num_units,) or not bool((gates == 1).all()):
        raise AssertionError(f"gates must start as {analysis.num_units} ones")
    for fqn, dim, labels in gated.param_gates:
        if len(labels) and int(labels.max()) >= analysis.num_units:
            raise AssertionError(f"gate labels of {fqn} dim {dim} exceed the unit count")


@checked_pass(ensures=ensures_gated, error_type=RewriteError)
def insert_gates(analysis: GroupAnalysis) -> GatedGraph:
    """Return a gated deep copy of ``analysis.gm`` (all gates 1: same function)."""
    gm = copy.deepcopy(analysis.gm)
    ref = next((t for t in gm.parameters() if t.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    gm.register_parameter(GATES, nn.Parameter(torch.ones(analysis.num_units, device=device,
                                                         dtype=dtype)))
    owners = _in_member_owners(analysis)
    graph = gm.graph
    calls = [v for v in graph.nodes if v.op in ("call_module", "call_function", "call_method")]
    inside = _consumed_inside(analysis, gm, calls, owners)
    sites = []
    for v in calls:
        for site in _sites_of(analysis, gm, v, owners.get(v.name, set()), inside):
            _insert(gm, v, site, analysis, len(sites))
            sites.append(site)
    graph.lint()
    gm.recompile()
    on_edges = {gid for s in sites for gid in s.groups} - inside
    params = dict(analysis.gm.named_parameters())
    sources = {g.id: [m for m in g.members if m.role in ("out", "dep") and m.fqn in params]
               for g in analysis.groups if g.id not in on_edges}
    param_gates = tuple((m.fqn, m.dim, _group_labels(analysis, gid, m))
                        for gid, members in sources.items() for m in members)
    gated = frozenset(on_edges) | frozenset(gid for gid, members in sources.items() if members)
    return GatedGraph(gm, tuple(sites), param_gates, gated)


def _group_labels(analysis: GroupAnalysis, gid: int, member: Any) -> np.ndarray:
    labels = analysis.tensor_labels[(member.fqn, member.dim)]
    inside = labels >= 0
    out = np.full(len(labels), -1, dtype=np.int64)
    mine = inside.copy()
    mine[inside] = analysis.group_of[labels[inside]] == gid
    out[mine] = labels[mine]
    return out


def _in_member_owners(analysis: GroupAnalysis) -> dict[str, set[int]]:
    """Node name -> groups whose "in" members (weight columns) that node reads."""
    fqn_groups: dict[str, set[int]] = {}
    for g in analysis.groups:
        for m in g.members:
            if m.role == "in":
                fqn_groups.setdefault(m.fqn, set()).add(g.id)
    owners: dict[str, set[int]] = {}
    for node in analysis.gm.graph.nodes:
        if node.op == "call_module":
            prefix = f"{node.target}."
            found = {gid for fqn, gids in fqn_groups.items() if fqn.startswith(prefix)
                     for gid in gids}
        else:
            found = {gid for a in node.all_input_nodes if a.op == "get_attr"
                     for gid in fqn_groups.get(a.target, ())}
        if found:
            owners[node.name] = found
    return owners


def _groups_in(analysis: GroupAnalysis, info: Any) -> set[int]:
    """Groups whose units appear in a label array or a node's (nested) labels."""
    arrays = [info] if isinstance(info, np.ndarray) else iter_units(info)
    return {int(g) for u in arrays for g in np.unique(analysis.group_of[u[u >= 0]])}


def _consumed_inside(analysis: GroupAnalysis, gm: torch.fx.GraphModule,
                     calls: list[torch.fx.Node], owners: dict[str, set[int]]) -> set[int]:
    """Groups whose weight columns a node reads although none of its contracted inputs
    carries them: born and consumed inside it (MHA / window-attention heads, recurrent
    hidden units). No edge sees every use, so they are gated on their source rows."""
    inside: set[int] = set()
    for v in calls:
        owned = owners.get(v.name, set())
        if not owned:
            continue
        pairs = _contracted_axes(analysis, gm, v)
        arriving: set[int] = set()
        for u in v.all_input_nodes:
            labels = analysis.node_labels.get(u.name)
            if u.op != "get_attr" and isinstance(labels, dict):
                arriving |= {g for axis, lab in labels.items()
                             if pairs is None or (u.name, axis) in pairs
                             for g in _groups_in(analysis, lab)}
        inside |= owned - arriving
    return inside


def _sites_of(analysis: GroupAnalysis, gm: torch.fx.GraphModule, v: torch.fx.Node,
              owned: set[int], inside: set[int]) -> list[GateSite]:
    """The consumption edges into ``v`` (see the module docstring)."""
    out_info = analysis.node_labels.get(v.name)
    if out_info is None:
        return []  # a non-tensor result (size(), shape): no data flows on
    carried = _groups_in(analysis, out_info)
    pairs = _contracted_axes(analysis, gm, v)
    gated: dict[int | None, set[int]] = {}  # contraction -> groups gated on one operand
    sites = []
    for u in v.all_input_nodes:
        labels = analysis.node_labels.get(u.name)
        if u.op == "get_attr" or not isinstance(labels, dict):
            continue
        for axis, lab in labels.items():
            here = _groups_in(analysis, lab) - inside
            # an op without a contraction rule: groups that do not reach its output
            keys = [None] if pairs is None else pairs.get((u.name, axis), [])
            # weight columns consume the contracted axes only (not a per-head bias input)
            chosen = {g for g in here if g in owned} if keys else set()
            for key in keys:
                consumed = (here - carried if key is None else here) - owned
                first = gated.setdefault(key, set())
                chosen |= consumed - first
                first |= consumed
            if chosen:
                sites.append(GateSite(u.name, v.name, axis, tuple(sorted(chosen))))
    return sites


def _contracted_axes(analysis: GroupAnalysis, gm: torch.fx.GraphModule, v: torch.fx.Node
                     ) -> dict[tuple[str, int], list[int]] | None:
    """(input name, axis) -> the contractions it is an operand of, from the op entry's
    ``contractions`` rule; None for an op without one."""
    rule = lookup(v, gm, "contractions")
    if rule is None:
        return None
    pairs: dict[tuple[str, int], list[int]] = {}
    for number, operands in enumerate(rule(MacContext(analysis, v))):
        for value, axis in operands:
            shape = tensor_shapes(value) if isinstance(value, torch.fx.Node) else None
            if isinstance(shape, tuple) and shape:
                pairs.setdefault((value.name, axis % len(shape)), []).append(number)
    return pairs


def _insert(gm: torch.fx.GraphModule, v: torch.fx.Node, site: GateSite,
            analysis: GroupAnalysis, number: int) -> None:
    u = next(n for n in v.all_input_nodes if n.name == site.producer)
    lab = analysis.node_labels[site.producer][site.axis]
    index = np.full(len(lab), analysis.num_units, dtype=np.int64)
    inside = lab >= 0
    chosen = np.zeros(len(lab), dtype=bool)
    chosen[inside] = np.isin(analysis.group_of[lab[inside]], site.groups)
    index[chosen] = lab[chosen]
    name = f"_fxprune_gate_index_{number}"
    gm.register_buffer(name, torch.as_tensor(index, device=getattr(gm, GATES).device))
    ndim = len(u.meta["tensor_meta"].shape)
    with gm.graph.inserting_before(v):
        gates = gm.graph.get_attr(GATES)
        idx = gm.graph.get_attr(name)
        gated = gm.graph.call_function(apply_gate, (u, gates, idx, site.axis - ndim))
    v.replace_input_with(u, gated)
