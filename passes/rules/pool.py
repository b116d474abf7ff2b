"""Spatial ops that keep channels apart: pooling, interpolation, padding."""
from __future__ import annotations

import torch.nn as nn

from passes.rules.registry import RuleContext, op_key, rule

POOLS = tuple(f"{p}_pool{k}d" for p in ("max", "avg", "lp") for k in (1, 2, 3)) + tuple(
    f"adaptive_{p}_pool{k}d" for p in ("max", "avg") for k in (1, 2, 3)) + (
    "max_pool2d_with_indices", "max_pool3d_with_indices", "interpolate", "upsample",
    "upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_nearest1d",
    "upsample_linear1d", "upsample_nearest3d", "upsample_trilinear3d", "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d", "adaptive_max_pool2d_with_indices", "max_pool1d_with_indices",
    "upsample_nearest", "upsample_bilinear")
POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
               nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
               nn.ReplicationPad2d, nn.ReflectionPad3d, nn.ReplicationPad3d) + tuple(
    getattr(nn, f"CircularPad{k}d") for k in (1, 2, 3) if hasattr(nn, f"CircularPad{k}d"))


def _rank_of_name(name: str) -> int | None:
    """``max_pool2d`` / ``MaxPool2d`` / ``max_pool2d_with_indices`` -> 2 (table building)."""
    name = name.removesuffix("_with_indices")
    return int(name[-2]) if name[-2:] in ("1d", "2d", "3d") else None


# Spatial rank of each pool/pad that fixes it, by op key or module type; the others
# (interpolate, upsample, constant_pad_nd) pool every dim after the channel dim.
SPATIAL_RANK: dict = {k: r for k in POOLS + ("reflection_pad2d", "replication_pad2d")
                      + POOL_MODULES + PAD_MODULES
                      if (r := _rank_of_name(k if isinstance(k, str) else k.__name__))}


def _spatial_dims(ctx: RuleContext) -> int:
    if ctx.node.op == "call_module":
        rank = next((SPATIAL_RANK[t] for t in type(ctx.module).__mro__ if t in SPATIAL_RANK),
                    None)
    else:
        key = op_key(ctx.node)
        rank = SPATIAL_RANK.get(key) if isinstance(key, str) else None
    return rank if rank is not None else len(ctx.shape(ctx.arg(0))) - 2


def keep_channels(ctx: RuleContext, spatial: int) -> None:
    """out[c] depends on in[c] only; units on the mixed trailing dims are pinned."""
    x = ctx.arg(0, "input")
    dims = dict(ctx.dims(x) or {})
    rank = len(ctx.shape(x))
    for axis in range(rank - spatial, rank):
        ctx.pin(dims.pop(axis, None), "channel units on a pooled/padded dim")
    out = ctx.out_shape
    # (values, indices) of *_with_indices: both are per channel and shrink together
    ctx.set(tuple(dims for _ in out) if out and isinstance(out[0], tuple) else dims)


@rule(POOLS, POOL_MODULES)
def pool(ctx: RuleContext) -> None:
    """Pooling / resizing: out[c] depends only on in[c]."""
    keep_channels(ctx, _spatial_dims(ctx))


@rule("pad", "constant_pad_nd", "_pad_circular", *(f"{kind}_pad{k}d" for kind in (
    "reflection", "replication") for k in (1, 2, 3)))
def pad(ctx: RuleContext) -> None:
    """Padding the last len(pad)//2 dims (a padded channel dim is pinned)."""
    widths = ctx.arg(1, "pad")
    if not isinstance(widths, (list, tuple)):
        keep_channels(ctx, 0)
        return
    x = ctx.arg(0, "input")
    dims = dict(ctx.dims(x) or {})
    rank = len(ctx.shape(x))
    for k in range(len(widths) // 2):  # pairs run from the last dim backwards
        if (widths[2 * k], widths[2 * k + 1]) != (0, 0):  # (0, 0): that dim is untouched
            ctx.pin(dims.pop(rank - 1 - k, None), "channel units on a pooled/padded dim")
    ctx.set(dims)


@rule(PAD_MODULES)
def pad_module(ctx: RuleContext) -> None:
    """nn.*PadNd modules pad their trailing dims."""
    keep_channels(ctx, len(ctx.module.padding) // 2)
