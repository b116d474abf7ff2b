"""Prune while training (CPD sections III-C/III-D): score from the training backward
passes, remove units by zeroing gates on a schedule, finish with ``compile`` + ``verify``.

    pruner = Pruner(model, example_inputs, criterion="taylor_gate", target_macs=0.5,
                    interval=20, steps=200)
    student, teacher = pruner.student, pruner.teacher
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    for x, y in batches:
        s = student(x)
        with torch.no_grad():
            t = teacher(x)
        loss = mixed_kd_loss(F.cross_entropy(s, y), s, t, alpha=0.5, temperature=4.0)
        opt.zero_grad(); loss.backward(); opt.step()
        pruner.step()                       # after optimizer.step()
    result = pruner.finish()                # small GraphModule, plan, slice == mask report

*Scores.* ``dL/dgate`` of every training backward is kept (one row per step, the gates'
hook: no extra pass). At the end of each interval of ``interval`` steps the registered
criterion (``fxprune.importance.CRITERIA``) reads those rows as its ``gate_grads``
statistic (``taylor_gate``: |mean|, ``fisher``: mean of squares), ``taylor`` reads
mean |w dL/dw| kept by parameter hooks, and curvature criteria (``hessian``, ``cpd``,
``obd``) take one extra forward and one double backward per interval on
``closure(student) -> loss``: Hutchinson's ``diag(H) ~ v * (H v)`` with Rademacher ``v``
(Hutchinson 1990; CPD eq. 5). Data-free criteria (``l1``, ``bn_scale``...) read the
current weights. Scores are all-reduced (mean) over ``torch.distributed`` ranks.

*Removal.* At removal ``k`` of ``K = steps // interval`` the budget is
``dense - f(k, K) (dense - target)`` with ``f`` the schedule: ``"linear"`` ``k/K``, or
``"cubic"`` ``1 - (1 - k/K)^3`` (Zhu & Gupta 2017, "To prune, or not to prune").
``fxprune.plan`` (the budget planner, on ``fxprune.cost``) picks the lowest-scored units,
with units already removed ranked first; their gates go to 0 and stay there. A gated
unit's producer rows and consumer columns get no gradient (the gate multiplies the only
path), so masked units stay exactly removed.

*Learned masks.* ``selection="slimming"`` (Network Slimming, Liu et al. 2017):
``pruner.penalty()`` is ``l1 * sum |gamma|`` over the norm scales of prunable groups, to
add to the loss; removals take the smallest ``|gamma|`` (criterion ``bn_scale``) under the
same budget and schedule. ``selection="soft"`` (ViT-Slim, Chavan et al. 2022): the
student gets one learnable real mask per unit (``pruner.mask_parameters()``, initialised
to 1) multiplied into the 0/1 gates; ``penalty()`` is ``l1 * sum |m|`` over kept units;
removals take the smallest ``|m|``; removed units' masks are frozen; ``finish()`` folds
the kept masks into the weights they scale (``fxprune.distill.soft``).

Errors (``fxprune.errors``): ``BudgetError`` (already met / unreachable), ``DistillError``
(interval, steps, teacher output, missing closure), ``GateTamperError`` (a gate changed
outside the pruner), ``CheckpointMismatchError`` (a checkpoint of another model/plan).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._pytree import tree_flatten

import fxprune
from fxprune.distill.student import GatedStudent, set_graph_training
from fxprune.core.errors import (BudgetError, CheckpointMismatchError, DistillError, GateTamperError,
                            ImportanceError)
from fxprune.core.graph_meta import get_meta
from fxprune.planning.importance import CRITERIA, Importance, ScoreContext
from fxprune.planning.planner import SCHEDULES as PLANNER_SCHEDULES
from fxprune.planning.planner import cubic_schedule, linear_schedule
from fxprune.distill.soft import find_soft_folds
from passes.gates import GATES, apply_gate, insert_gates

__all__ = ["Pruner", "DistillResult", "SCHEDULES", "save_checkpoint", "load_checkpoint",
           "cubic_schedule", "linear_schedule"]

FORMAT = 1
REMOVED = -np.finfo(np.float64).max  # ranks first; the planner rejects -inf
SELECTIONS = ("scored", "slimming", "soft")
SOFT = "soft_mask"  # the criterion name a soft-mask pruner records in its identity


SCHEDULES = {name: PLANNER_SCHEDULES[name] for name in ("linear", "cubic")}
# criterion -> statistics gathered during training (gate gradients are always kept)
NEEDS = {"taylor": ("weight_taylor",), "hessian": ("gate_hessian",), "cpd": ("gate_hessian",),
         "obd": ("weight_hessian",)}


def _ungateable_groups(analysis: Any) -> frozenset[str]:
    """Groups the planner may prune whose gates cannot compute their removal: a channel
    mixer over their units (LayerNorm/GroupNorm statistics) sees the gated units, the
    compiled model does not. They are left whole, with a warning naming them."""
    names = frozenset(g.name for g in analysis.groups
                      if not g.exact and "softmax" not in g.inexact_kinds)
    if names:
        kinds = sorted({k for g in analysis.groups if g.name in names for k in g.inexact_kinds})
        warnings.warn(f"Pruner leaves {len(names)} group(s) whole: {sorted(names)}: a gate "
                      f"cannot compute what removing their units computes ({', '.join(kinds)} "
                      "over their channels), so the trained student would differ from the "
                      "compiled model. Prune them after distillation with fxprune.plan / "
                      "fxprune.compile (slice == mask holds there) if needed", UserWarning,
                      stacklevel=3)
    return names


def _no_closure(model: nn.Module, i: int) -> torch.Tensor:
    raise ImportanceError("prune-while-training criteria read statistics of the training run")


class _Statistics(dict):
    """The statistics a criterion may read; an unknown one raises a typed error."""

    def __missing__(self, name: str) -> Any:
        raise ImportanceError(f"statistic {name!r} is not gathered while training (gathered: "
                              f"{sorted(self)}); use a criterion that reads those, or a "
                              "data-free one (l1, l2, bn_scale, fpgm, lamp)")

    def __contains__(self, name: object) -> bool:  # ScoreContext.stat tests membership
        return True


class _FixedScores:
    """``fn(analysis, group) -> scores`` for the planner, from precomputed scores."""

    def __init__(self, scores: Mapping[str, np.ndarray]) -> None:
        self.scores = scores

    def __call__(self, analysis: Any, group: Any) -> np.ndarray:
        return self.scores[group.name]


@dataclass(frozen=True)
class DistillResult:
    """``finish()``: the small model, its plan, the slice == mask report, student agreement."""

    model: torch.fx.GraphModule = field(repr=False)
    plan: fxprune.Plan = field(repr=False)
    report: Any = field(repr=False)
    student_max_err: float
    macs: float
    params: float
    dense_macs: float
    dense_params: float


class Pruner:
    """Prune-while-training hook: build the student and teacher, call ``step()`` per step.

    ``model``/``example_inputs``: the user's model (never modified) and inputs for capture.
    Budget (exactly one): ``target_macs``/``target_params``/``target_latency``, a fraction
    <= 1 of the dense cost or an absolute value (MACs, parameters, ms). ``interval``:
    training steps between removals; ``steps``: steps by which the budget is reached
    (``steps // interval`` removals, after ``start`` warm-up steps). ``criterion``: any
    name in ``CRITERIA``; ``normalize``/``layer_norm``/``scope``/``round_to``/
    ``max_ratio_per_group`` as in ``fxprune.plan``. ``closure(student) -> loss`` feeds the
    curvature criteria's one extra pass per interval. ``teacher``: default a frozen
    eval-mode deep copy of ``model``; a teacher passed in is frozen the same way on a deep
    copy (the user's teacher is left untouched; the copy costs its size in memory; an
    exported GraphModule's eval mode is set with ``set_graph_training``). ``frontend``: ``"fx"`` or ``"export"``;
    ``split_policy``: as in ``fxprune.analyze`` (``"outer"``: whole attention heads).
    ``split_ties`` (default ``False``, unlike ``fxprune.plan``): the result is a
    GraphModule, which takes any plan, so the split and count ties that keep a plan
    followable by ``compile(output="module")`` do not hold units back here; ``True``
    plans as ``fxprune.plan`` does by default (its plan then compiles to the user's class).
    ``selection``: ``"scored"`` (rank by ``criterion``, default ``taylor_gate``),
    ``"slimming"`` (L1 on norm scales) or ``"soft"`` (L1 on learnable per-unit soft masks,
    ``mask_parameters()``; no ``criterion``); ``l1`` >= 0 weighs ``penalty()``.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, *, target_macs: float | None = None,
                 target_params: float | None = None, target_latency: float | None = None,
                 interval: int = 10, steps: int = 100, start: int = 0,
                 criterion: str | None = None, schedule: str | Callable = "cubic",
                 selection: str = "scored", l1: float = 1e-4, normalize: str | None = "auto",
                 layer_norm: str | None = None, scope: str = "local", round_to: int = 1,
                 max_ratio_per_group: float = 0.9, closure: Callable | None = None,
                 teacher: nn.Module | None = None, frontend: str = "fx", probes: int = 1,
                 seed: int = 0, latency: Any = None, process_group: Any = None,
                 split_policy: str | None = None, split_ties: bool = False) -> None:
        self._check_args(interval, steps, start, criterion, schedule, selection, l1)
        self.interval, self.steps, self.start = interval, steps, start
        self.criterion = {"slimming": "bn_scale", "soft": SOFT}.get(
            selection, criterion or "taylor_gate")
        self.selection, self.l1 = selection, float(l1)
        soft = selection == "soft"
        self.schedule = SCHEDULES[schedule] if isinstance(schedule, str) else schedule
        self.schedule_name = schedule if isinstance(schedule, str) else getattr(
            schedule, "__name__", "custom")
        self.total_removals = steps // interval
        self.plan_options = dict(scope=scope, round_to=round_to,
                                 max_ratio_per_group=max_ratio_per_group,
                                 split_ties=bool(split_ties))
        self.importance = None if soft else Importance(
            self.criterion, closure=_no_closure, normalize=normalize, layer_norm=layer_norm,
            probes=probes, seed=seed)
        self.needs = NEEDS.get(self.criterion, ())
        self.closure, self.probes = closure, probes
        self.process_group = process_group
        self.generator = torch.Generator().manual_seed(seed)

        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else \
            tuple(example_inputs)
        self.example_inputs = inputs
        # Capture from a train-mode copy: export bakes the mode into the graph.
        captured = copy.deepcopy(model).train()
        options = {} if split_policy is None else {"split_policy": split_policy}
        self.analysis = fxprune.analyze(captured, inputs, frontend=frontend, **options)
        self.export = get_meta(self.analysis.gm, "frontend") == "export"
        gated = insert_gates(self.analysis)
        # soft: refuse now (not after training) a mask that cannot be folded exactly
        self.folds = find_soft_folds(self.analysis, gated.sites, gated.param_gates) \
            if soft else ()
        self.student = GatedStudent(gated, export=self.export, soft=soft).train()
        self._soft_live = torch.zeros(self.analysis.num_units, dtype=torch.bool)
        for gid in gated.gated_groups:  # units whose mask reaches the loss
            self._soft_live[torch.as_tensor(self.analysis.group_of == gid)] = True
        self.frozen = self.student.soft_mask.detach().clone() if soft else None
        self.whole = _ungateable_groups(self.analysis)
        self.live = dataclasses.replace(self.analysis, gm=self.student.gm)
        # the teacher is frozen on a copy: the user's model (or their teacher) is never
        # switched to eval mode, frozen or rewritten in place
        teacher = copy.deepcopy(model if teacher is None else teacher)
        if isinstance(teacher, torch.fx.GraphModule):  # an exported module rejects .eval()
            set_graph_training(teacher, False)
        else:
            teacher.eval()
        self.teacher = teacher.requires_grad_(False)
        self._check_teacher(inputs)

        from fxprune.planning.cost import compute_cost
        self.cost = compute_cost(self.analysis)
        self.budget_kind, self.target = self._budget(target_macs, target_params,
                                                     target_latency, latency)
        self.mask = torch.ones(self.analysis.num_units, dtype=torch.bool)
        self.step_count = 0
        self.removals = 0
        self.rows: list[torch.Tensor] = []
        self.weight_stats: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, float]] = []
        self._hooks = self._weight_hooks() if "weight_taylor" in self.needs else []
        self._scales: list[str] | None = None
        self.student.recording = not soft  # soft masks rank by |m|: no gate gradients

    # -- construction checks ---------------------------------------------------------
    @staticmethod
    def _check_args(interval: Any, steps: Any, start: Any, criterion: str | None,
                    schedule: Any, selection: str, l1: Any) -> None:
        if not isinstance(interval, int) or interval < 1:
            raise DistillError(f"interval must be an integer >= 1 (training steps between "
                               f"removals), got {interval!r}")
        if not isinstance(steps, int) or steps < interval:
            raise DistillError(f"steps must be an integer >= interval ({interval}): the budget "
                               f"is reached in steps // interval removals, got {steps!r}")
        if not isinstance(start, int) or start < 0:
            raise DistillError(f"start must be an integer >= 0, got {start!r}")
        if criterion is not None and criterion not in CRITERIA:
            raise DistillError(f"unknown criterion {criterion!r}; known: {sorted(CRITERIA)}")
        if not callable(schedule) and schedule not in SCHEDULES:
            raise DistillError(f"schedule must be a callable or one of {sorted(SCHEDULES)}")
        if selection not in SELECTIONS:
            raise DistillError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if not isinstance(l1, (int, float)) or not np.isfinite(l1) or l1 < 0:
            raise DistillError(f"l1 must be a finite number >= 0 (weight of the sparsity "
                               f"penalty), got {l1!r}")
        if selection == "soft" and criterion is not None:
            raise DistillError(f"selection='soft' ranks units by their learned mask |m|; "
                               f"criterion={criterion!r} would be ignored: drop criterion=, "
                               "or use selection='scored' to rank by a criterion")

    def _check_teacher(self, inputs: tuple) -> None:
        with torch.no_grad():
            was = self.student.training
            self.student.eval()
            s_out = self.student(*inputs)
            self.student.train(was)
            t_out = self.teacher(*inputs)
        s_leaves, s_spec = tree_flatten(s_out)
        t_leaves, t_spec = tree_flatten(t_out)
        s_shapes = [tuple(t.shape) for t in s_leaves if isinstance(t, torch.Tensor)]
        t_shapes = [tuple(t.shape) for t in t_leaves if isinstance(t, torch.Tensor)]
        if s_spec != t_spec or s_shapes != t_shapes:
            raise DistillError(f"the teacher's outputs {t_shapes} ({t_spec}) do not match the "
                               f"student's {s_shapes} ({s_spec}): use a teacher with the same "
                               "output structure (classes, embedding width), or distil a "
                               "matching part with your own loss in the hook API")

    def _budget(self, macs: Any, params: Any, latency_ms: Any, latency: Any
                ) -> tuple[str, float]:
        given = {k: v for k, v in {"macs": macs, "params": params, "latency": latency_ms}.items()
                 if v is not None}
        if len(given) != 1:
            raise DistillError("give exactly one budget: target_macs=, target_params= or "
                               f"target_latency= (got {sorted(given) or 'none'})")
        kind, value = next(iter(given.items()))
        if kind == "latency":
            from fxprune.planning.cost import measure_latency
            self.latency = latency if latency is not None else measure_latency(self.cost)
        else:
            self.latency = None
        dense = self._cost_of(None, kind)
        value = float(value)
        if not (value > 0 and np.isfinite(value)):
            raise BudgetError(f"target_{kind} must be a positive number (a fraction <= 1 of the "
                              f"dense model, or an absolute value > 1), got {value}")
        target = value * dense if value <= 1.0 else value
        if target >= dense:
            raise BudgetError(f"the {kind} budget {target:,.6g} is already met by the dense "
                              f"model ({dense:,.6g}): nothing to prune; ask for less "
                              f"(e.g. target_{kind}=0.5)")
        try:  # a dry run of the planner with the same caps: fail now, not at the last removal
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                zeros = {g.name: np.full(g.size, np.inf if g.name in self.whole else 0.0)
                         for g in self.analysis.groups}
                fxprune.plan(self.analysis, _FixedScores(zeros), cost=self.cost,
                             latency=self.latency, **{f"target_{kind}": target / dense},
                             **self.plan_options)
        except BudgetError as exc:
            raise BudgetError(f"the {kind} budget {target:,.6g} cannot be reached by pruning "
                              f"while training (dense {dense:,.6g}): {exc}") from None
        return kind, target

    def _cost_of(self, kept: np.ndarray | None, kind: str) -> float:
        if kind == "latency":
            return float(self.latency.predict(self.cost, kept))
        return float(self.cost.evaluate(kept)[kind])

    def _weight_hooks(self) -> list:
        hooks = []
        for name, p in self.student.gm.named_parameters():
            hooks.append(p.register_hook(_WeightTaylor(self, name, p)))
        return hooks

    # -- the training-loop API ---------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """The sparsity term to add to the loss: Network Slimming's ``l1 * sum |gamma|``
        over prunable groups' norm scales, or (``selection="soft"``) ``l1 * sum |m|`` over
        the soft masks of kept, gated units (removed units get no gradient). 0 otherwise."""
        ref = self.student.mask
        total = ref.new_zeros(())
        if self.selection == "soft":
            m = self.student.soft_mask
            live = (self.mask & self._soft_live).to(m.device, m.dtype)
            return self.l1 * (m.abs() * live).sum()
        if self.selection != "slimming":
            return total
        for fqn in self._norm_scales():
            total = total + self.student.gm.get_parameter(fqn).abs().sum()
        return self.l1 * total

    def mask_parameters(self) -> list[nn.Parameter]:
        """The learnable soft masks (``selection="soft"``), e.g. for their own optimizer
        parameter group (learning rate, no weight decay); [] for other selections."""
        return [] if self.student.soft_mask is None else [self.student.soft_mask]

    def weight_parameters(self) -> list[nn.Parameter]:
        """``student.parameters()`` without the soft masks (the model's own weights)."""
        masks = {id(p) for p in self.mask_parameters()}
        return [p for p in self.student.parameters() if id(p) not in masks]

    def _norm_scales(self) -> list[str]:
        if self._scales is None:
            ctx = ScoreContext(self.live, self.importance)
            from fxprune.planning.importance import is_norm_scale  # one definition of "a norm's gamma"
            self._scales = sorted({m.fqn for g in self.analysis.groups for m in g.members
                                   if is_norm_scale(ctx, m)})
        return self._scales

    def step(self) -> dict[str, float] | None:
        """Call after ``optimizer.step()``: record the step's gate gradients; remove units
        when an interval ends. Returns the log entry of a removal, else None."""
        self._check_gates()
        self._freeze_removed()
        pending = self.student.pending_grads
        if pending:
            self.rows.append(torch.stack(pending).sum(0))
            pending.clear()
        self.step_count += 1
        due = (self.step_count > self.start and (self.step_count - self.start) % self.interval == 0
               and self.removals < self.total_removals)
        return self._remove() if due else None

    @property
    def done(self) -> bool:
        return self.removals >= self.total_removals

    def budget_reached(self) -> float:
        """Fraction of the way from the dense cost to the target (1.0: budget met)."""
        dense = self._cost_of(None, self.budget_kind)
        now = self._cost_of(self.mask.numpy(), self.budget_kind)
        return (dense - now) / (dense - self.target)

    def _freeze_removed(self) -> None:
        """Removed units' soft masks back to their value at removal: their gradient is 0,
        but momentum or weight decay would still move them."""
        if self.frozen is None:
            return
        m = self.student.soft_mask
        gone = (~self.mask).to(m.device)
        with torch.no_grad():
            m[gone] = self.frozen.to(m.device, m.dtype)[gone]

    def _check_gates(self) -> None:
        now = self.student.mask.detach().cpu()
        want = self.mask.to(now.dtype)
        if not torch.equal(now, want):
            bad = np.flatnonzero((now != want).numpy())
            groups = sorted({self.analysis.groups[i].name
                             for i in np.unique(self.analysis.group_of[bad])})
            raise GateTamperError(
                f"{len(bad)} gates of the student were changed outside the pruner (groups "
                f"{groups[:5]}): gates are the pruner's state. Do not pass them to an optimizer "
                "or write them; restore with pruner.load_state_dict(...) from a checkpoint")

    # -- scoring and removal -----------------------------------------------------------
    def _statistics(self) -> _Statistics:
        stats = _Statistics()
        rows = torch.stack(self.rows) if self.rows else torch.zeros(1, self.analysis.num_units,
                                                                    dtype=torch.float64)
        weight = {k: v / max(len(self.rows), 1) for k, v in self.weight_stats.items()}
        curvature: dict[str, Any] = {}
        if any("hessian" in n for n in self.needs):
            curvature = self._curvature()
        rows, weight, curvature = self._all_reduce(rows, weight, curvature)
        stats["gate_grads"] = rows.numpy()
        if "weight_taylor" in self.needs:
            stats["weight_taylor"] = weight
        if "gate_hessian" in curvature:
            stats["gate_hessian"] = curvature["gate_hessian"].numpy()
        if "weight_hessian" in curvature:
            stats["weight_hessian"] = curvature["weight_hessian"]
        return stats

    def _curvature(self) -> dict[str, Any]:
        """Hutchinson diagonals from one forward and one double backward on ``closure``."""
        if self.closure is None:
            raise DistillError(f"criterion {self.criterion!r} needs a curvature estimate: pass "
                               "Pruner(..., closure=<fn(student) -> loss on one batch>) (one "
                               "extra forward/backward per interval; fit() sets it), or use "
                               "taylor_gate / fisher / taylor")
        student = self.student
        buffers = {n: b.detach().clone() for n, b in student.gm.named_buffers()}
        live = self.mask.to(student.mask.dtype).to(student.mask.device)
        gates = student.mask.detach().clone().requires_grad_(True)
        weights = dict(student.gm.named_parameters()) if "obd" == self.criterion else {}
        wrt = [gates, *weights.values()]
        out_g = torch.zeros(len(gates), dtype=torch.float64)
        out_w = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in weights.items()}
        try:
            for _ in range(self.probes):
                loss = student.with_gates(gates, self.closure)
                grads = torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True)
                vs = [_rademacher(t, self.generator) for t in wrt]
                vs[0] = vs[0] * live
                dot = sum((g * v).sum() for g, v in zip(grads, vs) if g is not None)
                hv = torch.autograd.grad(dot, wrt, allow_unused=True)
                for i, (v, h) in enumerate(zip(vs, hv)):
                    if h is None:
                        continue
                    if i == 0:
                        out_g += (v * h).double().cpu()
                    else:
                        out_w[list(weights)[i - 1]] += (v * h).double()
        finally:
            with torch.no_grad():  # the extra pass must not move BatchNorm running stats
                for n, b in student.gm.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])
        result: dict[str, Any] = {"gate_hessian": out_g / self.probes}
        if weights:
            result["weight_hessian"] = {n: (w / self.probes).cpu() for n, w in out_w.items()}
        return result

    def _all_reduce(self, rows: torch.Tensor, weight: dict, curvature: dict) -> tuple:
        if not (dist.is_available() and dist.is_initialized()):
            return rows, weight, curvature
        world = dist.get_world_size(self.process_group)
        tensors = [rows, *weight.values(), *[v for v in curvature.values()
                                               if isinstance(v, torch.Tensor)]]
        for d in curvature.values():
            if isinstance(d, dict):
                tensors += list(d.values())
        for t in tensors:
            dist.all_reduce(t, group=self.process_group)
            t /= world
        return rows, weight, curvature

    def scores(self) -> dict[str, np.ndarray]:
        """Per-group unit scores from this interval's statistics (removed units: ``REMOVED``, ranked first)."""
        if self.selection == "soft":
            return self._soft_scores()
        imp = self.importance
        ctx = ScoreContext(self.live, imp, kept=self.mask.numpy(), cost=self.cost)
        ctx.set_statistics(self._statistics())
        kept = self.mask.numpy()
        out = {}
        for name, s in imp.scores_in(ctx).items():
            s = s.copy()
            g = self.analysis.group(name)
            s[~kept[self.analysis.group_of == g.id]] = REMOVED
            if g.name in self.whole:
                s[:] = np.inf  # +inf: never removed (the planner skips the group)
            out[g.name] = s
        return out

    def _soft_scores(self) -> dict[str, np.ndarray]:
        """``|m|`` per unit (ViT-Slim: the smallest masks go first); removed: ``REMOVED``."""
        m = self.student.soft_mask.detach().abs().double().cpu()
        if dist.is_available() and dist.is_initialized():  # DDP keeps them equal; be sure
            dist.all_reduce(m, group=self.process_group)
            m /= dist.get_world_size(self.process_group)
        m = m.numpy().copy()
        m[~self.mask.numpy()] = REMOVED
        return {g.name: m[self.analysis.group_of == g.id] for g in self.analysis.groups}

    def _remove(self) -> dict[str, float]:
        scores = self.scores()
        self.removals += 1
        fraction = float(self.schedule(self.removals, self.total_removals))
        if not 0.0 <= fraction <= 1.0:
            raise DistillError(f"schedule gave {fraction} at removal {self.removals}; fractions "
                               "lie in [0, 1]")
        dense = self._cost_of(None, self.budget_kind)
        goal = dense - fraction * (dense - self.target)
        kind = self.budget_kind
        with warnings.catch_warnings():
            if self.removals < self.total_removals:  # only the final budget's miss matters
                warnings.simplefilter("ignore", UserWarning)
            plan = fxprune.plan(self.analysis, _FixedScores(scores), cost=self.cost,
                                latency=self.latency, **{f"target_{kind}": goal / dense},
                                **self.plan_options)
        kept = torch.as_tensor(plan.kept_labels(self.analysis), dtype=torch.bool)
        self.mask &= kept
        with torch.no_grad():
            self.student.mask.copy_(self.mask.to(self.student.mask.dtype))
            if self.frozen is not None:  # freeze the newly removed masks where they are
                self.frozen = torch.where(self.mask.to(self.frozen.device), self.frozen,
                                          self.student.soft_mask.detach().to(self.frozen))
        self.rows.clear()
        for v in self.weight_stats.values():
            v.zero_()
        entry = {"step": self.step_count, "removal": self.removals, "fraction": fraction,
                 kind: self._cost_of(self.mask.numpy(), kind), "goal": goal,
                 "budget_reached": self.budget_reached(),
                 "units_removed": int((~self.mask).sum())}
        self.history.append(entry)
        return entry

    # -- finish ------------------------------------------------------------------------
    def finish(self, inputs: Any = None, *, rtol: float = 1e-4) -> DistillResult:
        """Compile the gated student into the small GraphModule and prove it.

        ``verify`` checks slice == mask (float64) on a copy of the analysed graph that
        carries the student's trained weights; then the small model (eval mode) is
        compared with the gated student (eval mode) on ``inputs`` (default: the example
        inputs): ``student_max_err`` is the max |difference| relative to the output scale.
        """
        inputs = self.example_inputs if inputs is None else (
            (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
        trained = self._fold_soft_masks(self._trained_graph())
        analysis = dataclasses.replace(self.analysis, gm=trained)
        kept = self.mask.numpy()
        keep = {g.name: np.flatnonzero(kept[analysis.group_of == g.id]).tolist()
                for g in analysis.groups if not kept[analysis.group_of == g.id].all()}
        plan = fxprune.Plan.from_indices(analysis, keep)
        small = fxprune.compile(analysis, plan)
        set_graph_training(small, False)
        small.eval()
        report = fxprune.verify(analysis, small, plan, inputs)
        err = self._student_error(small, inputs, self.student.mask)
        if err > rtol:
            names = self._disagreeing_groups(analysis, inputs, rtol)
            raise fxprune.VerificationError(
                f"the compiled model differs from the gated student by {err:.3g} (relative, "
                f"tol {rtol:g}) although slice == mask holds; the gates of group(s) "
                f"{names or '(none alone: their combination)'} do not compute what removing "
                "their units computes (passes/gates.py). Remedy: leave those groups whole "
                "(fxprune.plan(..., ignore=...) on the trained model), or report it with the "
                "model")
        cost = self.cost.evaluate(kept)
        return DistillResult(small, plan, report, err, cost.macs, cost.params,
                             self.cost.dense.macs, self.cost.dense.params)

    def _student_error(self, small: torch.fx.GraphModule, inputs: tuple,
                       gates: torch.Tensor) -> float:
        """max |small - student| / max |student| (eval mode, the student's gates ``gates``)."""
        was = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                out = self.student.with_gates(gates.to(self.student.mask),
                                              lambda student: student(*inputs))
                want = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
                got = [t for t in tree_flatten(small(*inputs))[0] if isinstance(t, torch.Tensor)]
        finally:
            self.student.train(was)
        scale = max(float(w.abs().max()) for w in want) or 1.0
        return max(float((a - b).abs().max()) for a, b in zip(got, want)) / scale

    def _disagreeing_groups(self, analysis: Any, inputs: tuple, rtol: float) -> list[str]:
        """The pruned groups whose removal alone already separates student and compiled."""
        names = []
        mask = self.mask.numpy()
        for g in analysis.groups:
            mine = analysis.group_of == g.id
            if mask[mine].all():
                continue
            kept = np.ones_like(mask)
            kept[mine] = mask[mine]
            plan = fxprune.Plan.from_indices(analysis, {g.name: np.flatnonzero(mask[mine]).tolist()})
            small = fxprune.compile(analysis, plan)
            set_graph_training(small, False)
            if self._student_error(small.eval(), inputs, torch.as_tensor(kept)) > rtol:
                names.append(g.name)
        return names

    def _trained_graph(self) -> torch.fx.GraphModule:
        """A copy of the analysed (ungated) graph with the student's current weights."""
        gm = copy.deepcopy(self.analysis.gm)
        state = {k: v for k, v in self.student.gm.state_dict().items()
                 if not k.startswith("_fxprune_gate")}
        gm.load_state_dict(state, strict=True)
        set_graph_training(gm, False)
        return gm

    def _fold_soft_masks(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """Kept units' soft masks multiplied into the weights they scale (``self.folds``);
        removed units' columns/rows are sliced away, so they take 1. Mutates ``gm`` (a copy
        the pruner owns)."""
        if self.student.soft_mask is None:
            return gm
        m = self.student.soft_mask.detach()
        values = torch.where(self.mask.to(m.device), m, torch.ones_like(m))
        with torch.no_grad():
            for f in self.folds:
                p = gm.get_parameter(f.fqn)
                index = torch.as_tensor(np.where(f.labels < 0, len(values), f.labels))
                p.copy_(apply_gate(p, values.to(p.device), index.to(p.device), f.dim))
        return gm

    # -- checkpoint --------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"fingerprint": self.analysis.fingerprint, "num_units": self.analysis.num_units,
                "criterion": self.criterion, "interval": self.interval, "steps": self.steps,
                "start": self.start, "budget": [self.budget_kind, self.target],
                "schedule": self.schedule_name, "selection": self.selection}

    def state_dict(self) -> dict[str, Any]:
        """Masks, this interval's statistics, step, schedule position, RNG states."""
        return {"format": FORMAT, "identity": self._identity(), "mask": self.mask.clone(),
                "rows": [r.clone() for r in self.rows],
                "weight_stats": {k: v.clone() for k, v in self.weight_stats.items()},
                "step": self.step_count, "removals": self.removals,
                "history": copy.deepcopy(self.history),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                **self._soft_state()}

    def _soft_state(self) -> dict[str, Any]:
        if self.frozen is None:
            return {}
        return {"soft_mask": self.student.soft_mask.detach().cpu().clone(),
                "soft_frozen": self.frozen.cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any], *, restore_rng: bool = True) -> None:
        """Resume; ``restore_rng`` also restores torch's global CPU RNG (dropout, shuffles).

        Raises ``CheckpointMismatchError`` for a checkpoint of another model, plan or
        configuration; nothing is changed then."""
        if state.get("format") != FORMAT:
            raise CheckpointMismatchError(f"pruner checkpoint format {state.get('format')!r}, "
                                          f"expected {FORMAT}: not a Pruner.state_dict()")
        mine, theirs = self._identity(), dict(state["identity"])
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise CheckpointMismatchError(
                "this checkpoint belongs to another model or pruning setup (checkpoint vs "
                f"here: {diff}); resume with the model, budget and settings it was made with")
        if self.frozen is not None and "soft_mask" not in state:
            raise CheckpointMismatchError("this selection='soft' pruner needs the soft masks "
                                          "in the checkpoint (keys soft_mask, soft_frozen)")
        self.mask = state["mask"].clone().to(torch.bool)
        with torch.no_grad():
            self.student.mask.copy_(self.mask.to(self.student.mask.dtype))
            if self.frozen is not None:
                m = self.student.soft_mask
                m.copy_(state["soft_mask"].to(m.device, m.dtype))
                self.frozen = state["soft_frozen"].clone().to(self.frozen)
        self.rows = [r.clone() for r in state["rows"]]
        for k, v in state["weight_stats"].items():
            self.weight_stats[k] = v.clone()
        self.step_count, self.removals = int(state["step"]), int(state["removals"])
        self.history = copy.deepcopy(state["history"])
        self.generator.set_state(state["generator"])
        if restore_rng:
            torch.set_rng_state(state["torch_rng"])


class _WeightTaylor:
    """Parameter hook: accumulate |w * dL/dw| (weights as used in this forward)."""

    def __init__(self, pruner: Pruner, name: str, p: torch.Tensor) -> None:
        self.pruner, self.name, self.p = pruner, name, p

    def __call__(self, grad: torch.Tensor) -> None:
        acc = self.pruner.weight_stats.get(self.name)
        value = (self.p.detach() * grad.detach()).abs().double().cpu()
        self.pruner.weight_stats[self.name] = value if acc is None else acc + value


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    bits = torch.randint(0, 2, like.shape, generator=gen, device="cpu")
    return (bits * 2 - 1).to(like.dtype).to(like.device)


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """``torch.save(state)`` to a temporary file in the same folder, then ``os.replace``:
    a failed save leaves the previous checkpoint intact (and no temporary file)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (on CPU)."""
    return torch.load(os.fspath(path), map_location="cpu", weights_only=False)
