"""Analysis pass: a cost model of a grouped graph (MACs, parameters, activation memory).

Requires: a ``GroupAnalysis`` whose graph has ``tensor_meta`` (``fxprune.analyze``).
Ensures: a frozen :class:`CostModel`; the graph is not mutated. Dense MACs per node come
from ``torch.utils.flop_counter.FlopCounterMode`` (run on fake tensors, no compute);
how they shrink with a plan comes from one small *scaling rule* per op family, each a
list of multilinear terms over the node's tracked axes. Parameters and activation
memory are exact products of kept counts. Evaluating a plan is one gather and one
reduction over label arrays (no re-tracing), so planners can search on it.

Before/after (what the model records for a ResNet block)::

    layer1_0_conv1 = self.layer1.0.conv1(x)    # macs 1.2M = dense * kept(in)/64 * kept(out)/64
    layer1_0_bn1 = self.layer1.0.bn1(conv1)    # memory 16384 = dense * kept(out)/64; macs 0
    layer1_0_conv2 = self.layer1.0.conv2(relu) # removing unit u of conv1's group saves
                                               # conv1's row u and conv2's column u

Elementwise ops (activations, adds, norms) count no MACs, as in ``FlopCounterMode``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx

from fxprune.core.groups import ChannelGroup, GroupAnalysis
import passes.rules  # noqa: F401  (registers the op entries, MAC rules included)
from passes.rules.registry import MacContext, MacRule, Terms, lookup
from fxprune.planning.cost.flops import node_flops
from passes.shape_prop import tensor_shapes

__all__ = ["Cost", "CostTerm", "CostModel", "compute_cost", "node_flops", "uniform_kept", "unit_classes",
           "COST_KINDS", "generic_scaling"]

COST_KINDS = ("macs", "params", "memory")


@dataclass(frozen=True)
class Cost:
    """MACs (multiply-accumulates, FLOPs / 2), parameter count, activation elements."""

    macs: float
    params: float
    memory: float

    def __getitem__(self, kind: str) -> float:
        if kind not in COST_KINDS:
            raise KeyError(f"cost kind must be one of {COST_KINDS}, got {kind!r}")
        return float(getattr(self, kind))

    @property
    def flops(self) -> float:
        return 2.0 * self.macs


@dataclass(frozen=True)
class CostTerm:
    """``dense * prod(kept fraction of each axis)``: one multilinear piece of a node's cost."""

    node: str
    kind: str  # "macs" | "params" | "memory"
    dense: float
    axes: tuple[int, ...]  # indices into CostModel.axes


@dataclass(frozen=True)
class CostModel:
    """Per-node and per-unit costs of one analysed graph; ``evaluate(kept)`` for any plan.

    ``axes[i]`` is a label array (global unit label per index, -1: never pruned).
    ``unit[kind][label]`` is what removing that one unit (alone, from the full model)
    saves, counting every member slice: producers' rows, consumers' input columns,
    dependents, and every activation that carries it.
    """

    analysis: GroupAnalysis = field(repr=False, compare=False)
    axes: tuple[np.ndarray, ...] = field(repr=False, compare=False)
    terms: tuple[CostTerm, ...] = field(repr=False)
    dense: Cost
    unit: dict[str, np.ndarray] = field(repr=False, compare=False)
    node_flops: dict[str, int] = field(repr=False, compare=False)
    _index: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    # -- evaluation ---------------------------------------------------------------------
    def term_values(self, kept: np.ndarray | None = None) -> np.ndarray:
        """Value of every term under ``kept`` (bool per global unit label; None: all)."""
        ix = self._index
        if kept is None:
            return ix["dense"].copy()
        if len(kept) != self.analysis.num_units:
            raise ValueError(f"kept has {len(kept)} entries, the analysis {self.analysis.num_units}")
        kept_ext = np.append(np.asarray(kept, dtype=bool), True)
        counts = np.add.reduceat(kept_ext[ix["flat"]].astype(np.float64), ix["starts"]) \
            if len(ix["flat"]) else np.zeros(0)
        frac = np.append(counts / ix["lengths"], 1.0)
        return ix["dense"] * frac[ix["matrix"]].prod(axis=1)

    def evaluate(self, kept: np.ndarray | None = None) -> Cost:
        """Total MACs, parameters and activation memory of the model pruned to ``kept``."""
        values = self.term_values(kept)
        kinds = self._index["kinds"]
        return Cost(*(float(values[kinds == i].sum()) for i in range(len(COST_KINDS))))

    def evaluate_plan(self, plan: Any) -> Cost:
        return self.evaluate(plan.kept_labels(self.analysis))

    def node_costs(self, kept: np.ndarray | None = None) -> dict[str, Cost]:
        """Per FX node: its MACs, the parameters it owns, the activation it writes."""
        values = self.term_values(kept)
        ix = self._index
        table = np.zeros((len(ix["node_names"]), len(COST_KINDS)))
        np.add.at(table, (ix["node_of_term"], ix["kinds"]), values)
        return {name: Cost(*row) for name, row in zip(ix["node_names"], table.tolist())}

    def unit_cost(self, group: ChannelGroup | str | int, kind: str) -> np.ndarray:
        """What removing each unit of ``group`` saves (group-local order)."""
        g = group if isinstance(group, ChannelGroup) else self.analysis.group(group)
        if kind not in self.unit:
            raise KeyError(f"cost kind must be one of {COST_KINDS}, got {kind!r}")
        return self.unit[kind][self.analysis.group_of == g.id]

    def floor(self, min_keep: dict[str, int] | None = None) -> Cost:
        """Cost with every group cut to ``min_keep[name]`` units (default 1): the part no
        plan can remove."""
        kept = np.zeros(self.analysis.num_units, dtype=bool)
        for g in self.analysis.groups:
            k = (min_keep or {}).get(g.name, 1)
            kept[np.flatnonzero(self.analysis.group_of == g.id)[:max(k, 0)]] = True
        return self.evaluate(kept)

    def table(self, kept: np.ndarray | None = None, *, top: int = 20) -> str:
        from tabulate import tabulate

        rows = sorted(self.node_costs(kept).items(), key=lambda kv: -kv[1].macs)[:top]
        total = self.evaluate(kept)
        body = [(n, f"{c.macs:,.0f}", f"{c.params:,.0f}", f"{c.memory:,.0f}") for n, c in rows]
        body.append(("total", f"{total.macs:,.0f}", f"{total.params:,.0f}", f"{total.memory:,.0f}"))
        return tabulate(body, headers=["node", "MACs", "params", "activation elems"])


# ----------------------------------------------------------------------------------
# MAC rules: how a node's dense MACs shrink with its tracked axes. They live in the op
# entries of passes/rules/ (``@macs``); ops without one get the multilinear fallback.
# ----------------------------------------------------------------------------------
def generic_scaling(ctx: MacContext) -> Terms:
    """No rule: MACs ~ the product of every distinct tracked axis of inputs and output."""
    axes: list[np.ndarray] = list(ctx.out_axes())
    for x in ctx.node.all_input_nodes:
        labels = ctx.analysis.node_labels.get(x.name)
        for u in (labels.values() if isinstance(labels, dict) else ()):
            if not any(len(u) == len(a) and np.array_equal(u, a) for a in axes):
                axes.append(u)
    return [(1.0, axes)]


def _scaling_for(analysis: GroupAnalysis, node: torch.fx.Node) -> MacRule:
    return lookup(node, analysis.gm, "macs") or generic_scaling


# ----------------------------------------------------------------------------------
# Building the model
# ----------------------------------------------------------------------------------
class _Builder:
    def __init__(self, analysis: GroupAnalysis) -> None:
        self.analysis = analysis
        self.axes: list[np.ndarray] = []
        self.axis_ids: dict[int, int] = {}  # id(label array) -> axis index
        self.terms: list[CostTerm] = []

    def axis_id(self, labels: np.ndarray) -> int | None:
        if labels is None or not len(labels) or not (labels >= 0).any():
            return None  # never pruned: its fraction is always 1
        key = id(labels)
        if key not in self.axis_ids:
            self.axis_ids[key] = len(self.axes)
            self.axes.append(np.asarray(labels, dtype=np.int64))
        return self.axis_ids[key]

    def add(self, node: str, kind: str, dense: float, axes: Iterable[np.ndarray]) -> None:
        if dense <= 0:
            return
        ids = tuple(i for i in (self.axis_id(a) for a in axes) if i is not None)
        self.terms.append(CostTerm(node, kind, float(dense), ids))


def compute_cost(analysis: GroupAnalysis, *, example_inputs: Sequence[Any] | None = None
                 ) -> CostModel:
    """The cost model of ``analysis``'s graph (MACs from ``FlopCounterMode``)."""
    gm = analysis.gm
    inputs = analysis.example_inputs if example_inputs is None else tuple(example_inputs)
    flops = node_flops(gm, inputs)
    b = _Builder(analysis)
    _add_mac_terms(b, flops)
    _add_param_terms(b)
    _add_memory_terms(b)
    index = _index(b, analysis)
    dense = Cost(*(float(index["dense"][index["kinds"] == i].sum())
                   for i in range(len(COST_KINDS))))
    unit = _unit_savings(b.axes, b.terms, analysis.num_units)
    return CostModel(analysis, tuple(b.axes), tuple(b.terms), dense, unit, flops, index)


def _add_mac_terms(b: _Builder, flops: dict[str, int]) -> None:
    for node in b.analysis.gm.graph.nodes:
        total = flops.get(node.name, 0) / 2.0
        if total <= 0:
            continue
        pieces = _scaling_for(b.analysis, node)(MacContext(b.analysis, node))
        weight = sum(share for share, _ in pieces)
        for share, axes in pieces:
            b.add(node.name, "macs", total * share / weight, axes)


def _param_owner(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Parameter FQN -> the first node that reads it (call_module or get_attr)."""
    owner: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for name, _ in gm.get_submodule(node.target).named_parameters():
                owner.setdefault(f"{node.target}.{name}", node.name)
        elif node.op == "get_attr":
            owner.setdefault(node.target, node.name)
    return owner


def _add_param_terms(b: _Builder) -> None:
    owner = _param_owner(b.analysis.gm)
    labels = b.analysis.tensor_labels
    for fqn, p in b.analysis.gm.named_parameters():
        axes = [labels[(fqn, d)] for d in range(p.dim()) if (fqn, d) in labels]
        b.add(owner.get(fqn, fqn), "params", p.numel(), axes)


def _add_memory_terms(b: _Builder) -> None:
    for node in b.analysis.gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        shapes, labels = tensor_shapes(node), b.analysis.node_labels.get(node.name)
        for shape, lab in _tensor_outputs(shapes, labels):
            b.add(node.name, "memory", math.prod(shape), lab.values())


def _tensor_outputs(shape: Any, labels: Any) -> list[tuple[tuple[int, ...], dict]]:
    if shape is None:
        return []
    if all(isinstance(s, int) for s in shape):
        return [(shape, labels if isinstance(labels, dict) else {})]
    subs = labels if isinstance(labels, (tuple, list)) else [None] * len(shape)
    return [t for s, l in zip(shape, subs) for t in _tensor_outputs(s, l)]


def _index(b: _Builder, analysis: GroupAnalysis) -> dict[str, Any]:
    """Flat arrays for evaluation: one gather + reduceat per plan."""
    lengths = np.array([len(a) for a in b.axes], dtype=np.float64)
    flat = np.concatenate(b.axes) if b.axes else np.zeros(0, dtype=np.int64)
    flat = np.where(flat < 0, analysis.num_units, flat)
    starts = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64) if b.axes else \
        np.zeros(0, dtype=np.int64)
    width = max((len(t.axes) for t in b.terms), default=0)
    matrix = np.full((len(b.terms), max(width, 1)), len(b.axes), dtype=np.int64)
    for i, t in enumerate(b.terms):
        matrix[i, :len(t.axes)] = t.axes
    names = list(dict.fromkeys(t.node for t in b.terms))
    pos = {n: i for i, n in enumerate(names)}
    return {"flat": flat, "starts": starts, "lengths": lengths, "matrix": matrix,
            "dense": np.array([t.dense for t in b.terms]),
            "kinds": np.array([COST_KINDS.index(t.kind) for t in b.terms], dtype=np.int64),
            "node_of_term": np.array([pos[t.node] for t in b.terms], dtype=np.int64),
            "node_names": names}


def _unit_savings(axes: list[np.ndarray], terms: list[CostTerm], n_units: int
                  ) -> dict[str, np.ndarray]:
    """Exact saving of removing each unit alone: dense * (1 - prod(1 - count_u / n))."""
    per_axis = [np.bincount(a[a >= 0], minlength=n_units) / len(a) for a in axes]
    out = {k: np.zeros(n_units) for k in COST_KINDS}
    for t in terms:
        if not t.axes:
            continue
        keep = np.ones(n_units)
        for ax in t.axes:
            keep *= 1.0 - per_axis[ax]
        out[t.kind] += t.dense * (1.0 - keep)
    return out


def unit_classes(group: ChannelGroup) -> list[np.ndarray]:
    """The group's local units split by the member slices they appear in: one class for
    most groups; one per piece where the group spans a concat's inputs or a split's
    pieces (units of one class are interchangeable in shape and cost)."""
    if not group.members:
        return [np.arange(group.size)]
    sig = np.zeros((group.size, len(group.members)), dtype=bool)
    for j, m in enumerate(group.members):
        u = m.units[(m.units >= 0) & (m.units < group.size)]
        sig[u, j] = True
    _, inverse = np.unique(sig, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    return [np.flatnonzero(inverse == c) for c in range(int(inverse.max()) + 1)]


def uniform_kept(analysis: GroupAnalysis, fraction: float) -> np.ndarray:
    """Kept labels that keep the first ``ceil(fraction * n)`` (at least one) units of
    every class of every group (``unit_classes``: each piece of a concat keeps some)."""
    kept = np.zeros(analysis.num_units, dtype=bool)
    for g in analysis.groups:
        labels = np.flatnonzero(analysis.group_of == g.id)
        local = analysis.local_of[labels]
        order = labels[np.argsort(local, kind="stable")]  # by local unit
        for units in unit_classes(g):
            kept[order[units[:max(1, math.ceil(fraction * len(units)))]]] = True
    return kept
