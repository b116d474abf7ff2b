"""Attention: nn.MultiheadAttention (a compound stop op with an internal head space) and
``scaled_dot_product_attention`` (q.k contraction, v with the output).

Inside an MHA, the in-projection rows are blocked as (q|k|v, head, head_dim). With
``split_policy="inner"`` a unit is one head_dim index across all heads of q, k and v and
the matching out-projection columns; with ``"outer"`` a unit is one whole head. The
residual stream (the MHA's input and output dims) is coupled through the in-projection
columns and the out-projection rows like any Linear.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from passes.rules.dims import broadcast_merge
from passes.rules.linear import contract
from passes.rules.registry import (Contractions, MacContext, RewriteOptions, RuleContext, Terms,
                                   contractions, fixup, macs, module_fixup, present, rule)


def _head_units(ctx: RuleContext, rows: np.ndarray, cols: np.ndarray, heads: int) -> None:
    """Union in-proj rows (3, H, hd) and out-proj columns (H, hd) into head or head_dim units."""
    rows3 = rows.reshape(3, heads, -1)
    cols2 = cols.reshape(heads, -1)
    if ctx.state.split_policy == "inner":  # unit = head_dim index, shared by all heads
        ctx.union(rows3[:1, :1, :], rows3)
        ctx.union(cols2[:1, :], cols2)
        ctx.union(rows3[0, 0, :], cols2[0, :])
    else:  # unit = head
        ctx.union(rows3[:1, :, :1], rows3)
        ctx.union(cols2[:, :1], cols2)
        ctx.union(rows3[0, :, 0], cols2[:, 0])


@rule(nn.MultiheadAttention, stop=True)
def multihead_attention(ctx: RuleContext) -> None:
    """Inputs' embed dim -> in-proj columns; heads inside; out-proj rows -> output dim."""
    m = ctx.module
    query, key, value = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    out_shape = ctx.out_shape
    if m.bias_k is not None or m.add_zero_attn:
        for a in (query, key, value):
            ctx.pin_info(ctx.dims(a), "MultiheadAttention with bias_k/bias_v or add_zero_attn "
                         "is not supported")
        ctx.set(tuple({} if s is not None else None for s in out_shape))
        return
    rows = _mha_inputs(ctx, m, (query, key, value))
    bias = ctx.module_tensor("in_proj_bias", 0, "dep")
    if bias is not None:
        ctx.union(rows, bias)
    _head_units(ctx, rows, ctx.module_tensor("out_proj.weight", 1, "in"), m.num_heads)
    out_rows = ctx.module_tensor("out_proj.weight", 0, "out")
    out_bias = ctx.module_tensor("out_proj.bias", 0, "dep")
    if out_bias is not None:
        ctx.union(out_rows, out_bias)
    last = len(ctx.shape(query)) - 1
    dims = {a: u for a, u in (ctx.dims(query) or {}).items() if a != last}
    for a in (key, value):  # token/batch dims of keys and values must not be pruned
        ctx.pin_info({ax: u for ax, u in (ctx.dims(a) or {}).items()
                      if ax != len(ctx.shape(a)) - 1}, "attention key/value token dims")
    dims[last] = out_rows
    ctx.state.module_notes[ctx.node.target] = {
        "policy": ctx.state.split_policy, "num_heads": m.num_heads, "head_dim": m.head_dim}
    ctx.set((dims, {} if len(out_shape) > 1 and out_shape[1] is not None else None))


def _mha_inputs(ctx: RuleContext, m: nn.MultiheadAttention, inputs: tuple) -> np.ndarray:
    """Couple each input's embed dim with its projection's columns (one packed
    ``in_proj_weight``, or q/k/v_proj_weight when ``kdim``/``vdim`` differ); return the
    projections' rows as one (3 * embed) array, the packed layout."""
    packed = m._qkv_same_embed_dim
    names = ("in_proj_weight",) * 3 if packed else ("q_proj_weight", "k_proj_weight",
                                                    "v_proj_weight")
    seen: set[tuple[str, str]] = set()
    for a, name in zip(inputs, names):
        key = (getattr(a, "name", ""), name)
        if isinstance(a, torch.fx.Node) and key in seen:
            continue
        seen.add(key)
        dims = ctx.dims(a) or {}
        ctx.link(dims.get(len(ctx.shape(a)) - 1), ctx.module_tensor(name, 1, "in"),
                 "attention input dim is untracked")
    if packed:
        return ctx.module_tensor("in_proj_weight", 0, "out")
    return np.concatenate([ctx.module_tensor(n, 0, "out") for n in names])


@module_fixup(nn.MultiheadAttention)
def fix_multihead_attention(m: nn.MultiheadAttention, note: dict | None = None, *,
                            options: RewriteOptions = RewriteOptions()):
    """Replace by PrunedMultiheadAttention with the kept heads/head_dim (softmax scale:
    ``RewriteOptions.softmax_scale``, the original one unless asked to recompute it)."""
    from fxprune.core.nn import PrunedMultiheadAttention

    note = note or {"policy": "inner", "num_heads": m.num_heads, "head_dim": m.head_dim}
    inner = m.in_proj_weight.shape[0] // 3 if m._qkv_same_embed_dim else \
        m.q_proj_weight.shape[0]
    if note["policy"] == "inner":
        heads, head_dim = note["num_heads"], inner // note["num_heads"]
    else:
        head_dim = note["head_dim"]
        heads = inner // head_dim
    return PrunedMultiheadAttention(m, num_heads=heads, head_dim=head_dim,
                                    scale=options.softmax_scale(note["head_dim"], head_dim))


@rule("scaled_dot_product_attention")
def scaled_dot_product_attention(ctx: RuleContext) -> None:
    """softmax(q k^T) v: q/k feature dims contract, k/v token dims agree, out from v."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    dq, dk, dv = (dict(ctx.dims(t) or {}) for t in (q, k, v))
    mask = _attention_mask(ctx, ctx.arg(3, "attn_mask"))
    if ctx.node.kwargs.get("enable_gqa") and len(sq) >= 3 and sk[-3] != sq[-3]:
        (sk, dk), (sv, dv) = (_repeat_kv_heads(ctx, s, d, sq[-3]) for s, d in ((sk, dk), (sv, dv)))
    contract(ctx, dq.pop(len(sq) - 1, None), dk.pop(len(sk) - 1, None))
    contract(ctx, dk.pop(len(sk) - 2, None), dv.pop(len(sv) - 2, None))
    out_shape = tuple(sq[:-1]) + (sv[-1],)
    rank = len(out_shape)
    out = {}
    if len(sq) - 2 in dq:
        out[rank - 2] = dq.pop(len(sq) - 2)
    if len(sv) - 1 in dv:
        out[rank - 1] = dv.pop(len(sv) - 1)
    out.update(broadcast_merge(ctx, [(tuple(sq[:-2]), dq), (tuple(sk[:-2]), dk),
                                     (tuple(sv[:-2]), dv)] + mask, tuple(out_shape[:-2])))
    ctx.set(out)


@contractions("scaled_dot_product_attention")
def sdpa_contractions(ctx: MacContext) -> Contractions:
    """q[..., e] with k[..., e] (the scores); k's and v's token dims (the weighted sum)."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    return [((q, -1), (k, -1)), ((k, -2), (v, -2))]


def _attention_mask(ctx: RuleContext, mask) -> list:
    """A mask (or bias, T5's per-head positions) adds to the scores: its leading dims
    couple with the heads; its token dims are pinned."""
    shape = ctx.shape(mask)
    if not isinstance(shape, tuple) or len(shape) < 2:
        return []
    dims = dict(ctx.dims(mask) or {})
    for axis in (len(shape) - 2, len(shape) - 1):
        ctx.pin(dims.pop(axis, None), "attention mask token dims")
    return [(tuple(shape[:-2]), dims)]


def _repeat_kv_heads(ctx: RuleContext, shape, dims, q_heads: int):
    """enable_gqa: query head h reads key/value head h // (Hq / Hkv), as repeat_interleave."""
    axis = len(shape) - 3
    kv_heads = shape[axis]
    units = dims.pop(axis, None)
    if q_heads % kv_heads:
        ctx.pin(units, f"{q_heads} query heads do not divide into {kv_heads} key/value heads")
    elif units is not None:
        dims[axis] = np.repeat(units, q_heads // kv_heads)
    return tuple(shape[:axis]) + (q_heads,) + tuple(shape[axis + 1:]), dims


@fixup("scaled_dot_product_attention")
def fix_sdpa_scale(fctx) -> None:
    """A pruned q/k feature dim keeps the original softmax scale 1/sqrt(E) (or gets
    1/sqrt(E') with ``attention_scale="recompute"``)."""
    set_sdpa_scale(fctx, positional=6)


def set_sdpa_scale(fctx, positional: int | None) -> None:
    """Write ``fctx.options.softmax_scale`` as the node's ``scale`` when q/k lost features: in place of
    the default (None) or of an explicit scale equal to 1/sqrt(E) (Hugging Face passes its
    ``scaling``); any other explicit scale is the model's own and stays."""
    node = fctx.node
    old, new = fctx.old_shape(node.args[0])[-1], fctx.new_shape(node.args[0])[-1]
    if old == new:
        return
    at_arg = positional is not None and len(node.args) > positional
    given = node.args[positional] if at_arg else node.kwargs.get("scale")
    if given is not None and not (isinstance(given, float)
                                  and math.isclose(given, 1.0 / math.sqrt(old))):
        return
    scale = fctx.options.softmax_scale(old, new)
    if at_arg:
        node.args = node.args[:positional] + (scale,) + node.args[positional + 1:]
    else:
        node.kwargs = {**node.kwargs, "scale": scale}


# -- MAC scaling (cost model) -------------------------------------------------------
@macs("scaled_dot_product_attention")
def sdpa_macs(ctx: MacContext) -> Terms:
    """q.k^T ~ L x S x E and attn.v ~ L x S x Ev, weighted by E : Ev."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    e, ev = ctx.shape(q)[-1], ctx.shape(v)[-1]
    out = ctx.out_axes()
    labels = ctx.analysis.node_labels.get(ctx.node.name) or {}
    last = len(ctx.shape(ctx.node)) - 1
    lead = [u for a, u in labels.items() if a != last]
    s = present(ctx.axis(k, -2))
    return [(e / (e + ev), lead + present(ctx.axis(q, -1)) + s), (ev / (e + ev), out + s)]


@macs(nn.MultiheadAttention)
def multihead_attention_macs(ctx: MacContext) -> Terms:
    """In-projections ~ tokens x E_in x inner; attention ~ L x S x inner; out ~ inner x E_out."""
    m = ctx.module
    target = ctx.node.target
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    e_in = m.in_proj_weight.shape[1] if m.in_proj_weight is not None else m.embed_dim
    inner = m.embed_dim
    tokens = [math.prod(ctx.shape(t)) // ctx.shape(t)[-1] for t in (q, k, v)]
    qshape = ctx.shape(q)
    batch = 1 if len(qshape) == 2 else qshape[0 if m.batch_first else 1]
    rows = ctx.param_axis(f"{target}.in_proj_weight", 0)
    cols = ctx.param_axis(f"{target}.in_proj_weight", 1)
    out_cols = ctx.param_axis(f"{target}.out_proj.weight", 1)
    out_rows = ctx.param_axis(f"{target}.out_proj.weight", 0)
    return [(sum(tokens) * e_in * inner, present(cols, rows)),
            (2 * tokens[0] * (tokens[1] // batch) * inner, present(rows)),
            (tokens[0] * inner * m.out_proj.weight.shape[0], present(out_cols, out_rows))]
