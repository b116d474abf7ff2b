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

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from fxprune.groups import ChannelGroup, GroupAnalysis
from passes.rules.registry import find_module_entry, op_key
from passes.rules.conv import CONV_MODULES
from passes.shape_prop import eval_mode, tensor_shapes

__all__ = ["Cost", "CostTerm", "CostModel", "compute_cost", "node_flops", "uniform_kept",
           "LatencyTable", "measure_latency", "COST_KINDS", "scaling_rule"]

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
# Scaling rules: how a node's dense MACs shrink with its tracked axes
# ----------------------------------------------------------------------------------
Terms = list[tuple[float, list[np.ndarray]]]  # (share, axes): share * prod(fraction)
ScalingRule = Callable[["TermContext"], Terms]
SCALING_RULES: dict[Any, ScalingRule] = {}


def scaling_rule(*keys: Any) -> Callable[[ScalingRule], ScalingRule]:
    """Register a MAC scaling rule under op names or module types (as ``passes.rules``)."""
    flat = [k for key in keys for k in (key if isinstance(key, (tuple, list)) else (key,))]

    def register(fn: ScalingRule) -> ScalingRule:
        for key in flat:
            SCALING_RULES[key] = fn
        return fn

    return register


class TermContext:
    """What a scaling rule sees: the node, its shapes and the label arrays of its axes."""

    def __init__(self, analysis: GroupAnalysis, node: torch.fx.Node) -> None:
        self.analysis, self.node = analysis, node

    def arg(self, index: int, name: str | None = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name) if name else None

    def shape(self, value: Any) -> Any:
        return tensor_shapes(value) if isinstance(value, torch.fx.Node) else None

    def axis(self, value: Any, axis: int) -> np.ndarray | None:
        """Labels of ``axis`` of an input (negative axes count from the end)."""
        labels = self.analysis.node_labels.get(value.name) if isinstance(
            value, torch.fx.Node) else None
        shape = self.shape(value)
        if not isinstance(labels, dict) or not isinstance(shape, tuple):
            return None
        return labels.get(axis % len(shape)) if shape else None

    def out_axes(self) -> list[np.ndarray]:
        labels = self.analysis.node_labels.get(self.node.name)
        if isinstance(labels, tuple):
            labels = labels[0] if labels and isinstance(labels[0], dict) else {}
        return list((labels or {}).values())

    def param_axis(self, fqn: str, dim: int) -> np.ndarray | None:
        return self.analysis.tensor_labels.get((fqn, dim))

    def attr_axis(self, value: Any, dim: int) -> np.ndarray | None:
        """Labels of a weight argument's dim: its tensor's when read by get_attr."""
        if isinstance(value, torch.fx.Node) and value.op == "get_attr":
            return self.param_axis(value.target, dim)
        return self.axis(value, dim)

    @property
    def module(self) -> nn.Module:
        return self.analysis.gm.get_submodule(self.node.target)


def _present(*axes: np.ndarray | None) -> list[np.ndarray]:
    return [a for a in axes if a is not None]


@scaling_rule(CONV_MODULES)
def conv_module_scaling(ctx: TermContext) -> Terms:
    """MACs ~ out channels x in channels per group (depthwise: out channels only)."""
    m = ctx.module
    x = ctx.arg(0, "input")
    depthwise = m.groups > 1 and m.weight.shape[1] == 1
    cin = None if depthwise else ctx.axis(x, -(m.weight.dim() - 1))
    return [(1.0, ctx.out_axes() + _present(cin))]


@scaling_rule("conv")
def conv_functional_scaling(ctx: TermContext) -> Terms:
    """F.convNd: like the module; the weight's dims carry the channel labels."""
    x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
    wshape = ctx.shape(w)
    depthwise = wshape is not None and wshape[1] == 1 and ctx.shape(x)[-(len(wshape) - 1)] > 1
    cin = None if depthwise else ctx.axis(x, -(len(wshape) - 1))
    return [(1.0, ctx.out_axes() + _present(cin))]


@scaling_rule(nn.Linear, "linear")
def linear_scaling(ctx: TermContext) -> Terms:
    """MACs ~ every output axis x the consumed input features."""
    return [(1.0, ctx.out_axes() + _present(ctx.axis(ctx.arg(0, "input"), -1)))]


@scaling_rule("matmul", "mm", "bmm")
def matmul_scaling(ctx: TermContext) -> Terms:
    """MACs ~ every output axis x the contracted dim."""
    a, b = ctx.arg(0), ctx.arg(1)
    k = ctx.axis(a, -1)
    if k is None and ctx.shape(b) is not None:
        k = ctx.axis(b, -2 if len(ctx.shape(b)) > 1 else 0)
    return [(1.0, ctx.out_axes() + _present(k))]


@scaling_rule("einsum")
def einsum_scaling(ctx: TermContext) -> Terms:
    """MACs ~ every output axis x every contracted letter (two-operand products)."""
    equation = ctx.arg(0)
    operands = list(ctx.node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    lhs, _, rhs = str(equation).replace(" ", "").partition("->")
    contracted: dict[str, np.ndarray] = {}
    for term, op in zip(lhs.split(","), operands):
        for axis, letter in enumerate(term):
            labels = ctx.axis(op, axis)
            if letter not in rhs and letter not in contracted and labels is not None:
                contracted[letter] = labels
    return [(1.0, ctx.out_axes() + list(contracted.values()))]


@scaling_rule("scaled_dot_product_attention")
def sdpa_scaling(ctx: TermContext) -> Terms:
    """q.k^T ~ L x S x E and attn.v ~ L x S x Ev, weighted by E : Ev."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    e, ev = ctx.shape(q)[-1], ctx.shape(v)[-1]
    out = ctx.out_axes()
    labels = ctx.analysis.node_labels.get(ctx.node.name) or {}
    last = len(ctx.shape(ctx.node)) - 1
    lead = [u for a, u in labels.items() if a != last]
    s = _present(ctx.axis(k, -2))
    return [(e / (e + ev), lead + _present(ctx.axis(q, -1)) + s), (ev / (e + ev), out + s)]


@scaling_rule(nn.MultiheadAttention)
def multihead_attention_scaling(ctx: TermContext) -> Terms:
    """In-projections ~ tokens x E_in x inner; attention ~ L x S x inner; out ~ inner x E_out."""
    m = ctx.module
    target = ctx.node.target
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    e_in = m.in_proj_weight.shape[1] if m.in_proj_weight is not None else m.embed_dim
    inner = m.embed_dim
    tokens = [math.prod(ctx.shape(t)) // ctx.shape(t)[-1] for t in (q, k, v)]
    qshape = ctx.shape(q)
    batch = 1 if len(qshape) == 2 else qshape[0 if m.batch_first else 1]
    rows = ctx.param_axis(f"{target}.in_proj_weight", 0)
    cols = ctx.param_axis(f"{target}.in_proj_weight", 1)
    out_cols = ctx.param_axis(f"{target}.out_proj.weight", 1)
    out_rows = ctx.param_axis(f"{target}.out_proj.weight", 0)
    return [(sum(tokens) * e_in * inner, _present(cols, rows)),
            (2 * tokens[0] * (tokens[1] // batch) * inner, _present(rows)),
            (tokens[0] * inner * m.out_proj.weight.shape[0], _present(out_cols, out_rows))]


def window_attention_scaling(ctx: TermContext) -> Terms:
    """Swin window attention, per padded token: qkv ~ 3 C_in x inner, attention ~
    2 T x inner (T tokens per window), projection ~ inner x C_out."""
    qkv_w, proj_w = ctx.arg(1), ctx.arg(2)
    rows, c_in = ctx.shape(qkv_w)
    inner, c_out = rows // 3, ctx.shape(proj_w)[0]
    window = ctx.arg(4, "window_size")
    tokens = math.prod(window)
    qkv_rows, qkv_cols = ctx.attr_axis(qkv_w, 0), ctx.attr_axis(qkv_w, 1)
    proj_rows, proj_cols = ctx.attr_axis(proj_w, 0), ctx.attr_axis(proj_w, 1)
    return [(3 * c_in * inner, _present(qkv_cols, qkv_rows)),
            (2 * tokens * inner, _present(qkv_rows)),
            (inner * c_out, _present(proj_cols, proj_rows))]


try:
    from torchvision.models import swin_transformer as _swin
except ImportError:  # pragma: no cover - torchvision is optional at run time
    _swin = None
if _swin is not None:
    scaling_rule(_swin.shifted_window_attention)(window_attention_scaling)


def generic_scaling(ctx: TermContext) -> Terms:
    """No rule: MACs ~ the product of every distinct tracked axis of inputs and output."""
    axes: list[np.ndarray] = list(ctx.out_axes())
    for x in ctx.node.all_input_nodes:
        labels = ctx.analysis.node_labels.get(x.name)
        for u in (labels.values() if isinstance(labels, dict) else ()):
            if not any(len(u) == len(a) and np.array_equal(u, a) for a in axes):
                axes.append(u)
    return [(1.0, axes)]


def _scaling_for(analysis: GroupAnalysis, node: torch.fx.Node) -> ScalingRule:
    if node.op == "call_module":
        fn = find_module_entry(SCALING_RULES, analysis.gm.get_submodule(node.target))
    else:
        try:
            fn = SCALING_RULES.get(op_key(node))
        except TypeError:
            fn = None
    return fn or generic_scaling


# ----------------------------------------------------------------------------------
# Dense counts
# ----------------------------------------------------------------------------------
class _FlopRecorder(torch.fx.Interpreter):
    """Runs a graph on fake tensors and records ``FlopCounterMode``'s total per node."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.flops: dict[str, int] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op not in ("call_module", "call_function", "call_method"):
            return super().run_node(n)
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        self.flops[n.name] = int(counter.get_total_flops())
        return result


def node_flops(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, int]:
    """FLOPs of every call node as ``FlopCounterMode`` counts them (fake tensors, eval mode)."""
    device = next((t.device for t in gm.parameters()), None)
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            t = mode.from_tensor(x.to("meta") if device is not None and device.type == "meta"
                                 else x)
            return t.requires_grad_(True) if t.is_floating_point() else t
        return x

    # Grad enabled and inputs requiring grad: inference fast paths (nn.MultiheadAttention's
    # fused kernel) would hide their matmuls from FlopCounterMode.
    recorder = _FlopRecorder(gm)
    with eval_mode(gm), torch.enable_grad(), mode:
        recorder.run(*[fake(x) for x in example_inputs])
    return recorder.flops


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
        pieces = _scaling_for(b.analysis, node)(TermContext(b.analysis, node))
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


def uniform_kept(analysis: GroupAnalysis, fraction: float) -> np.ndarray:
    """Kept labels that keep the first ``ceil(fraction * size)`` units of every group."""
    kept = np.zeros(analysis.num_units, dtype=bool)
    for g in analysis.groups:
        labels = np.flatnonzero(analysis.group_of == g.id)
        kept[labels[:max(1, math.ceil(fraction * g.size))]] = True
    return kept


# ----------------------------------------------------------------------------------
# Latency: a per-node lookup table measured on the current device
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyTable:
    """Measured per-node latency (ms) as a function of the node's size under a plan.

    Each node is timed in models pruned uniformly to ``fractions`` of every group (plus
    the dense model and the one-unit-per-group floor); its size is its MACs (its output elements for MAC-free nodes, nothing for constants).
    ``predict(kept)`` interpolates each node's (size, ms) curve, made monotone, and sums.
    Times include the per-node dispatch of an ``Interpreter``, so they over-estimate an
    eager forward by a constant per node; compare predictions with predictions.
    """

    key: str
    device: str
    nodes: tuple[str, ...]
    kinds: tuple[str, ...]  # per node: "macs" | "memory" | "const"
    sizes: tuple[tuple[float, ...], ...]
    times_ms: tuple[tuple[float, ...], ...]

    def predict(self, cost: CostModel, kept: np.ndarray | None = None) -> float:
        per_node = cost.node_costs(kept)
        total = 0.0
        for name, kind, xs, ts in zip(self.nodes, self.kinds, self.sizes, self.times_ms):
            if kind == "const" or name not in per_node:
                total += ts[-1]
                continue
            total += float(np.interp(per_node[name][kind], xs, ts))
        return total

    @property
    def dense_ms(self) -> float:
        return float(sum(ts[-1] for ts in self.times_ms))

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "device": self.device, "nodes": self.nodes,
                           "kinds": self.kinds, "sizes": self.sizes, "times_ms": self.times_ms})

    @classmethod
    def from_json(cls, text: str) -> "LatencyTable":
        d = json.loads(text)
        return cls(d["key"], d["device"], tuple(d["nodes"]), tuple(d["kinds"]),
                   tuple(tuple(x) for x in d["sizes"]), tuple(tuple(x) for x in d["times_ms"]))


_LATENCY_CACHE: dict[str, LatencyTable] = {}


class _NodeTimer(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, sync: Callable[[], None]) -> None:
        super().__init__(gm)
        self.sync, self.times = sync, {}

    def run_node(self, n: torch.fx.Node) -> Any:
        self.sync()
        start = time.perf_counter()
        result = super().run_node(n)
        self.sync()
        self.times.setdefault(n.name, []).append((time.perf_counter() - start) * 1e3)
        return result


def _time_nodes(gm: torch.fx.GraphModule, inputs: tuple, repeats: int) -> dict[str, float]:
    device = next((t.device for t in gm.parameters()), torch.device("cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timer = _NodeTimer(gm.eval(), sync)
    with torch.no_grad():
        timer.run(*inputs)  # warm-up
        timer.times = {}
        for _ in range(repeats):
            timer.run(*inputs)
    return {name: statistics.median(ts) for name, ts in timer.times.items()}


def measure_latency(cost: CostModel, *, fractions: Sequence[float] = (0.25, 0.5, 0.75),
                    repeats: int = 5, cache: bool = True, cache_path: str | None = None
                    ) -> LatencyTable:
    """Time every node of the model pruned uniformly to each of ``fractions``; cached.

    Requires real (not meta) example inputs and weights. The table is cached in memory
    by graph fingerprint, device, input shapes and settings, and in ``cache_path``
    (a JSON file) when given.
    """
    from passes.slice_weights import slice_weights

    analysis = cost.analysis
    inputs = tuple(analysis.example_inputs)
    device = next((t.device for t in analysis.gm.parameters()), torch.device("cpu"))
    if device.type == "meta" or any(isinstance(x, torch.Tensor) and x.is_meta for x in inputs):
        raise ValueError("latency needs real weights and inputs; this model lives on meta")
    fractions = tuple(sorted(set(float(f) for f in fractions) | {0.0, 1.0}))  # 0: one unit each
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs]
    key = f"{analysis.fingerprint}|{device}|{shapes}|{fractions}|{repeats}|{torch.get_num_threads()}"
    if cache and key in _LATENCY_CACHE:
        return _LATENCY_CACHE[key]
    if cache and cache_path and os.path.exists(cache_path):
        with open(cache_path) as fh:
            stored = LatencyTable.from_json(fh.read())
        if stored.key == key:
            _LATENCY_CACHE[key] = stored
            return stored
    samples = []
    for f in fractions:
        kept = uniform_kept(analysis, f)
        gm = slice_weights(analysis, kept)  # a copy even at 1.0: timing sets eval()
        samples.append((cost.node_costs(kept), _time_nodes(gm, inputs, repeats)))
    table = _build_table(key, str(device), cost, samples)
    if cache:
        _LATENCY_CACHE[key] = table
        if cache_path:
            with open(cache_path, "w") as fh:
                fh.write(table.to_json())
    return table


def _build_table(key: str, device: str, cost: CostModel,
                 samples: list[tuple[dict[str, Cost], dict[str, float]]]) -> LatencyTable:
    names, kinds, sizes, times = [], [], [], []
    dense = cost.node_costs(None)
    for node in cost.analysis.gm.graph.nodes:
        if node.name not in samples[-1][1]:
            continue
        c = dense.get(node.name)
        kind = "macs" if c is not None and c.macs > 0 else \
            "memory" if c is not None and c.memory > 0 else "const"
        if kind == "const":
            xs, ts = [1.0], [statistics.median(s[1].get(node.name, 0.0) for s in samples)]
        else:
            pts = sorted((s[0][node.name][kind], s[1].get(node.name, 0.0)) for s in samples)
            xs = [p[0] for p in pts]
            ts = np.maximum.accumulate([p[1] for p in pts]).tolist()  # monotone in size
        names.append(node.name)
        kinds.append(kind)
        sizes.append(tuple(float(x) for x in xs))
        times.append(tuple(float(t) for t in ts))
    return LatencyTable(key, device, tuple(names), tuple(kinds), tuple(sizes), tuple(times))
