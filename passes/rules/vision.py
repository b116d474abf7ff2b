"""torchvision's fx-wrapped helpers (Swin): leaves in symbolic tracing, so they get rules.

``shifted_window_attention`` is a compound stop op like nn.MultiheadAttention: the input
width feeds the qkv columns, heads live inside (qkv rows blocked (3, heads, head_dim),
proj columns (heads, head_dim), per-head bias tables and logit scales), the proj rows
start the output width. A pruned call is rewritten to ``fxprune.functional.window_attention``.
"""
from __future__ import annotations

import math

import numpy as np

from passes.rules.registry import (Contractions, MacContext, RuleContext, Terms, contractions,
                                   fixup, macs, present, rule)

try:
    from torchvision.models import swin_transformer as _swin
except ImportError:  # pragma: no cover - torchvision is optional at run time
    _swin = None


def _attr_units(ctx: RuleContext, value, dim: int, role: str):
    fqn = ctx.fqn_of(value)
    if fqn is not None:
        return ctx.tensor_units(fqn, dim, role)
    return (ctx.dims(value) or {}).get(dim)


def window_attention_rule(ctx: RuleContext) -> None:
    """x[..., c] -> qkv cols; heads inside; proj rows -> out[..., c]."""
    x, qkv_w, proj_w, rel_bias = (ctx.arg(i) for i in range(4))
    heads = ctx.arg(5, "num_heads")
    qkv_b, proj_b = ctx.arg(9, "qkv_bias"), ctx.arg(10, "proj_bias")
    logit_scale = ctx.arg(11, "logit_scale")
    dims = dict(ctx.dims(x) or {})
    last = len(ctx.shape(x)) - 1
    for axis in [a for a in dims if a != last]:
        ctx.pin(dims.pop(axis), "window attention mixes spatial dims")
    if ctx.fqn_of(qkv_w) is None or ctx.fqn_of(proj_w) is None:
        ctx.pin_info((dims, ctx.dims(qkv_w), ctx.dims(proj_w)), "window attention weights computed")
        ctx.set({})
        return
    ctx.link(dims.get(last), _attr_units(ctx, qkv_w, 1, "in"), "window attention input untracked")
    rows = _attr_units(ctx, qkv_w, 0, "out").reshape(3, heads, -1)
    cols = _attr_units(ctx, proj_w, 1, "in").reshape(heads, -1)
    if qkv_b is not None:
        ctx.link(_attr_units(ctx, qkv_b, 0, "dep"), rows.reshape(-1), "qkv bias computed")
    per_head = [u for u in ((ctx.dims(rel_bias) or {}).get(1),
                            _attr_units(ctx, logit_scale, 0, "dep") if logit_scale is not None
                            else None) if u is not None]
    if ctx.state.split_policy == "inner":
        ctx.union(rows[:1, :1, :], rows)
        ctx.union(cols[:1, :], cols)
        ctx.union(rows[0, 0, :], cols[0, :])
        for units in per_head:
            ctx.pin(units, "per-head table with head_dim units")
    else:
        ctx.union(rows[:1, :, :1], rows)
        ctx.union(cols[:, :1], cols)
        ctx.union(rows[0, :, 0], cols[:, 0])
        for units in per_head:
            ctx.link(rows[0, :, 0], units, "per-head table")
    out = _attr_units(ctx, proj_w, 0, "out")
    if proj_b is not None:
        ctx.link(out, _attr_units(ctx, proj_b, 0, "dep"), "proj bias computed")
    # torchvision reads C = x.shape[-1] and reshapes the heads' output to (.., C): the
    # inner width (heads x head_dim) must keep the input's kept width
    ctx.count_tie(dims.get(last), cols.reshape(-1), f"{getattr(x, 'name', x)}.shape[-1]")
    ctx.state.module_notes[ctx.node.name] = {"policy": ctx.state.split_policy,
                                             "num_heads": heads,
                                             "head_dim": rows.shape[2]}
    ctx.set({last: out})


def window_attention_contractions(ctx: MacContext) -> Contractions:
    """x[..., c] with the qkv columns; heads are born and consumed inside (gated on rows),
    so the per-head bias input is not a consumption edge."""
    return [((ctx.arg(0), -1), (ctx.arg(1), 1))]


def fix_window_attention(fctx) -> None:
    """Call fxprune's window attention with the kept heads/head_dim and
    ``fctx.options.softmax_scale``."""
    from fxprune.core.functional import window_attention

    node = fctx.node
    note = fctx.analysis.module_notes[node.name]
    rows = fctx.new_shape(node.args[1])[0] // 3
    if note["policy"] == "inner":
        heads, head_dim = note["num_heads"], rows // note["num_heads"]
    else:
        head_dim, heads = note["head_dim"], rows // note["head_dim"]
    args = list(node.args)
    kwargs = dict(node.kwargs)
    if len(args) > 5:
        args[5] = heads
    else:
        kwargs["num_heads"] = heads
    node.target = window_attention
    node.args = tuple(args)
    node.kwargs = {**kwargs, "head_dim": head_dim,
                   "scale": fctx.options.softmax_scale(note["head_dim"], head_dim)}


def patch_merging_pad_rule(ctx: RuleContext) -> None:
    """(.., H, W, C) -> (.., H/2, W/2, 4C): the 2x2 neighbours are concatenated on C."""
    x = ctx.arg(0)
    dims = dict(ctx.dims(x) or {})
    last = len(ctx.shape(x)) - 1
    for axis in [a for a in dims if a != last]:
        ctx.pin(dims.pop(axis), "patch merging mixes spatial dims")
    ctx.set({last: np.tile(dims[last], 4)} if last in dims else {})


def relative_position_bias_rule(ctx: RuleContext) -> None:
    """table (L, heads) -> bias (1, heads, N, N): heads carried, positions pinned."""
    table = ctx.dims(ctx.arg(0)) or {}
    ctx.pin(table.get(0), "relative position table rows")
    ctx.set({1: table[1]} if 1 in table else {})


def window_attention_macs(ctx: MacContext) -> Terms:
    """Swin window attention, per padded token: qkv ~ 3 C_in x inner, attention ~
    2 T x inner (T tokens per window), projection ~ inner x C_out."""
    qkv_w, proj_w = ctx.arg(1), ctx.arg(2)
    rows, c_in = ctx.shape(qkv_w)
    inner, c_out = rows // 3, ctx.shape(proj_w)[0]
    window = ctx.arg(4, "window_size")
    tokens = math.prod(window)
    qkv_rows, qkv_cols = ctx.attr_axis(qkv_w, 0), ctx.attr_axis(qkv_w, 1)
    proj_rows, proj_cols = ctx.attr_axis(proj_w, 0), ctx.attr_axis(proj_w, 1)
    return [(3 * c_in * inner, present(qkv_cols, qkv_rows)),
            (2 * tokens * inner, present(qkv_rows)),
            (inner * c_out, present(proj_cols, proj_rows))]


if _swin is not None:
    rule(_swin.shifted_window_attention, stop=True)(window_attention_rule)
    fixup(_swin.shifted_window_attention)(fix_window_attention)
    macs(_swin.shifted_window_attention)(window_attention_macs)
    contractions(_swin.shifted_window_attention)(window_attention_contractions)
    rule(_swin._patch_merging_pad)(patch_merging_pad_rule)
    rule(_swin._get_relative_position_bias)(relative_position_bias_rule)
