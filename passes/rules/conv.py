"""Convolutions: stop ops (in-channels end a space, out-channels start one).

Grouped convs keep ``groups``: the in-channels at the same position of every group
are coupled (they share a weight column), and so are the out-channels at the same
position. Depthwise convs (one in-channel per group) are pass-through: out-channels of
group g live and die with in-channel g, and ``groups`` follows the kept count.
"""
from __future__ import annotations

import numpy as np
import torch.nn as nn

from passes.rules.registry import MacContext, RuleContext, Terms, macs, module_fixup, op_key, present, rule

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _channel_axis(ctx: RuleContext, x, kernel_dims: int) -> int:
    return len(ctx.shape(x)) - kernel_dims - 1


def _pin_spatial(ctx: RuleContext, dims, channel_axis: int) -> None:
    for axis, units in (dims or {}).items():
        if axis != channel_axis:
            ctx.pin(units, "channel units on a dim a conv mixes")


def _module_input(ctx: RuleContext) -> tuple[int, np.ndarray | None]:
    """(channel axis, in-channel units) of a conv module's input; spatial units pinned."""
    x = ctx.arg(0)
    axis = _channel_axis(ctx, x, ctx.module.weight.dim() - 2)
    dims = ctx.dims(x) or {}
    _pin_spatial(ctx, dims, axis)
    return axis, dims.get(axis)


def couple_conv(ctx: RuleContext, x_units, w_out, in_units_fn, bias, groups: int):
    """Couple a conv's input channels, weight dims and bias; return its out-units."""
    cin_g = None if x_units is None else len(x_units) // groups
    if groups == 1:
        ctx.link(x_units, in_units_fn(), "conv input channels are untracked")
    elif x_units is not None and cin_g == 1:  # depthwise (with channel multiplier)
        ctx.union(w_out.reshape(groups, -1), x_units[:, None])
    elif x_units is not None:
        rows = x_units.reshape(groups, cin_g)
        ctx.union(rows[:1], rows)
        ctx.union(in_units_fn()[None, :], rows)
        outs = w_out.reshape(groups, -1)
        ctx.union(outs[:1], outs)
    else:
        ctx.pin(w_out, "grouped conv on untracked input channels")
        ctx.pin(in_units_fn(), "grouped conv on untracked input channels")
    if bias is not None:
        ctx.union(w_out, bias)
    return w_out


@rule(CONV_MODULES, stop=True)
def conv_module(ctx: RuleContext) -> None:
    """nn.ConvNd: out[o] from weight rows; weight columns consume in-channels."""
    axis, channels = _module_input(ctx)
    w_out = ctx.module_tensor("weight", 0, "out")
    bias = ctx.module_tensor("bias", 0, "dep")
    out = couple_conv(ctx, channels, w_out,
                      lambda: ctx.module_tensor("weight", 1, "in"), bias, ctx.module.groups)
    ctx.set({axis: out})


@rule("conv", "convolution", stop=True)
def conv_functional(ctx: RuleContext) -> None:
    """F.convNd / aten.convolution with a get_attr weight; other weights are barriers."""
    x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
    fqn = ctx.fqn_of(w)
    transposed = bool(ctx.arg(6, "transposed", False)) if _is_aten_convolution(ctx) else False
    groups = ctx.arg(8 if _is_aten_convolution(ctx) else 6, "groups", 1)
    axis = _channel_axis(ctx, x, len(ctx.shape(w)) - 2)
    dims = ctx.dims(x) or {}
    if fqn is None or transposed or not isinstance(groups, int):
        why = ("conv with a weight computed in forward, of unknown per-channel structure "
               "(a module rule can declare it, as passes/rules/timm.py does for StdConv2d)"
               if fqn is None else "conv with a computed weight")
        ctx.pin_info(ctx.dims(x), why)
        ctx.pin_info(ctx.dims(w), why)
        ctx.set({})
        return
    _pin_spatial(ctx, dims, axis)
    _pin_kernel_dims(ctx, w)
    b = ctx.arg(2, "bias")
    bias = ctx.tensor_units(ctx.fqn_of(b), 0, "dep") if ctx.fqn_of(b) else None
    if b is not None and bias is None:
        ctx.pin_info(ctx.dims(b), "conv bias is computed")
    out = couple_conv(ctx, dims.get(axis), ctx.tensor_units(fqn, 0, "out"),
                      lambda: ctx.tensor_units(fqn, 1, "in"), bias, groups)
    ctx.set({axis: out})


def _pin_kernel_dims(ctx: RuleContext, w) -> None:
    for axis, units in (ctx.dims(w) or {}).items():
        if axis >= 2:
            ctx.pin(units, "conv kernel dim")


def _is_aten_convolution(ctx: RuleContext) -> bool:
    return op_key(ctx.node) == "convolution"  # aten.convolution: (..., transposed, _, groups)


@rule(CONV_TRANSPOSE_MODULES, stop=True)
def conv_transpose_module(ctx: RuleContext) -> None:
    """nn.ConvTransposeNd: weight is (in, out/groups, ...); grouped ones are barriers."""
    axis, channels = _module_input(ctx)
    w_in = ctx.module_tensor("weight", 0, "in")
    w_out = ctx.module_tensor("weight", 1, "out")
    bias = ctx.module_tensor("bias", 0, "dep")
    if ctx.module.groups == 1:
        ctx.link(channels, w_in, "transposed conv input channels are untracked")
    else:
        ctx.pin(channels, "grouped transposed conv")
        ctx.pin(np.concatenate([w_in, w_out]), "grouped transposed conv")
    if bias is not None:
        ctx.union(w_out, bias)
    ctx.set({axis: w_out})


@module_fixup(*CONV_MODULES)
def fix_conv(m: nn.Module) -> None:
    """Re-derive channel counts (and depthwise ``groups``) from the sliced weight."""
    out_per_group = m.out_channels // m.groups
    if m.groups > 1 and m.in_channels == m.groups and m.weight.shape[1] == 1:  # depthwise
        m.groups = m.weight.shape[0] // out_per_group
    m.out_channels = m.weight.shape[0]
    m.in_channels = m.weight.shape[1] * m.groups


@module_fixup(*CONV_TRANSPOSE_MODULES)
def fix_conv_transpose(m: nn.Module) -> None:
    """Channel counts of a (groups=1) transposed conv from its sliced weight."""
    m.in_channels = m.weight.shape[0]
    m.out_channels = m.weight.shape[1] * m.groups


# -- MAC scaling (cost model) -------------------------------------------------------
@macs(CONV_MODULES, CONV_TRANSPOSE_MODULES)
def conv_module_macs(ctx: MacContext) -> Terms:
    """MACs ~ out channels x in channels per group (depthwise: out channels only)."""
    m = ctx.module
    x = ctx.arg(0, "input")
    depthwise = m.groups > 1 and m.weight.shape[1] == 1
    cin = None if depthwise else ctx.axis(x, -(m.weight.dim() - 1))
    return [(1.0, ctx.out_axes() + present(cin))]


@macs("conv", "convolution")
def conv_functional_macs(ctx: MacContext) -> Terms:
    """F.convNd / aten.convolution: like the module; the weight's dims carry the labels."""
    x, w = ctx.arg(0, "input"), ctx.arg(1, "weight")
    wshape = ctx.shape(w)
    depthwise = wshape is not None and wshape[1] == 1 and ctx.shape(x)[-(len(wshape) - 1)] > 1
    cin = None if depthwise else ctx.axis(x, -(len(wshape) - 1))
    return [(1.0, ctx.out_axes() + present(cin))]
