"""Normalisation layers: per-channel ones are pass-through with dependents (BatchNorm,
InstanceNorm); ones whose statistics span the channel dim are channel mixers (LayerNorm,
GroupNorm, RMSNorm): pruning through them is legal but flagged ``exact=False``."""
from __future__ import annotations

import torch.nn as nn

from passes.rules.registry import RuleContext, fixup, module_fixup, op_key, rule

BATCH_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
INSTANCE_NORM_MODULES = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
LAYER_NORM_MODULES = (nn.LayerNorm, nn.RMSNorm)
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _channel_axis(ctx: RuleContext) -> int:
    return 1 if len(ctx.shape(ctx.arg(0))) > 1 else 0


@rule(BATCH_NORM_MODULES, INSTANCE_NORM_MODULES)
def per_channel_norm_module(ctx: RuleContext) -> None:
    """out[c] = (in[c] - mean[c]) * scale[c] + shift[c]: dependents follow channel c."""
    dims = ctx.dims(ctx.arg(0)) or {}
    channels = dims.get(_channel_axis(ctx))
    for name in _BN_TENSORS:
        units = ctx.module_tensor(name, 0, "dep")
        if units is not None:
            ctx.link(channels, units, "norm over untracked channels")
    ctx.set(dims)


@rule("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
      "native_batch_norm", "instance_norm", "_batch_norm_with_update",
      "_native_batch_norm_legit_functional")
def per_channel_norm_functional(ctx: RuleContext) -> None:
    """Functional/ATen batch norm: every per-channel tensor argument follows channel c."""
    x = ctx.arg(0, "input")
    dims = ctx.dims(x) or {}
    channels = dims.get(_channel_axis(ctx))
    n = ctx.shape(x)[_channel_axis(ctx)]
    for a in list(ctx.node.args[1:]) + list(ctx.node.kwargs.values()):
        if ctx.shape(a) == (n,):
            fqn = ctx.fqn_of(a)
            units = ctx.tensor_units(fqn, 0, "dep") if fqn else (ctx.dims(a) or {}).get(0)
            if units is not None:
                ctx.link(channels, units, "norm over untracked channels")
    out = ctx.out_shape
    ctx.set(tuple([dims] + [{} for _ in out[1:]]) if isinstance(out[0], tuple) else dims)


def _layer_norm(ctx: RuleContext, k: int, weight_fn) -> None:
    """Normalised over the last ``k`` dims: a channel mixer on tracked ones."""
    x = ctx.arg(0, "input")
    dims = ctx.dims(x) or {}
    rank = len(ctx.shape(x))
    for axis in range(rank - k, rank):
        units = dims.get(axis)
        if units is not None:
            ctx.inexact(units, "layer norm statistics span the channel dim")
        for param_units in weight_fn(axis - (rank - k)):
            ctx.link(units, param_units, "layer norm weight on untracked dim")
        if units is not None and not weight_fn(axis - (rank - k), probe=True):
            ctx.pin(units, "layer norm without weight: normalized_shape cannot follow")
    out = ctx.out_shape
    ctx.set(tuple([dims] + [{} for _ in out[1:]]) if isinstance(out[0], tuple) else dims)


@rule(LAYER_NORM_MODULES)
def layer_norm_module(ctx: RuleContext) -> None:
    """nn.LayerNorm / nn.RMSNorm over ``normalized_shape``."""
    m = ctx.module

    def params(dim: int, probe: bool = False):
        names = [n for n in ("weight", "bias") if getattr(m, n, None) is not None]
        return names if probe else [ctx.module_tensor(n, dim, "dep") for n in names]

    _layer_norm(ctx, len(m.normalized_shape), params)


@rule("layer_norm", "native_layer_norm", "rms_norm")
def layer_norm_functional(ctx: RuleContext) -> None:
    """F.layer_norm(x, normalized_shape, weight, bias) with get_attr (or no) weights."""
    shape = ctx.arg(1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    bias = None if op_key(ctx.node) == "rms_norm" else ctx.arg(3, "bias")  # (.., weight, eps)
    tensors = [a for a in (ctx.arg(2, "weight"), bias) if a is not None]

    def params(dim: int, probe: bool = False):
        if probe:
            return tensors
        out = []
        for t in tensors:
            fqn = ctx.fqn_of(t)
            out.append(ctx.tensor_units(fqn, dim, "dep") if fqn else (ctx.dims(t) or {}).get(dim))
        return [u for u in out if u is not None]

    _layer_norm(ctx, k, params)


def _group_norm(ctx: RuleContext, num_groups: int, params) -> None:
    dims = ctx.dims(ctx.arg(0)) or {}
    channels = dims.get(1)
    if channels is not None:
        rows = channels.reshape(num_groups, -1)
        ctx.union(rows[:1], rows)
        ctx.inexact(channels, "group norm statistics span channels")
    for units in params:
        if units is not None:
            ctx.link(channels, units, "group norm over untracked channels")
    ctx.set(dims)


@rule(nn.GroupNorm)
def group_norm_module(ctx: RuleContext) -> None:
    """Channels at the same position of every group are coupled (groups stay equal)."""
    _group_norm(ctx, ctx.module.num_groups,
                [ctx.module_tensor(name, 0, "dep") for name in ("weight", "bias")])


@rule("group_norm")
def group_norm_functional(ctx: RuleContext) -> None:
    """F.group_norm(x, num_groups, weight, bias) with get_attr (or no) weights."""
    params = []
    for t in (ctx.arg(2, "weight"), ctx.arg(3, "bias")):
        fqn = ctx.fqn_of(t)
        params.append(ctx.tensor_units(fqn, 0, "dep") if fqn else (ctx.dims(t) or {}).get(0))
        if t is not None and fqn is None and params[-1] is None:
            ctx.pin_info(ctx.dims(ctx.arg(0)), "group norm with an untracked weight")
    _group_norm(ctx, ctx.arg(1, "num_groups"), params)


@module_fixup(*BATCH_NORM_MODULES, *INSTANCE_NORM_MODULES)
def fix_batch_norm(m: nn.Module) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    if ref is not None:
        m.num_features = ref.shape[0]


@fixup(*INSTANCE_NORM_MODULES)
def fix_tensorless_instance_norm(fctx) -> None:
    """An InstanceNorm without weights or running stats owns no tensor to re-derive
    ``num_features`` from: it follows the channels of its (sliced) input instead."""
    m = fctx.module
    if m.weight is None and m.running_mean is None:
        shape = fctx.new_shape(fctx.node.args[0])
        if shape is not None and len(shape) >= 2:
            unbatched = len(shape) == m._get_no_batch_dim()
            m.num_features = int(shape[0] if unbatched else shape[1])


@module_fixup(*LAYER_NORM_MODULES)
def fix_layer_norm(m: nn.Module) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@module_fixup(nn.GroupNorm)
def fix_group_norm(m: nn.Module) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


@fixup("layer_norm", "native_layer_norm", "rms_norm")
def fix_layer_norm_functional(fctx) -> None:
    """``normalized_shape`` literal follows the input's (sliced) trailing dims."""
    node = fctx.node
    shape = fctx.arg(1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    new = list(fctx.new_shape(fctx.arg(0, "input"))[-k:])
    if len(node.args) > 1:
        node.args = (node.args[0], new) + tuple(node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": new}


@rule("normalize")
def lp_normalize(ctx: RuleContext) -> None:
    """F.normalize(x, p, dim): x / ||x||_p over ``dim``, a channel mixer when it is tracked."""
    x = ctx.arg(0, "input")
    dims = ctx.dims(x) or {}
    dim = ctx.arg(2, "dim", 1)
    units = dims.get(dim % len(ctx.shape(x))) if isinstance(dim, int) else None
    if units is not None:
        ctx.inexact(units, "normalize over a channel dim")
    ctx.set(dims)
