"""Importance criteria: one score per unit of every group, from a registry of small rules.

A *member criterion* scores each member slice of a group (the producers' rows, the
consumers' columns, the norm layers' scales...) and the group score is the reduction
(``sum|mean|max``) of the members' per-unit vectors, each optionally normalised first
(``layer_norm``). A *gate criterion* scores each unit once, through a gate that the
``passes.gates`` rewrite puts on every edge where the unit is consumed (a deep copy:
the user's module never gets hooks). ``normalize="memory"|"macs"|"params"`` divides
any score by what removing the unit saves (``fxprune.cost``).

    =============  =============================================================
    ``l1``         sum |w| over the unit's slice, per member
    ``l2``         sqrt(sum w^2) over the unit's slice, per member
    ``bn_scale``   |gamma| of the norm layers in the group (Network Slimming)
    ``fpgm``       sum of distances to the other filters (geometric median, FPGM)
    ``lamp``       s_u / sum_{s_v >= s_u} s_v with s = squared slice norm (LAMP)
    ``random``     uniform in [0, 1) (a baseline)
    ``taylor``     mean over batches of sum |w * dL/dw| over the slice (Molchanov)
    ``taylor_gate``|mean over batches of dL/dgate_u|: first-order loss change
    ``fisher``     mean over batches of (dL/dgate_u)^2 (Fisher diagonal of the gate)
    ``obd``        1/2 sum h_ww w^2 over the slice, h = Hutchinson diagonal (OBD)
    ``hessian``    |-dL/dgate_u + 1/2 H_uu|: second-order loss change of removing u
    ``cpd``        ``hessian`` divided by the unit's activation memory (CPD)
    =============  =============================================================

Curvature is estimated by Hutchinson's method with finite differences of gradients:
``Hv ~ (grad L(theta + eps v) - grad L(theta)) / eps`` for Rademacher ``v``, and
``diag(H) ~ mean(v * Hv)`` over ``probes`` draws and ``batches`` batches.

Weight-level rules (one score per weight, for ``fxprune.sparsify``) are registered on the
same names with :func:`weight_criterion` (``fxprune/sparsity/criteria.py``): ``magnitude``,
``l1``/``l2`` (|w| of one weight), ``taylor``, ``fisher`` (g^2 of the weight), ``obd``,
``wanda``, ``random``; a name without one raises when asked for weight scores.

A score of ``+inf`` means "never remove this unit" (a group without norm layer under
``bn_scale``, a unit whose removal saves nothing under ``normalize``); NaN and ``-inf``
raise :class:`~fxprune.errors.NonFiniteScoreError` naming the group.
"""
from __future__ import annotations

import math
import numbers

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sys

import numpy as np
import torch
import torch.nn as nn

from fxprune.core.errors import ImportanceError, NonFiniteScoreError
from fxprune.core.groups import ChannelGroup, GroupAnalysis, Member
import fxprune.core.plan  # noqa: F401  (the submodule: ``fxprune.plan`` is the planner function)

plan_module = sys.modules["fxprune.core.plan"]

__all__ = ["Importance", "CriterionSpec", "CRITERIA", "STATISTICS", "criterion",
           "weight_criterion",
           "importance_scores", "ScoreContext"]

GroupScores = dict[str, np.ndarray]
CriterionFn = Callable[["ScoreContext", ChannelGroup], np.ndarray]
LossOf = Callable[[nn.Module, int], torch.Tensor]


@dataclass(frozen=True)
class CriterionSpec:
    """A registered criterion: its rule, whether it needs data, its default normaliser."""

    name: str
    fn: CriterionFn
    needs_data: bool
    per_member: bool
    normalize: str | None
    doc: str
    #: ``fn(ctx, fqn, weight) -> per-element scores`` for unstructured / N:M sparsity
    #: (``fxprune.sparsity``); None: the criterion scores units only.
    weight_fn: Callable[..., torch.Tensor] | None = None

    @property
    def scores_units(self) -> bool:
        """False for criteria that score single weights only (``wanda``, ``magnitude``)."""
        return not isinstance(self.fn, _WeightsOnly)


CRITERIA: dict[str, CriterionSpec] = {}
REDUCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
LAYER_NORMS: dict[str, Callable[[np.ndarray], float]] = {}
COST_NORMALIZERS = ("memory", "macs", "params", "latency")


def criterion(name: str, *, needs_data: bool = False, per_member: bool = False,
              normalize: str | None = None) -> Callable[[CriterionFn], CriterionFn]:
    """Register ``fn(ctx, group) -> per-unit scores`` under ``name``."""

    def register(fn: CriterionFn) -> CriterionFn:
        CRITERIA[name] = CriterionSpec(name, fn, needs_data, per_member, normalize,
                                       (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return register


def weight_criterion(name: str, *, needs_data: bool = False) -> Callable:
    """Register ``fn(ctx, fqn, weight) -> per-element scores`` as the weight-level form of
    ``name``: a criterion already in ``CRITERIA`` keeps its unit rule and gains this one
    (one name, one quantity, two granularities); a new name scores weights only, and
    asking it for unit scores raises :class:`ImportanceError`."""

    def register(fn: Callable) -> Callable:
        import dataclasses

        doc = (fn.__doc__ or "").strip().splitlines()[0]
        old = CRITERIA.get(name)
        if old is not None:
            if old.needs_data != needs_data:
                raise ImportanceError(f"criterion {name!r}: the weight rule and the unit rule "
                                      "disagree on needing data")
            CRITERIA[name] = dataclasses.replace(old, weight_fn=fn)
        else:
            CRITERIA[name] = CriterionSpec(name, _WeightsOnly(name), needs_data, False, None,
                                           doc, fn)
        return fn

    return register


class _WeightsOnly:
    """The unit rule of a criterion that only scores single weights: a typed refusal."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, ctx: "ScoreContext", group: ChannelGroup) -> np.ndarray:
        raise ImportanceError(
            f"criterion {self.name!r} scores single weights, not channels: use it with "
            f"fxprune.sparsify(...); unit criteria: "
            f"{sorted(n for n, c in CRITERIA.items() if not isinstance(c.fn, _WeightsOnly))}")


def _reduction(name: str) -> Callable:
    def register(fn: Callable) -> Callable:
        REDUCTIONS[name] = fn
        return fn
    return register


@_reduction("sum")
def _sum(stacked: np.ndarray) -> np.ndarray:
    return np.nansum(stacked, axis=0)


@_reduction("mean")
def _mean(stacked: np.ndarray) -> np.ndarray:
    return np.nanmean(stacked, axis=0)


@_reduction("max")
def _max(stacked: np.ndarray) -> np.ndarray:
    return np.nanmax(stacked, axis=0)


def _layer_norm(name: str) -> Callable:
    def register(fn: Callable) -> Callable:
        LAYER_NORMS[name] = fn
        return fn
    return register


@_layer_norm("mean")
def _by_mean(v: np.ndarray) -> float:
    return float(np.nanmean(np.abs(v)))


@_layer_norm("max")
def _by_max(v: np.ndarray) -> float:
    return float(np.nanmax(np.abs(v)))


@_layer_norm("sum")
def _by_sum(v: np.ndarray) -> float:
    return float(np.nansum(np.abs(v)))


@_layer_norm("l2")
def _by_l2(v: np.ndarray) -> float:
    return float(np.sqrt(np.nansum(v * v)))


def _normalized(v: np.ndarray, how: str | None) -> np.ndarray:
    if how is None:
        return v
    finite = v[np.isfinite(v)]
    scale = LAYER_NORMS[how](finite) if len(finite) else 0.0
    return v / scale if scale > 0 else v


# ----------------------------------------------------------------------------------
# The working state of one scoring run
# ----------------------------------------------------------------------------------
class ScoreContext:
    """What a criterion sees: the analysis, the kept units, settings, cached statistics."""

    def __init__(self, analysis: GroupAnalysis, settings: "Importance",
                 kept: np.ndarray | None = None, cost: Any = None) -> None:
        self.analysis, self.settings = analysis, settings
        self.kept = np.ones(analysis.num_units, dtype=bool) if kept is None else \
            np.asarray(kept, dtype=bool)
        self._cost = cost
        self._stats: dict[str, Any] = {}
        self._params = dict(analysis.gm.named_parameters())
        self.warnings: list[str] = []

    # -- structure -------------------------------------------------------------------
    def set_statistics(self, stats: dict[str, Any]) -> None:
        """Use ``stats`` (statistic name -> value, as ``STATISTICS`` computes them) instead
        of computing them: a training loop accumulates them from its own backward passes."""
        self._stats = dict(stats)

    def labels(self, group: ChannelGroup) -> np.ndarray:
        """Global labels of the group's units, in local order."""
        return np.flatnonzero(self.analysis.group_of == group.id)

    def alive(self, group: ChannelGroup) -> np.ndarray:
        return self.kept[self.labels(group)]

    def parameter(self, fqn: str) -> torch.Tensor | None:
        """A floating-point, non-meta parameter of the analysed graph (buffers: None)."""
        p = self._params.get(fqn)
        if p is None or p.is_meta or not p.is_floating_point():
            return None
        return p.detach()

    @property
    def cost(self) -> Any:
        if self._cost is None:
            from fxprune.planning.cost import compute_cost

            self._cost = compute_cost(self.analysis)
        return self._cost

    # -- members ---------------------------------------------------------------------
    def member_vectors(self, group: ChannelGroup, per_element: Callable[[str, torch.Tensor],
                       torch.Tensor | None], *, roles: Sequence[str] = ("out", "in", "dep"),
                       finish: Callable[[np.ndarray], np.ndarray] | None = None
                       ) -> list[np.ndarray]:
        """Per member: ``per_element`` summed over each unit's slice (NaN: unit absent)."""
        out = []
        for m in group.members:
            p = self.parameter(m.fqn)
            if p is None or m.role not in roles:
                continue
            values = per_element(m.fqn, p)
            if values is None:
                continue
            v = unit_sums(values, m, group.size)
            out.append(finish(v) if finish is not None else v)
        return out

    def combine(self, group: ChannelGroup, vectors: list[np.ndarray]) -> np.ndarray:
        """Layer-normalise each member vector, then reduce them (``sum|mean|max``)."""
        if not vectors:
            self.warnings.append(f"group {group.name}: no parameter slice to score; kept whole")
            return np.full(group.size, np.inf)
        stacked = np.stack([_normalized(v, self.settings.layer_norm) for v in vectors])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
            return REDUCTIONS[self.settings.reduction](stacked)

    # -- statistics ------------------------------------------------------------------
    def stat(self, name: str) -> Any:
        """A statistic over the data (``STATISTICS[name]``), computed once per run."""
        if name not in self._stats:
            self._stats[name] = STATISTICS[name](self)
        return self._stats[name]

    def group_slice(self, values: np.ndarray, group: ChannelGroup) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)[self.labels(group)]


def unit_sums(values: torch.Tensor, member: Member, size: int) -> np.ndarray:
    """Sum of ``values`` over each unit's indices along ``member.dim`` (NaN: not in member)."""
    n = values.shape[member.dim]
    per_index = values.detach().double().transpose(0, member.dim).reshape(n, -1).sum(1)
    per_index = per_index.cpu().numpy()
    inside = member.units >= 0
    sums = np.bincount(member.units[inside], weights=per_index[inside], minlength=size)
    present = np.bincount(member.units[inside], minlength=size) > 0
    return np.where(present, sums, np.nan)


def unit_rows(values: torch.Tensor, member: Member, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each present unit's slice as one flat vector: (units present, matrix [units, k])."""
    n = values.shape[member.dim]
    rows = values.detach().double().transpose(0, member.dim).reshape(n, -1).cpu().numpy()
    inside = np.flatnonzero(member.units >= 0)
    order = inside[np.argsort(member.units[inside], kind="stable")]
    units = np.unique(member.units[order])
    return units, rows[order].reshape(len(units), -1)


# ----------------------------------------------------------------------------------
# Weight criteria
# ----------------------------------------------------------------------------------
def _abs(fqn: str, w: torch.Tensor) -> torch.Tensor:
    return w.abs()


def _square(fqn: str, w: torch.Tensor) -> torch.Tensor:
    return w * w


@criterion("l1", per_member=True)
def l1(ctx: ScoreContext, group: ChannelGroup) -> np.ndarray:
    """sum |w| over each member's slice of the unit, reduced over members."""
    return ctx.combine(group, ctx.member_vectors(group, _abs))


@criterion("l2", per_member=True)
def l2(ctx: ScoreContext, group: ChannelGroup) -> np.ndarray:
    """The L2 norm of the unit's parameters: sqrt of the members' sums of w^2, combined
    (the standard norm with the default ``reduction="sum"``; equal to
    ``fxprune.magnitude_scores(p=2)``, which ``Plan.from_ratio(criterion="l2")`` uses)."""
    return np.sqrt(ctx.combine(group, ctx.member_vectors(group, _square)))


_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def is_norm_scale(ctx: ScoreContext, member: Member) -> bool:
    """Whether ``member`` is the per-channel scale (gamma) of a BatchNorm/GroupNorm/LayerNorm."""
    owner, _, name = member.fqn.rpartition(".")
    if name != "weight" or member.role != "dep":
        return False
    try:
        return isinstance(ctx.analysis.gm.get_submodule(owner), _NORM_LAYERS)
    except AttributeError:
        return False


@criterion("bn_scale", per_member=True)
def bn_scale(ctx: ScoreContext, group: ChannelGroup) -> np.ndarray:
    """|gamma| of the group's norm layers (groups without one: +inf, kept whole)."""
    vectors = [unit_sums(ctx.parameter(m.fqn).abs(), m, group.size)
               for m in group.members if is_norm_scale(ctx, m) and ctx.parameter(m.fqn) is not None]
    if not vectors:
        ctx.warnings.append(f"group {group.name}: no norm-layer scale, bn_scale keeps it whole")
        return np.full(group.size, np.inf)
    return ctx.combine(group, vectors)


@criterion("fpgm", per_member=True)
def fpgm(ctx: ScoreContext, group: ChannelGroup) -> np.ndarray:
    """Sum of Euclidean distances from each filter to the group's other live filters."""
    alive = ctx.alive(group)
    vectors = []
    producers = [m for m in group.members if m.role == "out"] or list(group.members)
    for m in producers:
        p = ctx.parameter(m.fqn)
        if p is None:
            continue
        units, rows = unit_rows(p, m, group.size)
        live = alive[units]
        dist = _pairwise_distances(rows, rows[live]).sum(1)
        v = np.full(group.size, np.nan)
        v[units] = dist
        vectors.append(v)
    return ctx.combine(group, vectors)


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``a`` and of ``b`` (via one matrix product)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(sq, 0.0))


def _lamp_vector(squares: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """LAMP: s_u / sum of the live s_v >= s_u (the unit itself included)."""
    out = np.full(len(squares), np.nan)
    live = np.flatnonzero(alive & np.isfinite(squares))
    order = live[np.argsort(squares[live], kind="stable")]
    tail = np.cumsum(squares[order][::-1])[::-1]
    out[order] = np.divide(squares[order], tail, out=np.zeros(len(order)), where=tail > 0)
    return out


@criterion("lamp", per_member=True)
def lamp(ctx: ScoreContext, group: ChannelGroup) -> np.ndarray:
    """LAMP of each member's squared slice norms, reduced over members."""
    alive = ctx.alive(group)
    squares = ctx.member_vectors(group, _square)
    return ctx.combine(group, [_lamp_vector(s, alive) for s in squares])


@criterion("random")
def random(ctx: ScoreContext, group: ChannelGroup) -> np.ndarray:
    """Uniform in [0, 1), seeded by (seed, group id): a baseline every criterion must beat."""
    return np.random.default_rng([ctx.settings.seed, group.id]).random(group.size)


# ----------------------------------------------------------------------------------
# Data-driven criteria
# ----------------------------------------------------------------------------------
@criterion("taylor", needs_data=True, per_member=True)
def taylor(ctx: ScoreContext, group: ChannelGroup) -> np.ndarray:
    """Mean over batches of sum |w * dL/dw| over each member's slice (Molchanov et al.)."""
    stats = ctx.stat("weight_taylor")
    return ctx.combine(group, ctx.member_vectors(group, _StatElements(stats)))


@criterion("obd", needs_data=True, per_member=True)
def obd(ctx: ScoreContext, group: ChannelGroup) -> np.ndarray:
    """1/2 sum h_ww w^2 over each member's slice, h a Hutchinson Hessian diagonal (OBD)."""
    stats = ctx.stat("weight_hessian")
    return ctx.combine(group, ctx.member_vectors(group, _ObdElements(stats)))


@criterion("taylor_gate", needs_data=True)
def taylor_gate(ctx: ScoreContext, group: ChannelGroup) -> np.ndarray:
    """|mean over batches of dL/dgate_u|: the first-order loss change of removing u."""
    return np.abs(ctx.group_slice(ctx.stat("gate_grads").mean(0), group))


@criterion("fisher", needs_data=True)
def fisher(ctx: ScoreContext, group: ChannelGroup) -> np.ndarray:
    """Mean over batches of (dL/dgate_u)^2: the gate's empirical Fisher diagonal."""
    return ctx.group_slice((ctx.stat("gate_grads") ** 2).mean(0), group)


@criterion("hessian", needs_data=True)
def hessian(ctx: ScoreContext, group: ChannelGroup) -> np.ndarray:
    """|-dL/dgate_u + 1/2 H_uu|: second-order loss change of setting gate u to 0."""
    grad = ctx.stat("gate_grads").mean(0)
    curvature = ctx.stat("gate_hessian")
    return np.abs(ctx.group_slice(-grad + 0.5 * curvature, group))


@criterion("cpd", needs_data=True, normalize="memory")
def cpd(ctx: ScoreContext, group: ChannelGroup) -> np.ndarray:
    """CPD: the ``hessian`` gate score, divided by the unit's activation memory."""
    return hessian(ctx, group)


class _StatElements:
    """``per_element`` reading a precomputed per-parameter statistic (named, not a lambda)."""

    def __init__(self, stats: dict[str, torch.Tensor]) -> None:
        self.stats = stats

    def __call__(self, fqn: str, w: torch.Tensor) -> torch.Tensor | None:
        return self.stats.get(fqn)


class _ObdElements(_StatElements):
    """``per_element`` = 1/2 h w^2."""

    def __call__(self, fqn: str, w: torch.Tensor) -> torch.Tensor | None:
        h = self.stats.get(fqn)
        return None if h is None else 0.5 * h * w.double() ** 2


# ----------------------------------------------------------------------------------
# Statistics over the data, computed on a gated deep copy of the graph
# ----------------------------------------------------------------------------------
Statistic = Callable[[ScoreContext], Any]
STATISTICS: dict[str, Statistic] = {}


def statistic(name: str) -> Callable[[Statistic], Statistic]:
    def register(fn: Statistic) -> Statistic:
        STATISTICS[name] = fn
        return fn
    return register


class _Runner:
    """The gated copy, its parameters and the loss of batch ``i`` (built once per run)."""

    def __init__(self, ctx: ScoreContext) -> None:
        from passes.gates import GATES, insert_gates

        self.ctx = ctx
        self.gated = insert_gates(ctx.analysis)
        self.model = self.gated.model().eval()
        self.gates = self.gated.gates
        self.params = {n: p for n, p in self.gated.gm.named_parameters() if n != GATES}
        for p in self.params.values():
            p.requires_grad_(True)
        self.device = self.gates.device
        self.base = torch.as_tensor(ctx.kept, dtype=self.gates.dtype, device=self.device)
        with torch.no_grad():
            self.gates.copy_(self.base)
        self.loss_of, self.n_batches = ctx.settings._loss_source(self.device)

    def grads(self, i: int, wrt: list[torch.Tensor]) -> list[torch.Tensor]:
        loss = self.loss_of(self.model, i)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ImportanceError(f"the loss of batch {i} must be a scalar tensor, got "
                                  f"{type(loss).__name__} {getattr(loss, 'shape', '')}")
        if not torch.isfinite(loss):
            raise NonFiniteScoreError(f"the loss of batch {i} is {loss.item()}: scores would be "
                                      "meaningless; check the data and loss_fn")
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(wrt, grads)]

    def check_gates(self, g: torch.Tensor, what: str) -> None:
        bad = ~torch.isfinite(g)
        if bad.any():
            labels = np.flatnonzero(bad.cpu().numpy())
            names = sorted({self.ctx.analysis.groups[i].name
                            for i in np.unique(self.ctx.analysis.group_of[labels])})
            raise NonFiniteScoreError(f"non-finite {what} for the gates of groups {names}")

    def check_params(self, grads: Iterable[torch.Tensor], what: str) -> None:
        bad = [n for n, g in zip(self.params, grads) if not torch.isfinite(g).all()]
        if bad:
            groups = sorted({g.name for g in self.ctx.analysis.groups
                             for m in g.members if m.fqn in bad})
            raise NonFiniteScoreError(f"non-finite {what} in parameters {bad[:5]} "
                                      f"(groups {groups[:5]})")


def _runner(ctx: ScoreContext) -> _Runner:
    if "_runner" not in ctx._stats:
        ctx._stats["_runner"] = _Runner(ctx)
    return ctx._stats["_runner"]


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    bits = torch.randint(0, 2, like.shape, generator=gen, device="cpu")
    return (bits * 2 - 1).to(like.dtype).to(like.device)


@statistic("gate_grads")
def gate_grads(ctx: ScoreContext) -> np.ndarray:
    """dL_b/dgate per batch b: array [batches, units] (float64)."""
    r = _runner(ctx)
    rows = []
    for i in range(r.n_batches):
        (g,) = r.grads(i, [r.gates])
        r.check_gates(g, f"gradient on batch {i}")
        rows.append(g.double().cpu().numpy())
    return np.stack(rows)


@statistic("gate_hessian")
def gate_hessian(ctx: ScoreContext) -> np.ndarray:
    """Hutchinson diagonal of the gates' Hessian by finite differences of gate gradients."""
    r = _runner(ctx)
    eps, probes = ctx.settings.eps, ctx.settings.probes
    base_grads = ctx.stat("gate_grads")
    gen = torch.Generator().manual_seed(ctx.settings.seed)
    live = r.base > 0
    total = torch.zeros(len(r.base), dtype=torch.float64)
    try:
        for i in range(r.n_batches):
            g0 = torch.as_tensor(base_grads[i])
            for _ in range(probes):
                v = _rademacher(r.base, gen) * live
                with torch.no_grad():
                    r.gates.copy_(r.base + eps * v)
                (g1,) = r.grads(i, [r.gates])
                r.check_gates(g1, f"gradient on batch {i} (Hessian probe)")
                total += v.double().cpu() * (g1.double().cpu() - g0) / eps
    finally:
        with torch.no_grad():
            r.gates.copy_(r.base)
    return (total / (r.n_batches * probes)).numpy()


@statistic("weight_taylor")
def weight_taylor(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Mean over batches of |w * dL_b/dw| per parameter element."""
    r = _runner(ctx)
    names, tensors = list(r.params), list(r.params.values())
    acc = [torch.zeros_like(t, dtype=torch.float64) for t in tensors]
    for i in range(r.n_batches):
        grads = r.grads(i, tensors)
        r.check_params(grads, f"gradient on batch {i}")
        for a, w, g in zip(acc, tensors, grads):
            a += (w.detach() * g).double().abs()
    return {n: (a / r.n_batches).cpu() for n, a in zip(names, acc)}


@statistic("weight_fisher")
def weight_fisher(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Mean over batches of (dL_b/dw)^2 per parameter element (empirical Fisher diagonal)."""
    r = _runner(ctx)
    names, tensors = list(r.params), list(r.params.values())
    acc = [torch.zeros_like(t, dtype=torch.float64) for t in tensors]
    for i in range(r.n_batches):
        grads = r.grads(i, tensors)
        r.check_params(grads, f"gradient on batch {i}")
        for a, g in zip(acc, grads):
            a += g.double() ** 2
    return {n: (a / r.n_batches).cpu() for n, a in zip(names, acc)}


@statistic("weight_hessian")
def weight_hessian(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Hutchinson diagonal of the weights' Hessian by finite differences of gradients."""
    r = _runner(ctx)
    eps, probes = ctx.settings.eps, ctx.settings.probes
    names, tensors = list(r.params), list(r.params.values())
    originals = [t.detach().clone() for t in tensors]
    gen = torch.Generator().manual_seed(ctx.settings.seed)
    acc = [torch.zeros_like(t, dtype=torch.float64) for t in tensors]
    try:
        for i in range(r.n_batches):
            g0 = r.grads(i, tensors)
            r.check_params(g0, f"gradient on batch {i}")
            for _ in range(probes):
                vs = [_rademacher(t, gen) for t in tensors]
                with torch.no_grad():
                    for t, o, v in zip(tensors, originals, vs):
                        t.copy_(o + eps * v)
                g1 = r.grads(i, tensors)
                r.check_params(g1, f"gradient on batch {i} (Hessian probe)")
                for a, v, x, y in zip(acc, vs, g0, g1):
                    a += (v * (y - x)).double() / eps
    finally:
        with torch.no_grad():
            for t, o in zip(tensors, originals):
                t.copy_(o)
    return {n: (a / (r.n_batches * probes)).cpu() for n, a in zip(names, acc)}


def _latency_saving(ctx: ScoreContext, g: ChannelGroup) -> np.ndarray:
    """Per unit of ``g``: predicted ms saved per removed unit, when half of the alive
    units of its class (``fxprune.cost.unit_classes``: one piece of a concat...) are
    removed from ``ctx.kept``; units of one class are interchangeable in shape."""
    from fxprune.planning.cost import measure_latency, unit_classes
    from fxprune.planning.cost.latency import latency_table_mismatch

    table = ctx.settings.latency
    if table is None:
        table = ctx._stats.get("_latency_table")
        if table is None:
            table = ctx._stats["_latency_table"] = measure_latency(ctx.cost)
    elif latency_table_mismatch(table, ctx.cost):
        raise ImportanceError(f"Importance(normalize='latency'): "
                              f"{latency_table_mismatch(table, ctx.cost)}")
    base = ctx._stats.get("_latency_base")
    if base is None:
        base = ctx._stats["_latency_base"] = table.predict(ctx.cost, ctx.kept)
    labels = ctx.labels(g)  # local order
    out = np.zeros(g.size)
    for units in unit_classes(g):
        alive = units[ctx.kept[labels[units]]]
        cut = len(alive) // 2
        if cut == 0:
            continue  # one unit left: removing it would empty the piece
        kept = ctx.kept.copy()
        kept[labels[alive[:cut]]] = False
        out[units] = (base - table.predict(ctx.cost, kept)) / cut
    return out


# ----------------------------------------------------------------------------------
# The public configuration
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Importance:
    """A criterion and how to apply it; ``scores(analysis)`` gives every group's scores.

    ``criterion``: a name in ``CRITERIA`` or ``fn(analysis, group) -> scores``.
    ``reduction``: how member vectors combine (``sum|mean|max``); ``layer_norm``: divide
    each member vector (or a gate criterion's group vector) by its ``mean|max|sum|l2``
    first. ``normalize``: divide by the unit's ``memory|macs|params|latency`` saving;
    ``"auto"`` takes the criterion's default (``cpd``: memory), ``None`` turns it off.
    ``"latency"`` (score per predicted ms saved, the latency-aware ranking of HALP, Shen
    et al. 2022) reads ``latency``, a ``fxprune.cost.LatencyTable`` measured on the
    target device (else measured here, on this one, and cached): a group's per-unit saving
    is the table's predicted drop when half the group's alive units go, per unit.
    ``latency_weight`` (``a >= 0``, with ``normalize="latency"``) divides instead by
    ``ms * (ms / MACs) ** (a - 1)``: 1 is the score per ms above, 0 the score per MAC,
    and above 1 the ranking prefers removing units whose milliseconds per MAC are high
    (the layers the backend runs least efficiently), so that at a MAC target the plan
    is faster, trading some score (``benchmarks/latency_aware.py`` measures both).
    Data-driven criteria need ``data`` (an iterable of ``(inputs, target)`` batches; only
    the first ``batches`` are read, once) with ``loss_fn(output, target)``, or
    ``closure(model, i) -> loss`` for batch ``i < batches``. ``probes`` and ``eps`` set
    the Hutchinson estimate; ``seed`` seeds it and ``random``.

    An ``Importance`` is also a ``(analysis, group) -> scores`` callable, so it can be
    passed as ``Plan.from_ratio(..., criterion=Importance(...))``.
    """

    criterion: str | Callable[[GroupAnalysis, ChannelGroup], np.ndarray] = "l1"
    reduction: str = "sum"
    layer_norm: str | None = None
    normalize: str | None = "auto"
    data: Any = field(default=None, repr=False, compare=False)
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = field(default=None, repr=False,
                                                               compare=False)
    closure: LossOf | None = field(default=None, repr=False, compare=False)
    batches: int = 4
    probes: int = 2
    eps: float = 1e-3
    seed: int = 0
    latency: Any = field(default=None, repr=False, compare=False)
    latency_weight: float = 1.0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.criterion, str) and self.criterion not in CRITERIA:
            raise ImportanceError(f"unknown criterion {self.criterion!r}; known: {sorted(CRITERIA)}")
        if self.reduction not in REDUCTIONS:
            raise ImportanceError(f"reduction must be one of {sorted(REDUCTIONS)}")
        if self.layer_norm is not None and self.layer_norm not in LAYER_NORMS:
            raise ImportanceError(f"layer_norm must be None or one of {sorted(LAYER_NORMS)}")
        if self.normalize not in (None, "auto") + COST_NORMALIZERS:
            raise ImportanceError(f"normalize must be None, 'auto' or one of {COST_NORMALIZERS}")
        if self.latency is not None and self.normalize != "latency":
            raise ImportanceError("latency= is read by normalize='latency' only; pass both, or "
                                  "give the table to fxprune.plan(latency=...) for a latency "
                                  "target")
        w = self.latency_weight
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not (
                math.isfinite(w) and w >= 0):
            raise ImportanceError(f"latency_weight must be a finite number >= 0, got {w!r}")
        if self.latency_weight != 1.0 and self.normalize != "latency":
            raise ImportanceError("latency_weight is read by normalize='latency' only")
        if self.batches < 1 or self.probes < 1 or not self.eps > 0:
            raise ImportanceError("batches and probes must be >= 1 and eps > 0")
        if self.spec is not None and self.spec.needs_data and self.closure is None and (
                self.data is None or self.loss_fn is None):
            raise ImportanceError(
                f"criterion {self.spec.name!r} is data-driven: pass data=<iterable of (inputs, "
                "target)> and loss_fn=<fn(output, target)>, or closure=<fn(model, i) -> loss>")

    @property
    def spec(self) -> CriterionSpec | None:
        return CRITERIA.get(self.criterion) if isinstance(self.criterion, str) else None

    @property
    def name(self) -> str:
        return self.criterion if isinstance(self.criterion, str) else getattr(
            self.criterion, "__name__", type(self.criterion).__name__)

    @property
    def needs_data(self) -> bool:
        return bool(self.spec and self.spec.needs_data)

    @property
    def cost_kind(self) -> str | None:
        if self.normalize == "auto":
            return self.spec.normalize if self.spec else None
        return self.normalize

    # -- scoring ---------------------------------------------------------------------
    def scores(self, analysis: GroupAnalysis, *, kept: np.ndarray | None = None,
               cost: Any = None) -> GroupScores:
        """Per-unit scores of every group (group name -> float64 array of its size)."""
        ctx = ScoreContext(analysis, self, kept, cost)
        out = self.scores_in(ctx)
        _check_finite(out)
        for message in dict.fromkeys(ctx.warnings):
            warnings.warn(message, stacklevel=2)
        return out

    def scores_in(self, ctx: ScoreContext) -> GroupScores:
        """Per-unit scores of every group of ``ctx.analysis`` (raw, per-group normalised,
        divided by unit cost where asked), read through ``ctx`` (its kept units, cost model
        and statistics). ``scores`` builds the context; a training loop passes its own,
        whose statistics come from its backward passes (``ScoreContext.set_statistics``)."""
        out: GroupScores = {}
        for g in ctx.analysis.groups:
            raw = self._raw(ctx, ctx.analysis, g)
            if not (self.spec and self.spec.per_member):
                raw = _normalized(raw, self.layer_norm)
            out[g.name] = self._per_cost(ctx, g, raw)
        return out

    def _raw(self, ctx: ScoreContext, analysis: GroupAnalysis, g: ChannelGroup) -> np.ndarray:
        if self.spec is not None:
            raw = self.spec.fn(ctx, g)
        else:
            raw = self.criterion(analysis, g)
        raw = np.asarray(raw, dtype=np.float64).reshape(-1)
        if raw.shape != (g.size,):
            raise ImportanceError(f"criterion {self.name!r} gave {raw.shape[0]} scores for group "
                                  f"{g.name} of size {g.size}")
        return raw

    def _per_cost(self, ctx: ScoreContext, g: ChannelGroup, raw: np.ndarray) -> np.ndarray:
        kind = self.cost_kind
        if kind is None:
            return raw
        unit = self._latency_divisor(ctx, g) if kind == "latency" else \
            ctx.cost.unit_cost(g, kind)
        free = unit <= 0
        if free.any():
            ctx.warnings.append(f"group {g.name}: removing {int(free.sum())} of its units saves "
                                f"no {kind}; normalize={kind!r} keeps them (score +inf)")
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(free, np.inf, raw / np.where(free, 1.0, unit))

    def _latency_divisor(self, ctx: ScoreContext, g: ChannelGroup) -> np.ndarray:
        """ms saved x (ms saved per MAC saved) ** (latency_weight - 1), per unit: the
        score per ms at weight 1, per MAC at 0 (for units that save MACs), and above 1
        a growing preference for the units whose milliseconds per MAC are high."""
        ms = _latency_saving(ctx, g)
        a = float(self.latency_weight)
        if a == 1.0:
            return ms
        macs = ctx.cost.unit_cost(g, "macs")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where((macs > 0) & (ms > 0), ms / np.where(macs > 0, macs, 1.0), 1.0)
        return np.where(macs > 0, ms * ratio ** (a - 1.0), ms)

    def __call__(self, analysis: GroupAnalysis, group: ChannelGroup) -> np.ndarray:
        key = (id(analysis), analysis.fingerprint)
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = self.scores(analysis)
        return self._cache[key][group.name]

    # -- data ------------------------------------------------------------------------
    def _loss_source(self, device: torch.device) -> tuple[LossOf, int]:
        if self.closure is not None:
            return self.closure, self.batches
        batches = _take(self.data, self.batches, device)
        if not batches:
            raise ImportanceError(f"criterion {self.name!r}: data yielded no batch")
        return _BatchLoss(batches, self.loss_fn), len(batches)


class _BatchLoss:
    """``loss_fn(model(*inputs_i), target_i)`` over materialised batches."""

    def __init__(self, batches: list[tuple[tuple, Any]], loss_fn: Callable) -> None:
        self.batches, self.loss_fn = batches, loss_fn

    def __call__(self, model: nn.Module, i: int) -> torch.Tensor:
        inputs, target = self.batches[i]
        return self.loss_fn(model(*inputs), target)


def _take(data: Iterable, n: int, device: torch.device) -> list[tuple[tuple, Any]]:
    out = []
    for batch in data:
        if len(out) >= n:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ImportanceError("each data batch must be a pair (inputs, target); inputs a "
                                  "tensor or a tuple of tensors")
        inputs, target = batch
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        out.append((tuple(_to(x, device) for x in inputs), _to(target, device)))
    return out


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _check_finite(scores: GroupScores) -> None:
    bad = [name for name, s in scores.items() if np.isnan(s).any() or np.isneginf(s).any()]
    if bad:
        raise NonFiniteScoreError(f"NaN or -inf scores in groups {bad[:8]}"
                                  f"{' ...' if len(bad) > 8 else ''}: the criterion cannot rank "
                                  "them (a unit without any parameter slice, or a broken statistic)")


def importance_scores(analysis: GroupAnalysis, criterion: str | Callable = "l1",
                      **settings: Any) -> GroupScores:
    """``Importance(criterion, **settings).scores(analysis)``."""
    return Importance(criterion, **settings).scores(analysis)


_BUILTIN = ("l1", "l2", "random")  # scored here (seeded by ``seed``), no registry call


class _Registered:
    """A registry criterion, scored once for the whole analysis, read per group."""

    def __init__(self, name: str, scores: Mapping[str, np.ndarray]) -> None:
        self.__name__ = name
        self._scores = scores

    def __call__(self, analysis: GroupAnalysis, group: ChannelGroup) -> np.ndarray:
        return self._scores[group.name]


def resolve_criterion(analysis: GroupAnalysis, criterion: Any) -> Any:
    """A criterion name resolved through the one registry (``fxprune.CRITERIA``).

    Raises ``ImportanceError`` for a name the registry does not know (never a silent
    fallback to L1), and for a data-driven name given without data.
    """
    if callable(criterion):
        return criterion
    if not isinstance(criterion, str) or criterion not in CRITERIA:
        raise ImportanceError(f"unknown criterion {criterion!r}; known: {sorted(CRITERIA)} "
                              "or a callable (analysis, group) -> scores")
    if criterion in _BUILTIN:
        return criterion
    if CRITERIA[criterion].needs_data:
        raise ImportanceError(f"criterion {criterion!r} is data-driven: pass criterion="
                              f"fxprune.Importance({criterion!r}, data=..., loss_fn=...) "
                              "(or closure=...), or use a data-free one such as 'l1'")
    return _Registered(criterion, Importance(criterion).scores(analysis))  # needs_data raises


plan_module.criterion_resolver = resolve_criterion
