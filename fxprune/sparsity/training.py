"""Masks that survive training, gradual pruning (Zhu & Gupta 2017) and ``finalize``.

``attach_masks(model, plan)`` returns a copy whose planned weights are
``torch.nn.utils.parametrize`` parametrizations ``W = where(mask, W_orig, 0)``: the
forward pass only ever sees exact zeros, and their gradients are zero, through any
optimizer step (momentum, weight decay and Adam included). ``finalize(model)`` returns a
copy with plain ``nn.Parameter`` weights (the masked values baked in).

Gradual pruning raises the sparsity of a training model on the cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0))^3,   t_0 <= t <= t_1,

recomputing the masks every ``frequency`` steps from the current weights; a weight once
zeroed stays zeroed (its score is ``-inf``).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from fxprune.core.errors import SparsityError
from fxprune.planning.planner import cubic_schedule
from fxprune.sparsity.masks import check_fraction
from fxprune.sparsity.plan import PackedMask, SparsityPlan

__all__ = ["WeightMask", "attach_masks", "update_masks", "finalize", "cubic_sparsity",
           "GradualPruner"]


class WeightMask(nn.Module):
    """Parametrization ``W -> where(mask, W, 0)``; ``mask`` is a bool buffer (saved)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, weight, weight.new_zeros(()))


def _owner(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    path, _, name = fqn.rpartition(".")
    return (model.get_submodule(path) if path else model), name


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parametrized modules have classes of their own.

    ``parametrize`` keeps a parametrized module's properties on a generated class, which
    ``deepcopy`` shares between original and copy: removing or adding a parametrization
    on the copy would otherwise change the original too.
    """
    out = copy.deepcopy(model)
    for module in out.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return out


def attach_masks(model: nn.Module, plan: SparsityPlan) -> nn.Module:
    """A copy of ``model`` with each planned weight behind a :class:`WeightMask`."""
    out = _copy(model)
    for fqn, packed in plan.masks.items():
        module, name = _owner(out, fqn)
        w = getattr(module, name, None)
        if not isinstance(w, nn.Parameter) or tuple(w.shape) != packed.shape:
            raise SparsityError(f"cannot attach the mask of {fqn!r}: the model has no "
                                f"parameter of shape {packed.shape} there")
        mask = packed.tensor().to(w.device)
        with torch.no_grad():
            w.masked_fill_(~mask, 0.0)  # finalize(...) then equals the masked weights
        parametrize.register_parametrization(module, name, WeightMask(mask))
    return out


def update_masks(model: nn.Module, plan: SparsityPlan) -> None:
    """Set the masks of a model from :func:`attach_masks` to ``plan``'s, in place.

    Meant for the training copy ``attach_masks`` returned (never the user's original).
    """
    for fqn, packed in plan.masks.items():
        module, name = _owner(model, fqn)
        if not parametrize.is_parametrized(module, name):
            raise SparsityError(f"{fqn!r} has no attached mask: call attach_masks first")
        for p in module.parametrizations[name]:
            if isinstance(p, WeightMask):
                p.mask.copy_(packed.tensor().to(p.mask.device))


def current_plan(model: nn.Module, fingerprint: str, meta: dict | None = None) -> SparsityPlan:
    """The masks attached to ``model`` as a :class:`SparsityPlan`."""
    masks = {}
    for path, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, WeightMask):
                    masks[f"{path}.{name}" if path else name] = PackedMask.from_tensor(p.mask)
    return SparsityPlan(fingerprint, masks, dict(meta or {}))


def finalize(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`WeightMask` removed, zeros baked in."""
    out = _copy(model)
    for module in list(out.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations):
            if any(isinstance(p, WeightMask) for p in module.parametrizations[name]):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return out


def cubic_sparsity(step: int, final: float, *, begin: int, end: int,
                   initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule: ``initial`` before ``begin``, ``final`` from ``end``."""
    check_fraction(final)
    check_fraction(initial)
    if end <= begin:
        raise SparsityError(f"the schedule needs end > begin, got begin={begin}, end={end}")
    if step <= begin:
        return initial
    if step >= end:
        return final
    return initial + (final - initial) * cubic_schedule(step - begin, end - begin)


class GradualPruner:
    """Prune a model while it trains: ``pruner.model`` trains, ``pruner.step(t)`` prunes.

        pruner = GradualPruner(model, x, 0.9, begin=0, end=800, frequency=50)
        for t, (xb, yb) in enumerate(loader):
            loss(pruner.model(xb), yb).backward(); opt.step(); opt.zero_grad()
            pruner.step(t)
        small = finalize(pruner.model)

    ``pruner.model`` is a copy of ``model`` with masks attached (pass its parameters to
    the optimizer). Criteria that need no data re-score the current weights (the
    masked ones score ``-inf``, so a weight once zeroed stays zeroed). ``pattern`` /
    ``scope`` / ``kinds`` / ``ignore`` as in :func:`fxprune.sparsify`.

    Inside the distillation loop: the pruner is also a student/teacher pair, so
    :func:`fxprune.distill.fit` drives it like the structured ``Pruner``::

        pruner = GradualPruner(model, x, 0.9, begin=0, end=800, frequency=50)
        fit(pruner, data, opt, steps=1000, loss="kd", alpha=0.7, temperature=4.0)
        small = finalize(pruner.student)

    ``pruner.student`` is ``pruner.model``; ``pruner.teacher`` is a frozen eval-mode deep
    copy of ``teacher`` (default: the dense ``model``), so neither the user's model nor
    their teacher is modified. ``step()`` without ``t`` counts its own calls (one per
    optimizer step, the first is ``t = 0``).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, final: float, *, begin: int,
                 end: int, frequency: int = 1, initial: float = 0.0,
                 criterion: str = "magnitude", scope: str = "layer",
                 kinds: Iterable[str] = ("linear", "conv"), ignore: Iterable[str] = (),
                 teacher: nn.Module | None = None) -> None:
        from fxprune.api import analyze
        from fxprune.planning.importance import CRITERIA
        from fxprune.sparsity.api import plan_sparsity

        spec = CRITERIA.get(criterion)
        if spec is not None and spec.needs_data:
            raise SparsityError(f"GradualPruner re-scores weights during training without "
                                f"data; {criterion!r} needs data: use 'magnitude'")
        cubic_sparsity(begin, final, begin=begin, end=end, initial=initial)
        if frequency < 1:
            raise SparsityError("frequency must be >= 1 step")
        self.final, self.initial, self.begin, self.end = final, initial, begin, end
        self.frequency, self.criterion, self.scope = frequency, criterion, scope
        self.kinds, self.ignore = tuple(kinds), tuple(ignore)
        self.analysis = analyze(model, example_inputs)
        self.plan = plan_sparsity(model, example_inputs, initial, criterion=criterion,
                                  scope=scope, kinds=self.kinds, ignore=self.ignore,
                                  analysis=self.analysis)
        self.model = attach_masks(model, self.plan)
        self.sparsity = initial
        self.teacher = copy.deepcopy(model if teacher is None else teacher).eval()
        self.teacher.requires_grad_(False)
        self.closure = None  # fit's curvature hook: unused (data-free criteria only)
        self._t = 0

    @property
    def student(self) -> nn.Module:
        """The model being trained (``pruner.model``), as the distillation loop names it."""
        return self.model

    def penalty(self) -> torch.Tensor:
        """No regulariser: 0 (the distillation loop adds it to every loss)."""
        return torch.zeros(())

    def budget_reached(self) -> float:
        """Fraction of the final sparsity reached so far, in [0, 1]."""
        return 1.0 if self.final == self.initial else \
            (self.sparsity - self.initial) / (self.final - self.initial)

    def step(self, t: int | None = None) -> dict | None:
        """Update the masks if ``t`` (default: the number of earlier calls) is a pruning
        step. Returns ``{"step", "sparsity", "budget_reached"}`` when the masks changed,
        else None."""
        if t is None:
            t = self._t
        self._t = t + 1
        if t < self.begin or t > self.end or (t - self.begin) % self.frequency and t != self.end:
            return None
        target = cubic_sparsity(t, self.final, begin=self.begin, end=self.end,
                                initial=self.initial)
        if target <= self.sparsity:
            return None
        from fxprune.sparsity.api import plan_sparsity

        plain = finalize(self.model)  # current effective weights, masked ones at 0
        self.plan = plan_sparsity(plain, None, target, criterion=self.criterion,
                                  scope=self.scope, kinds=self.kinds, ignore=self.ignore,
                                  analysis=_Reanalysed(self.analysis, plain),
                                  previous=self.plan)
        update_masks(self.model, self.plan)
        self.sparsity = target
        return {"step": t + 1, "sparsity": target, "budget_reached": self.budget_reached()}


class _Reanalysed:
    """The first analysis (graph, fingerprint) with the current weights' graph module."""

    def __init__(self, analysis: Any, model: nn.Module) -> None:
        import torch.fx

        self.fingerprint = analysis.fingerprint
        self.gm = torch.fx.GraphModule(model, analysis.gm.graph)
