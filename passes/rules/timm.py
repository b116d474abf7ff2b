"""timm's leaf modules and fx-wrapped helpers (``register_notrace_module`` /
``register_notrace_function``): they stay whole in symbolic tracing, so those the model
zoo meets get rules here. Any other timm leaf is a barrier (fail closed).

``BatchNormAct2d`` is BatchNorm followed by an activation inside one leaf: a pass-through
whose per-channel tensors follow the channel, provided its activation and dropout are
themselves elementwise (their own rules say so); otherwise it is a barrier.
"""
from __future__ import annotations

import sys

import torch.nn as nn

from passes.rules.conv import _module_input, couple_conv, fix_conv
from passes.rules.elementwise import binary, unary
from passes.rules.norm import fix_batch_norm, per_channel_norm_module
from passes.rules.registry import (ANALYSIS_RULES, RuleContext, find_module_entry,
                                   module_fixup, rule)


def _elementwise(module: nn.Module) -> bool:
    return find_module_entry(ANALYSIS_RULES, module) is unary


def batch_norm_act(ctx: RuleContext) -> None:
    """act(bn(x))[c] depends only on x[c]; weight, bias and running stats follow c."""
    m = ctx.module
    parts = [getattr(m, name, None) for name in ("drop", "act")]
    if not all(p is None or _elementwise(p) for p in parts):
        ctx.pin_info(ctx.dims(ctx.arg(0)), f"{type(m).__name__} with a non-elementwise "
                     f"activation {type(m.act).__name__}")
        ctx.set({})
        return
    per_channel_norm_module(ctx)


def standardized_conv(ctx: RuleContext) -> None:
    """StdConv2d / ScaledStdConv2d: the weight is standardised per output filter (mean and
    variance over in x kh x kw) before the conv, so removing whole filters commutes with
    it (out[o] from weight row o, ``gain[o]`` follows o); removing input columns changes
    every filter's statistics (inexact, kind "statistics")."""
    axis, channels = _module_input(ctx)
    w_out = ctx.module_tensor("weight", 0, "out")
    bias = ctx.module_tensor("bias", 0, "dep")
    gain = ctx.module_tensor("gain", 0, "dep")
    if gain is not None:
        ctx.union(w_out, gain)
    if channels is not None:
        ctx.inexact(channels, f"{type(ctx.module).__name__} standardises each filter over "
                    "its input channels")
    out = couple_conv(ctx, channels, w_out, lambda: ctx.module_tensor("weight", 1, "in"),
                      bias, ctx.module.groups)
    ctx.set({axis: out})


LEAF_MODULES: list[type] = []  # timm modules fx keeps whole because they have a rule here


def _move_channels(ctx: RuleContext, axis: int) -> None:
    x = ctx.arg(0)
    dims = dict(ctx.dims(x) or {})
    axis %= len(ctx.shape(x))
    units = dims.pop(axis, None)
    ctx.pin_info(dims, "window/grid rearrangement moves token dims")
    ctx.set({axis % len(ctx.out_shape): units} if units is not None else {})


def channels_last_windows(ctx: RuleContext) -> None:
    """Windows <-> image on (..., C) tensors: tokens move, out[..., c] is in[..., c]."""
    _move_channels(ctx, -1)


def channels_first_windows(ctx: RuleContext) -> None:
    """Windows <-> image on (B, C, ...) tensors: tokens move, out[:, c] is in[:, c]."""
    _move_channels(ctx, 1)


def maybe_add_mask(ctx: RuleContext) -> None:
    """scores (+ mask): pass-through without a mask, else a broadcasting add."""
    mask = ctx.arg(1, "attn_mask")
    if mask is None or not isinstance(ctx.shape(mask), tuple):
        ctx.set(ctx.dims(ctx.arg(0, "scores")))
    else:
        binary(ctx)


def resolve_self_attn_mask(ctx: RuleContext) -> None:
    """The additive bias: built from ``seq_len`` (untracked), or the mask converted."""
    if ctx.out_shape is None:
        ctx.set(None)
        return
    ctx.set(dict(ctx.dims(ctx.arg(2, "attn_mask")) or {}))


_registered = False


def register() -> None:
    """Register the timm rules (idempotent). Done at import when timm is loaded already,
    else by ``fxprune.trace`` on a timm model: importing timm costs about a second."""
    global _registered
    if _registered:
        return
    import timm.layers.activations as act
    import timm.layers.attention as attention
    import timm.layers.norm_act as norm_act

    _registered = True
    # timm's activation modules compute out[c] from in[c] (traced through; the entries
    # let leaf modules that embed them, like BatchNormAct2d, recognise them).
    rule(act.Swish, act.Mish, act.Sigmoid, act.Tanh, act.HardSwish, act.HardSigmoid,
         act.HardMish, act.GELU, act.GELUTanh, act.QuickGELU)(unary)
    bn_act = (norm_act.BatchNormAct2d, norm_act.SyncBatchNormAct)
    rule(bn_act)(batch_norm_act)
    module_fixup(*bn_act)(fix_batch_norm)
    _register_window_helpers()
    import timm.layers.std_conv as std_conv

    std = (std_conv.StdConv2d, std_conv.StdConv2dSame, std_conv.ScaledStdConv2d,
           std_conv.ScaledStdConv2dSame)
    rule(std)(standardized_conv)
    module_fixup(*std)(fix_conv)  # out_channels feeds the standardisation's reshape
    LEAF_MODULES.extend(std)
    rule(attention.maybe_add_mask)(maybe_add_mask)
    rule(attention.resolve_self_attn_mask)(resolve_self_attn_mask)


def _register_window_helpers() -> None:
    """timm's window/grid reverse helpers (leaf functions: their int args are Proxies);
    each reads C from its input, so a pruned call needs no fixup."""
    import timm.models.davit as davit
    import timm.models.maxxvit as maxxvit
    import timm.models.nest as nest
    import timm.models.swin_transformer as swin
    import timm.models.swin_transformer_v2 as swin_v2
    import timm.models.swin_transformer_v2_cr as swin_v2_cr

    rule(swin.window_reverse, swin_v2.window_reverse, swin_v2_cr.window_reverse,
         davit.window_reverse, maxxvit.window_reverse, maxxvit.grid_reverse,
         nest.deblockify)(channels_last_windows)
    rule(maxxvit.window_reverse_nchw, maxxvit.grid_reverse_nchw)(channels_first_windows)


if "timm" in sys.modules:
    register()
