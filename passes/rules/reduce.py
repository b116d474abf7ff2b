"""Reductions and normalising activations over a dim."""
from __future__ import annotations

import torch.nn as nn

from passes.rules.elementwise import binary
from passes.rules.registry import RuleContext, op_key, rule

EXACT_REDUCTIONS = ("sum", "nansum")
REDUCTIONS = ("mean", "amax", "amin", "max", "min", "prod", "std", "var", "norm",
              "logsumexp", "all", "any", "argmax", "argmin", "median", "var_mean",
              "std_mean", "nanmean", "count_nonzero", "linalg_vector_norm", "frobenius_norm")
# Statistics over a channel dim (RMSNorm / LayerNorm written by hand): channel mixers.
STATISTICS = ("mean", "nanmean", "var", "std", "var_mean", "std_mean")
SOFTMAXES = ("softmax", "log_softmax", "_softmax", "_log_softmax", "softmin")


NORMS = ("norm", "linalg_vector_norm")  # (input, p, dim): the dim comes third


def _reduced_axes(ctx: RuleContext, rank: int) -> list[int]:
    dim = ctx.arg(2 if op_key(ctx.node) in NORMS else 1, "dim")
    if dim is None or isinstance(dim, bool):
        return list(range(rank))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % rank for d in dims)


@rule(EXACT_REDUCTIONS, REDUCTIONS)
def reduce(ctx: RuleContext) -> None:
    """Summing a channel dim consumes it (zeros add nothing); mean/var over it mix channels
    (legal, not exact); other reductions pin it."""
    x = ctx.arg(0, "input")
    shape = ctx.shape(x)
    if not isinstance(shape, tuple):
        ctx.set(None)
        return
    if isinstance(ctx.shape(ctx.arg(1, "other")), tuple):  # torch.min(a, b): elementwise
        binary(ctx)
        return
    rank = len(shape)
    axes = _reduced_axes(ctx, rank) if rank else []
    dims = dict(ctx.dims(x) or {})
    key = op_key(ctx.node)
    for axis in axes:
        units = dims.pop(axis, None)
        if units is not None and key in STATISTICS:
            ctx.inexact(units, f"{key} over a channel dim")
        elif key not in EXACT_REDUCTIONS:
            ctx.pin(units, "reduction over a channel dim")
    out = ctx.out_shape
    single = out[0] if out and isinstance(out[0], tuple) else out
    keepdim = single is not None and len(single) == rank
    if not keepdim:
        dims = {a - sum(1 for r in axes if r < a): u for a, u in dims.items()}
    ctx.set(tuple(dims for _ in out) if out and isinstance(out[0], tuple) else dims)


@rule(SOFTMAXES, nn.Softmax, nn.LogSoftmax, nn.Softmin)
def softmax(ctx: RuleContext) -> None:
    """Normalises over a dim: a channel mixer when that dim is tracked."""
    x = ctx.arg(0, "input")
    dims = ctx.dims(x) or {}
    rank = len(ctx.shape(x))
    dim = ctx.module.dim if ctx.node.op == "call_module" else ctx.arg(1, "dim")
    if dim is not None and dim % rank in dims:
        ctx.inexact(dims[dim % rank], "softmax over a channel dim", kind="softmax")
    ctx.set(dims)
