"""Weight-level rules of the importance criteria (``fxprune.importance.CRITERIA``).

Each rule gives one score per weight; the lowest scores are zeroed. The names are the
registry's own, so ``taylor`` means ``|w * dL/dw|`` for a channel (summed over its slice)
and for a single weight alike:

    =============  ===============================================================
    ``magnitude``  |w| (Han et al. 2015, Deep Compression); ``l1``/``l2`` of one weight
    ``taylor``     mean over batches of |w * dL/dw| (Molchanov et al. 2019)
    ``fisher``     mean over batches of (dL/dw)^2 (empirical Fisher diagonal)
    ``obd``        1/2 h_ww w^2, h a Hutchinson Hessian diagonal (LeCun et al. 1990)
    ``wanda``      |W_ij| * ||X_j||_2, X the calibration inputs of the layer (Sun et al.
                   2023); for convolutions ``j`` is the input channel (the norm over
                   batch and spatial positions), shared by the kernel positions
    ``random``     uniform in [0, 1) (a baseline)
    =============  ===============================================================
"""
from __future__ import annotations

import torch.fx
from typing import Any

import torch
import torch.nn as nn

from fxprune.core.errors import ImportanceError
from fxprune.planning.importance import Importance, ScoreContext, weight_criterion

__all__ = ["WeightContext", "weight_scores"]



class WeightContext:
    """What a weight rule sees: the analysis (data-driven rules), settings, cached stats."""

    def __init__(self, analysis: Any, settings: Importance, owners: dict[str, Any]) -> None:
        self.analysis, self.settings, self.owners = analysis, settings, owners
        self._score_ctx: ScoreContext | None = None
        self._input_norms: dict[str, torch.Tensor] | None = None

    def stat(self, name: str) -> dict[str, torch.Tensor]:
        """A per-parameter statistic of ``fxprune.importance.STATISTICS``, computed once."""
        if self.analysis is None:
            raise ImportanceError(f"criterion {self.settings.name!r} needs the model's graph "
                                  "and data: call fxprune.sparsify(model, example_inputs, ...)")
        if self._score_ctx is None:
            self._score_ctx = ScoreContext(self.analysis, self.settings)
        return self._score_ctx.stat(name)

    def input_norms(self, fqn: str) -> torch.Tensor:
        """||X_j||_2 per input column of the layer owning ``fqn`` over the calibration data."""
        if self._input_norms is None:
            self._input_norms = _calibration_norms(self)
        if fqn not in self._input_norms:
            raise ImportanceError(
                f"criterion 'wanda' needs the inputs of a linear or conv layer, and {fqn!r} "
                "belongs to none that ran on the calibration data: exclude it (ignore=[...]) "
                "or use criterion='magnitude'")
        return self._input_norms[fqn]


def _calibration_norms(ctx: WeightContext) -> dict[str, torch.Tensor]:
    """Run the data through the graph, summing x^2 per input column of every layer input."""
    wanted: dict[str, list[str]] = {}
    for fqn, site in ctx.owners.items():
        if site.input_node is not None and site.kind in ("linear", "conv", "head"):
            wanted.setdefault(site.input_node, []).append(fqn)
    conv = {fqn for fqn, site in ctx.owners.items() if site.is_conv}
    runner = _Recorder(ctx.analysis.gm, wanted, conv)
    settings = ctx.settings
    with torch.no_grad():
        if settings.closure is not None:
            for i in range(settings.batches):
                settings.closure(runner, i)
        else:
            device = next(iter(ctx.analysis.gm.parameters()), torch.empty(0)).device
            for inputs in _calibration_inputs(settings.data, settings.batches):
                runner(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs))
    return {k: v.sqrt() for k, v in runner.sums.items()}


class _Recorder(nn.Module):
    """Runs ``gm`` through an ``fx.Interpreter`` that adds sum x^2 per column of layer inputs.

    Linear: x [..., in] summed over all leading dims. Conv: x [B, C, *spatial] summed over
    batch and positions, per input channel C. The graph and its weights are not touched.
    """

    def __init__(self, gm: torch.fx.GraphModule, wanted: dict[str, list[str]],
                 conv: set[str]) -> None:
        super().__init__()
        self.gm, self.wanted, self.conv = gm, wanted, conv
        self.sums: dict[str, torch.Tensor] = {}

    def forward(self, *args: Any) -> Any:
        return _RecordingInterpreter(self).run(*args)

    def record(self, node_name: str, value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            return
        for fqn in self.wanted.get(node_name, ()):
            x = value.detach().double()
            if fqn in self.conv and x.dim() > 1:
                x = x.movedim(1, -1)
            s = (x * x).reshape(-1, x.shape[-1]).sum(0).cpu()
            self.sums[fqn] = self.sums.get(fqn, 0) + s


class _RecordingInterpreter(torch.fx.Interpreter):
    def __init__(self, recorder: _Recorder) -> None:
        super().__init__(recorder.gm, garbage_collect_values=True)
        self.recorder = recorder

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.recorder.wanted:
            self.recorder.record(n.name, value)
        return value


def _calibration_inputs(data: Any, n: int) -> list[tuple]:
    """The inputs of the first ``n`` ``(inputs, target)`` batches (inputs: tensor or tuple)."""
    out = []
    for batch in data:
        if len(out) >= n:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ImportanceError("each data batch must be a pair (inputs, target); the target "
                                  "may be None for 'wanda'")
        inputs = batch[0]
        out.append((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    if not out:
        raise ImportanceError("criterion 'wanda': data yielded no batch")
    return out


@weight_criterion("magnitude")
def magnitude(ctx: WeightContext, fqn: str, w: torch.Tensor) -> torch.Tensor:
    """|w| of each weight (Han et al. 2015)."""
    return w.detach().double().abs()


weight_criterion("l1")(magnitude)
weight_criterion("l2")(magnitude)


@weight_criterion("random")
def random_weights(ctx: WeightContext, fqn: str, w: torch.Tensor) -> torch.Tensor:
    """Uniform in [0, 1), seeded by (seed, parameter name): a baseline."""
    seed = (ctx.settings.seed * 1_000_003 + sum(map(ord, fqn))) % (2 ** 63)
    return torch.rand(w.shape, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)


@weight_criterion("taylor", needs_data=True)
def taylor(ctx: WeightContext, fqn: str, w: torch.Tensor) -> torch.Tensor:
    """Mean over batches of |w * dL/dw| (Molchanov et al. 2019)."""
    return _stat_of(ctx, "weight_taylor", fqn, w)


@weight_criterion("fisher", needs_data=True)
def fisher(ctx: WeightContext, fqn: str, w: torch.Tensor) -> torch.Tensor:
    """Mean over batches of (dL/dw)^2, the empirical Fisher diagonal."""
    return _stat_of(ctx, "weight_fisher", fqn, w)


@weight_criterion("obd", needs_data=True)
def obd(ctx: WeightContext, fqn: str, w: torch.Tensor) -> torch.Tensor:
    """1/2 h w^2, h the Hutchinson Hessian diagonal (Optimal Brain Damage)."""
    return 0.5 * _stat_of(ctx, "weight_hessian", fqn, w) * w.detach().double() ** 2


@weight_criterion("wanda", needs_data=True)
def wanda(ctx: WeightContext, fqn: str, w: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 over the calibration inputs (Sun et al. 2023)."""
    norms = ctx.input_norms(fqn).to(torch.float64)
    site = ctx.owners[fqn]
    w = w.detach().double().cpu()
    if site.is_conv:
        groups = site.groups
        per_group = norms.reshape(groups, -1)                      # [groups, in/groups]
        rows = per_group.repeat_interleave(w.shape[0] // groups, 0)  # [out, in/groups]
        return w.abs() * rows.reshape(rows.shape + (1,) * (w.dim() - 2))
    return w.abs() * norms.reshape(1, -1)


def _stat_of(ctx: WeightContext, name: str, fqn: str, w: torch.Tensor) -> torch.Tensor:
    stats = ctx.stat(name)
    if fqn not in stats:
        raise ImportanceError(f"statistic {name!r} has no entry for {fqn!r}: the parameter "
                              "is not in the analysed graph; exclude it (ignore=[...])")
    return stats[fqn].double()


def weight_scores(ctx: WeightContext, name: str, fqn: str, w: torch.Tensor) -> torch.Tensor:
    """The registered weight rule of ``name`` on ``w`` (float64, shape of ``w``)."""
    from fxprune.planning.importance import CRITERIA
    from fxprune.core.errors import NonFiniteScoreError

    spec = CRITERIA[name]
    if spec.weight_fn is None:
        raise ImportanceError(f"criterion {name!r} scores channels, not single weights; weight "
                              f"criteria: {weight_criteria()}")
    s = spec.weight_fn(ctx, fqn, w).to(torch.float64).cpu()
    if tuple(s.shape) != tuple(w.shape):
        raise ImportanceError(f"criterion {name!r} gave scores of shape {tuple(s.shape)} for "
                              f"{fqn!r} of shape {tuple(w.shape)}")
    if torch.isnan(s).any() or torch.isneginf(s).any():
        raise NonFiniteScoreError(f"criterion {name!r}: NaN or -inf scores for {fqn!r}")
    return s


def weight_criteria() -> list[str]:
    """Names in the registry that have a weight-level rule."""
    from fxprune.planning.importance import CRITERIA

    return sorted(n for n, c in CRITERIA.items() if c.weight_fn is not None)
