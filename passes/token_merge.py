"""Rewrite pass: token merging (ToMe) and token pruning (EViT) inside transformer layers.

Requires: a GraphModule with ``tensor_meta`` (``passes.shape_prop.propagate_shapes``),
batch-first token tensors ``B x N x C`` and a static token count ``N``.
Ensures: a new GraphModule (``gm`` is not mutated) in which, for each chosen layer, the
tokens are reduced between the attention residual and the MLP (the MLP block's input is
replaced by the reduced tokens, so the MLP, the residual add and every later layer see
fewer tokens); a token *size* ``B x N x 1`` (how many input tokens each token holds) is
tracked from the first reduction on and enters every later attention as
``log(size)`` added to the logits (proportional attention); literal token counts in
later ``view``/``reshape``/``expand`` nodes are rewritten; a size-weighted mean replaces
token means after the last reduction; ``graph.lint()`` passes. ``gm.meta["fxprune"]["tokens"]``
holds the :class:`TokenSchedule` that was applied.

Sources: Bolya et al. 2023, "Token Merging: Your ViT but Faster" (ICLR; bipartite soft
matching on the keys averaged over heads, size-weighted averages, proportional
attention); Liang et al. 2022, "Not All Patches are What You Need: Expediting Vision
Transformers via Token Reorganizations" (EViT, ICLR; keep the tokens the class token
attends to most, fuse the rest into one).

Before/after (a pre-norm layer, merge with r tokens)::

    add_1 = x + drop_path1(proj(sdpa(q, k, v)))   # before: the MLP reads add_1
    add_2 = add_1 + mlp(layer_norm(add_1))

    add_1 = x + drop_path1(proj(sdpa(q, k, v)))   # after
    merged = bipartite_merge(add_1, key_metric(k), size, r, protected)
    tokens, size = merged[0], merged[1]
    add_2 = tokens + mlp(layer_norm(tokens))     # later sdpa: attn_mask = log(size)
"""
from __future__ import annotations

import copy
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from fxprune.core.errors import (AttentionNotFoundError, StaticShapeError, TokenReductionError,
                            TokenScheduleError, describe_node)
from fxprune.core.graph_meta import set_meta
from passes.find_blocks import Block, find_blocks
from passes.rules.registry import op_key
from passes.record import record_values

__all__ = ["TokenLayer", "TokenLayerSite", "TokenSchedule", "find_token_layers",
           "reduce_tokens", "bipartite_merge", "evit_prune", "key_metric", "mha_key_metric",
           "class_attention", "mha_class_attention", "probs_class_attention",
           "attention_bias", "mha_attention_bias", "logits_bias", "padding_size",
           "weighted_token_mean", "size_as_mask"]

_TINY = 1e-12
_SAME_PAD, _MIXED_PAD = 3.0, -3.0  # cosine scores lie in [-1, 1]


# ----------------------------------------------------------------------------------
# Run-time functions the rewrite inserts as call_function nodes (all shape-static).
# ----------------------------------------------------------------------------------
def key_metric(k: torch.Tensor) -> torch.Tensor:
    """ToMe's matching metric: keys ``B x H x N x d`` averaged over heads -> ``B x N x d``."""
    return k.mean(1)


def _mha_qk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    e = x.shape[-1]
    qk = F.linear(x, weight[:2 * e], None if bias is None else bias[:2 * e])
    q, k = qk.split(e, dim=-1)
    shape = (x.shape[0], x.shape[1], heads, e // heads)
    return q.reshape(shape).transpose(1, 2), k.reshape(shape).transpose(1, 2)


def mha_key_metric(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   heads: int) -> torch.Tensor:
    """Keys of a batch-first ``nn.MultiheadAttention`` recomputed from ``in_proj``
    (``x``: its key input ``B x N x E``), averaged over heads -> ``B x N x E/heads``."""
    e = x.shape[-1]
    k = F.linear(x, weight[e:2 * e], None if bias is None else bias[e:2 * e])
    return k.reshape(x.shape[0], x.shape[1], heads, e // heads).mean(2)


def _apply_mask(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask


def class_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                    scale: float | None) -> torch.Tensor:
    """Attention of the class token (query 0) over the keys, averaged over heads.

    ``q``, ``k``: ``B x H x N x d``; ``mask``: SDPA's ``attn_mask`` (bool or additive,
    broadcastable to ``B x H x N x N``) -> ``B x N`` (rows sum to 1)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q[:, :, :1] @ k.transpose(-1, -2)) * scale
    if mask is not None:
        mask = mask[..., :1, :] if mask.dim() >= 2 and mask.shape[-2] > 1 else mask
    return _apply_mask(logits, mask).softmax(-1).mean(1)[:, 0]


def mha_class_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`class_attention` of a batch-first ``nn.MultiheadAttention`` (``x``: its
    input ``B x N x E``; ``mask``: ``B*heads x N x N`` or None) -> ``B x N``."""
    q, k = _mha_qk(x, weight, bias, heads)
    if mask is not None:
        mask = mask.reshape(x.shape[0], heads, *mask.shape[-2:])
    return class_attention(q, k, mask, None)


def probs_class_attention(probs: torch.Tensor) -> torch.Tensor:
    """Class-token row of softmax attention probabilities ``B x H x N x N`` -> ``B x N``."""
    return probs[:, :, 0].mean(1)


def padding_size(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Initial token sizes from a ``B x N`` padding mask (1 real, 0 padded) -> ``B x N x 1``:
    padded tokens have size 0, so they weigh nothing in any average and
    ``log(size) = -inf`` masks them as keys."""
    return (mask != 0).to(dtype).unsqueeze(-1)


def _log_size(size: torch.Tensor) -> torch.Tensor:
    return torch.where(size > 0, size.clamp_min(_TINY).log(),
                       torch.full_like(size, float("-inf")))


def attention_bias(mask: torch.Tensor | None, size: torch.Tensor, replace: bool,
                   proportional: bool) -> torch.Tensor:
    """SDPA ``attn_mask`` for merged tokens: ``log(size)`` per key (``B x 1 x 1 x N``),
    added to ``mask``, or replacing it when it was the padding mask (``replace``).

    Without ``proportional`` only the padding (size 0 -> -inf) is kept."""
    bias = _log_size(size if proportional else (size > 0).to(size.dtype))
    bias = bias.transpose(1, 2).unsqueeze(1)
    if mask is None or replace:
        return bias
    if mask.shape[-1] != bias.shape[-1]:
        raise TokenReductionError(
            f"an attention mask over {mask.shape[-1]} keys reached a layer that sees "
            f"{bias.shape[-1]} tokens after token reduction. Remedy: reduce tokens only "
            "in models whose attention mask is a padding mask (padding_mask=...) or none.")
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return mask + bias


def mha_attention_bias(size: torch.Tensor, heads: int, proportional: bool) -> torch.Tensor:
    """``nn.MultiheadAttention``'s float ``attn_mask`` (``B*heads x N x N``) for merged tokens."""
    b, n, _ = size.shape
    bias = attention_bias(None, size, True, proportional)
    return bias.expand(b, heads, n, n).reshape(b * heads, n, n)


def logits_bias(logits: torch.Tensor, size: torch.Tensor, proportional: bool) -> torch.Tensor:
    """Attention logits ``B x H x N x N`` of a hand-written attention plus ``log(size)``."""
    return logits + attention_bias(None, size, True, proportional).to(logits.dtype)


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor | None,
                    r: int, protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching and size-weighted merge of ``r`` tokens.

    ``x``: ``B x N x C`` tokens; ``metric``: ``B x N x c`` (keys averaged over heads);
    ``size``: ``B x N x 1`` tokens held (None: all 1). The first ``protected`` tokens
    (class token...) are left out of matching. The rest alternate into sets A (even) and
    B (odd); each A token's most similar (cosine) B token is its edge, the ``r``
    strongest edges are merged: B token <- size-weighted average, sizes added. Size-0
    (padded) tokens are matched with each other first and never into real tokens (a
    forced one weighs 0). Returns ``(B x N-r x C, B x N-r x 1)``, ordered
    ``[protected, unmerged A (original order), B]``.
    """
    b, n, c = x.shape
    size = x.new_ones(b, n, 1) if size is None else size
    xp, sp, x, s = x[:, :protected], size[:, :protected], x[:, protected:], size[:, protected:]
    m = metric[:, protected:]
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(_TINY)
    scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)
    pad_a, pad_b = s[:, ::2] == 0, (s[:, 1::2] == 0).transpose(-1, -2)
    scores = scores.masked_fill(pad_a != pad_b, _MIXED_PAD).masked_fill(pad_a & pad_b, _SAME_PAD)
    best, best_idx = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src_idx = order[:, :r]
    unm_idx = order[:, r:].sort(dim=-1).values
    dst_idx = best_idx.gather(1, src_idx)
    xa, xb, sa, sb = x[:, ::2], x[:, 1::2], s[:, ::2], s[:, 1::2]
    src_x = xa.gather(1, src_idx[..., None].expand(b, r, c))
    src_s = sa.gather(1, src_idx[..., None])
    num = (xb * sb).scatter_add(1, dst_idx[..., None].expand(b, r, c), src_x * src_s)
    den = sb.scatter_add(1, dst_idx[..., None], src_s)
    xb = torch.where(den > 0, num / den.clamp_min(_TINY), xb)
    unm_x = xa.gather(1, unm_idx[..., None].expand(b, unm_idx.shape[1], c))
    unm_s = sa.gather(1, unm_idx[..., None])
    return torch.cat([xp, unm_x, xb], dim=1), torch.cat([sp, unm_s, den], dim=1)


def evit_prune(x: torch.Tensor, attn: torch.Tensor, size: torch.Tensor | None, keep: int,
               protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT: keep the ``keep`` tokens the class token attends to most, fuse the rest.

    ``x``: ``B x N x C``; ``attn``: ``B x N`` class attention (mean over heads);
    ``size``: ``B x N x 1`` (None: all 1). The first ``protected`` tokens always stay.
    The pruned tokens become one token, their attention-weighted average, holding the
    sum of their sizes. Returns ``(B x protected+keep+1 x C, B x ... x 1)``, ordered
    ``[protected, kept (original order), fused]``.
    """
    b, n, c = x.shape
    size = x.new_ones(b, n, 1) if size is None else size
    xp, sp, x, s = x[:, :protected], size[:, :protected], x[:, protected:], size[:, protected:]
    a = attn[:, protected:]
    order = a.argsort(dim=-1, descending=True)
    kept = order[:, :keep].sort(dim=-1).values
    rest = order[:, keep:]
    kx = x.gather(1, kept[..., None].expand(b, keep, c))
    ks = s.gather(1, kept[..., None])
    rx = x.gather(1, rest[..., None].expand(b, rest.shape[1], c))
    rs = s.gather(1, rest[..., None])
    w = a.gather(1, rest)[..., None] * (rs > 0)
    den = w.sum(1, keepdim=True)
    fused = torch.where(den > 0, (rx * w).sum(1, keepdim=True) / den.clamp_min(_TINY),
                        rx.mean(1, keepdim=True))
    return torch.cat([xp, kx, fused], dim=1), torch.cat([sp, ks, rs.sum(1, keepdim=True)], dim=1)


def weighted_token_mean(x: torch.Tensor, size: torch.Tensor, keepdim: bool) -> torch.Tensor:
    """Mean over tokens (dim 1) where each token counts for the tokens it holds."""
    size = size.to(x.dtype).reshape(*size.shape[:2], *([1] * (x.dim() - 2)))
    return (x * size).sum(1, keepdim=keepdim) / size.sum(1, keepdim=keepdim).clamp_min(_TINY)


def size_as_mask(size: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Token sizes shaped and typed like a ``B x N (x 1...)`` padding mask (pooling)."""
    return size.reshape(*size.shape[:2], *([1] * (like.dim() - 2))).to(like.dtype)


# ----------------------------------------------------------------------------------
# Analysis: where the layers, their attention and their reduction points are
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLayerSite:
    """One transformer layer's token-reduction site (node names of the source graph).

    ``kind``: "sdpa" (``scaled_dot_product_attention``, torch or ATen), "mha"
    (``nn.MultiheadAttention``, batch-first) or "softmax" (hand-written attention, keys
    not reachable: the metric is the attention block's input). ``point``: the MLP
    block's input, where tokens are reduced.
    """

    layer: str
    kind: str
    attention: str
    attention_input: str
    point: str


@dataclass(frozen=True)
class TokenLayer:
    """What a rewrite did in one layer: ``op`` is "merge", "prune" or "none"."""

    layer: str
    point: str
    op: str
    amount: float
    tokens_in: int
    tokens_out: int


@dataclass(frozen=True)
class TokenSchedule:
    """Token counts per layer of a rewritten graph (``gm.meta["fxprune"]["tokens"]``)."""

    tokens: int
    batch: int
    protected: int
    layers: tuple[TokenLayer, ...]
    sites: tuple[TokenLayerSite, ...]

    @property
    def final_tokens(self) -> int:
        return self.layers[-1].tokens_out if self.layers else self.tokens


_MHA = torch.nn.MultiheadAttention


def _attention_node(gm: torch.fx.GraphModule, block: Block, by_name: dict):
    nodes = [by_name[n] for n in block.nodes]
    for n in nodes:
        if n.op == "call_function" and op_key(n) == "scaled_dot_product_attention":
            return "sdpa", n
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _MHA):
            return "mha", n
    for n in nodes:
        if n.op in ("call_function", "call_method") and op_key(n) == "softmax":
            return "softmax", n
    return None, None


def _follows(point: torch.fx.Node, start: torch.fx.Node, hops: int = 4) -> bool:
    """``point`` is ``start`` or reached from it through single-input per-token nodes."""
    for _ in range(hops + 1):
        if point is start:
            return True
        inputs = point.all_input_nodes
        tensors = [a for a in inputs if a.op != "get_attr"]
        if len(tensors) != 1:
            return False
        point = tensors[0]
    return False


def find_token_layers(gm: torch.fx.GraphModule) -> tuple[TokenLayerSite, ...]:
    """Every transformer layer as an (attention block, MLP block) pair, in graph order.

    An attention block is a residual block (``passes.find_blocks``, level "branch") that
    contains SDPA, ``nn.MultiheadAttention`` or a softmax; its MLP block is the next
    residual block, whose input follows the attention block's output (directly, or through
    a LayerNorm in post-norm layers). Raises ``AttentionNotFoundError`` when there is none.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        raise StaticShapeError("find_token_layers needs shapes: run "
                               "passes.shape_prop.propagate_shapes(gm, example_inputs) first.")
    blocks = find_blocks(gm, level="branch")
    sites = []
    for attn_block, mlp_block in zip(blocks, blocks[1:]):
        kind, node = _attention_node(gm, attn_block, by_name)
        if kind is None or _attention_node(gm, mlp_block, by_name)[0] is not None:
            continue
        if not _follows(by_name[mlp_block.input], by_name[attn_block.output]):
            continue
        if kind == "mha" and not gm.get_submodule(node.target).batch_first:
            raise TokenReductionError(
                f"{describe_node(node)}: nn.MultiheadAttention with batch_first=False "
                "(tokens on dim 0). Remedy: use batch_first=True layers.")
        sites.append(TokenLayerSite(attn_block.name, kind, node.name, attn_block.input,
                                    mlp_block.input))
    if not sites:
        raise AttentionNotFoundError(
            f"no transformer layer found in {type(gm).__name__}: no residual block contains "
            "scaled_dot_product_attention, nn.MultiheadAttention or a softmax and is followed "
            f"by an MLP block ({len(blocks)} residual blocks found). Token reduction needs "
            "attention whose key count follows the token count (token-mixing MLPs fix it). "
            "Remedy: trace attention as SDPA or nn.MultiheadAttention (timm fused_attn, HF "
            "attn_implementation='sdpa'), or leave this model's tokens alone.")
    return tuple(sites)


# ----------------------------------------------------------------------------------
# The rewrite
# ----------------------------------------------------------------------------------
def _tokens_of(node: torch.fx.Node) -> tuple[int, int]:
    val = node.meta.get("val")  # torch.export's own shapes: symbolic where dynamic
    if isinstance(val, torch.Tensor) and val.dim() == 3 and not isinstance(val.shape[1], int):
        raise StaticShapeError(
            f"{describe_node(node)}: the graph was exported with a dynamic token count "
            f"({val.shape[1]}); r per layer, literal sizes and the schedule are fixed for "
            "one count. Remedy: export with static shapes (pad or concatenate inputs to a "
            "fixed length).")
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) != 3:
        raise StaticShapeError(f"{describe_node(node)}: token reduction needs a B x N x C "
                               "tensor with shapes propagated. Remedy: run "
                               "propagate_shapes(gm, example_inputs) first.")
    b, n = shape[0], shape[1]
    if not isinstance(n, int) or not isinstance(b, int):
        raise StaticShapeError(
            f"{describe_node(node)}: the token count {n} is dynamic; merging r tokens per "
            "layer needs it static. Remedy: export with static shapes (pad or concatenate "
            "inputs to a fixed length) and pass example inputs of that length.")
    return b, n


def _amounts(values: Any, n_layers: int, what: str) -> list:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return [values] * n_layers
    values = list(values)
    if len(values) != n_layers:
        raise TokenScheduleError(f"{what} has {len(values)} entries for {n_layers} layers. "
                                 f"Remedy: give one value per layer, or one for all.")
    return values


def _attr_node(graph: torch.fx.Graph, gm: torch.fx.GraphModule, target: str):
    return graph.get_attr(target) if _has_attr(gm, target) else None


def _has_attr(gm: torch.fx.GraphModule, target: str) -> bool:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name, None) is not None


def reduce_tokens(gm: torch.fx.GraphModule, *, mode: str, amounts: Any, protected: int = 1,
                  padding: str | None = None, proportional: bool = True,
                  metric: str = "keys", example_inputs: Sequence[Any] | None = None,
                  sites: Sequence[TokenLayerSite] | None = None) -> torch.fx.GraphModule:
    """Reduce tokens in each layer of ``gm``: a new GraphModule; ``gm`` is not mutated.

    ``mode``: "merge" (``amounts``: ``r`` per layer, int or list) or "prune"
    (``amounts``: ``keep_rate`` per layer in (0, 1]). ``protected``: leading tokens that
    never merge (class, distillation, register tokens). ``padding``: name of a ``B x N``
    placeholder (1 real, 0 padded; HF ``attention_mask``) whose padded tokens get size 0.
    ``metric``: "keys" (ToMe) or "input" (the attention block's input).
    ``example_inputs``: needed when attention has a mask: each is checked to be all-open
    or the key-padding mask of ``padding`` (a causal or custom mask raises), since after
    the first reduction it is replaced by ``log(size)``.
    Raises ``TokenScheduleError`` (r above the available tokens, keep_rate outside
    (0, 1]), ``StaticShapeError`` (dynamic or pinned token count),
    ``AttentionNotFoundError``.
    """
    if mode not in ("merge", "prune"):
        raise ValueError("mode must be 'merge' (ToMe) or 'prune' (EViT)")
    if metric not in ("keys", "input"):
        raise ValueError("metric must be 'keys' (ToMe) or 'input' (the block input)")
    sites = tuple(sites) if sites is not None else find_token_layers(gm)
    values = _amounts(amounts, len(sites), "r" if mode == "merge" else "keep_rate")
    out = copy.deepcopy(gm)
    graph = out.graph
    by_name = {n.name: n for n in graph.nodes}
    batch, n0 = _tokens_of(by_name[sites[0].point])
    if padding is not None and (padding not in by_name or by_name[padding].op != "placeholder"):
        inputs = [n.name for n in graph.nodes if n.op == "placeholder"]
        raise TokenReductionError(f"padding mask '{padding}' is not an input of the graph "
                                  f"(inputs: {inputs}). Remedy: padding_mask=<one of "
                                  "them>, or None for inputs without padding.")
    _check_causal(gm, sites)
    _check_masks(gm, sites, padding, example_inputs)
    tokens, size, layers, reductions = n0, None, [], []
    for site, amount in zip(sites, values):
        point = by_name[site.point]
        b, n = _tokens_of(point)
        if n != n0:
            raise StaticShapeError(f"{describe_node(point)}: layer '{site.layer}' sees {n} "
                                   f"tokens, the first layer {n0}; layers with different "
                                   "token counts (hierarchical models) are not supported.")
        if size is not None:
            _bias_attention(out, site, by_name, size, True, proportional)
        keep = _count(mode, amount, tokens, protected, site)
        if keep == tokens:
            layers.append(TokenLayer(site.layer, site.point, "none", amount, tokens, tokens))
            continue
        if size is None and padding is not None:
            with graph.inserting_after(by_name[padding]):
                size = graph.call_function(padding_size, (by_name[padding], point.meta[
                    "tensor_meta"].dtype))
        new_x, size = _insert_reduction(out, site, by_name, mode, size, tokens, keep,
                                        protected, metric)
        layers.append(TokenLayer(site.layer, site.point, mode, amount, tokens, keep))
        reductions.append((new_x, keep))
        tokens = keep
    if reductions:
        _fix_literals(out, reductions, n0)
        _weight_pooling(out, reductions[-1][0], size, by_name.get(padding), n0)
    graph.lint()
    out.recompile()
    set_meta(out, "tokens", TokenSchedule(n0, batch, protected, tuple(layers), sites))
    return out


def _check_causal(gm, sites) -> None:
    by_name = {n.name: n for n in gm.graph.nodes}
    for site in sites:
        attn = by_name[site.attention]
        if site.kind == "sdpa" and (attn.kwargs.get("is_causal") is True
                                    or (len(attn.args) > 5 and attn.args[5] is True)):
            raise TokenReductionError(f"layer '{site.layer}': causal attention "
                                      f"({describe_node(attn)}); merged tokens have no "
                                      "order. Remedy: reduce tokens in encoders only.")


def _mask_node(attn: torch.fx.Node):
    if op_key(attn) != "scaled_dot_product_attention":
        return None
    mask = attn.args[3] if len(attn.args) > 3 else attn.kwargs.get("attn_mask")
    return mask if isinstance(mask, torch.fx.Node) else None


def _check_masks(gm, sites, padding: str | None, example_inputs) -> None:
    """Each SDPA mask must be all-open or the key-padding mask of ``padding``: after a
    reduction it is replaced by ``log(size)`` (padded tokens have size 0)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    masks = {s.layer: m for s in sites if s.kind == "sdpa"
             and (m := _mask_node(by_name[s.attention])) is not None}
    if not masks:
        return
    if example_inputs is None:
        raise TokenReductionError(f"layer '{next(iter(masks))}' has an attention mask; "
                                  "checking it needs example_inputs.")
    values = record_values(gm, tuple(example_inputs), {m.name for m in masks.values()}
                     | ({padding} if padding else set()))
    for layer, node in masks.items():
        mask = values.get(node.name)
        if mask is None:
            continue
        sources = {n.name for n in _ancestors(node, values_only=True) if n.op == "placeholder"}
        if not sources:
            allowed = _open(mask)  # a constant mask (HF builds all-open ones)
        elif padding is not None and sources == {padding}:
            open_ = _open_mask(mask)
            real = (values[padding] != 0)[:, None, None, :].expand_as(open_)
            allowed = bool((open_ == real).all())
        else:
            allowed = False
        if not allowed:
            raise TokenReductionError(
                f"layer '{layer}': its attention mask ({describe_node(node)}) is neither "
                f"all-open nor the key-padding mask of input {padding!r} (a causal or "
                "custom mask, or padding from another input). Merged tokens cannot keep "
                "it. Remedy: pass padding_mask='<the B x N 0/1 input>', or reduce tokens "
                "only in encoders with padding masks.")


def _open_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _open(mask: torch.Tensor) -> bool:
    return bool(_open_mask(mask).all()) if mask.dtype == torch.bool else bool((mask == 0).all())


_SIZE_QUERIES = ("sym_size", "size")


def _ancestors(node: torch.fx.Node, *, values_only: bool = False) -> set:
    """Nodes ``node`` depends on; ``values_only`` stops at size queries (a mask built
    from ``x.size(0)`` of a dynamic-batch graph depends on no value of ``x``)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            if not (values_only and op_key(n) in _SIZE_QUERIES):
                stack.extend(n.all_input_nodes)
    return seen


def _count(mode: str, amount: Any, tokens: int, protected: int, site: TokenLayerSite) -> int:
    """Token count after the layer's reduction; validates ``amount``."""
    free = tokens - protected
    if mode == "merge":
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise TokenScheduleError(f"layer '{site.layer}': r must be an int >= 0, got "
                                     f"{amount!r}")
        available = (free + 1) // 2
        if amount > available:
            raise TokenScheduleError(
                f"layer '{site.layer}': r={amount} but only {available} tokens can merge "
                f"there ({tokens} tokens, {protected} protected; bipartite matching merges "
                f"at most half of the rest). Remedy: r <= {available} in this layer, or a "
                "decreasing schedule (a list of r per layer).")
        return tokens - amount
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) \
            or not 0.0 < float(amount) <= 1.0 or math.isnan(float(amount)):
        raise TokenScheduleError(f"layer '{site.layer}': keep_rate must lie in (0, 1], got "
                                 f"{amount!r}. Remedy: e.g. keep_rate=0.7 keeps 70% of the "
                                 "tokens (1.0 keeps all).")
    if protected < 1:
        raise TokenScheduleError(f"layer '{site.layer}': EViT pruning ranks tokens by the "
                                 "class token's attention; protected must be >= 1 (the "
                                 "class token first).")
    keep = math.ceil(float(amount) * free - 1e-9)
    return tokens if keep >= free - 1 else protected + keep + 1


def _insert_reduction(gm, site, by_name, mode, size, tokens, keep, protected, metric):
    graph = gm.graph
    point = by_name[site.point]
    order = {n: i for i, n in enumerate(graph.nodes)}
    users = sorted(point.users, key=order.__getitem__)
    # before the earliest user, so the new nodes keep their creation order
    with graph.inserting_before(users[0] if users else None):
        if mode == "merge":
            score = _metric_node(gm, site, by_name, metric)
            red = graph.call_function(bipartite_merge, (point, score, size, tokens - keep,
                                                        protected))
        else:
            score = _class_attention_node(gm, site, by_name)
            red = graph.call_function(evit_prune, (point, score, size, keep - protected - 1,
                                                   protected))
        new_x = graph.call_function(operator.getitem, (red, 0))
        new_size = graph.call_function(operator.getitem, (red, 1))
    for u in users:
        u.replace_input_with(point, new_x)
    return new_x, new_size


def _mha_params(gm, node):
    mha = gm.get_submodule(node.target)
    if not mha._qkv_same_embed_dim:
        raise TokenReductionError(f"{describe_node(node)}: nn.MultiheadAttention with "
                                  "separate q/k/v projections. Remedy: metric='input'.")
    weight = gm.graph.get_attr(f"{node.target}.in_proj_weight")
    bias = _attr_node(gm.graph, gm, f"{node.target}.in_proj_bias")
    return mha, weight, bias


def _metric_node(gm, site, by_name, metric):
    attn = by_name[site.attention]
    if metric == "input" or site.kind == "softmax":
        return by_name[site.attention_input]
    if site.kind == "sdpa":
        k = attn.args[1] if len(attn.args) > 1 else attn.kwargs["key"]
        return gm.graph.call_function(key_metric, (k,))
    mha, weight, bias = _mha_params(gm, attn)
    key = attn.args[1] if len(attn.args) > 1 else attn.kwargs["key"]
    return gm.graph.call_function(mha_key_metric, (key, weight, bias, mha.num_heads))


def _class_attention_node(gm, site, by_name):
    attn = by_name[site.attention]
    if site.kind == "softmax":
        return gm.graph.call_function(probs_class_attention, (attn,))
    if site.kind == "sdpa":
        q, k = attn.args[0], attn.args[1]
        mask = attn.args[3] if len(attn.args) > 3 else attn.kwargs.get("attn_mask")
        return gm.graph.call_function(class_attention, (q, k, mask, attn.kwargs.get("scale")))
    mha, weight, bias = _mha_params(gm, attn)
    return gm.graph.call_function(mha_class_attention, (attn.args[0], weight, bias,
                                                        mha.num_heads,
                                                        attn.kwargs.get("attn_mask")))


def _bias_attention(gm, site, by_name, size, replace, proportional) -> None:
    """Add log(size) to this layer's attention logits (proportional attention)."""
    graph, attn = gm.graph, by_name[site.attention]
    with graph.inserting_before(attn):
        if site.kind == "sdpa":
            if len(attn.args) > 3:
                mask = attn.args[3]
                attn.update_arg(3, graph.call_function(attention_bias, (mask, size, replace,
                                                                        proportional)))
            else:
                mask = attn.kwargs.get("attn_mask")
                attn.update_kwarg("attn_mask", graph.call_function(
                    attention_bias, (mask, size, replace, proportional)))
        elif site.kind == "mha":
            mha = gm.get_submodule(attn.target)
            if attn.kwargs.get("attn_mask") is not None or attn.kwargs.get(
                    "key_padding_mask") is not None or len(attn.args) > 3:
                raise TokenReductionError(f"{describe_node(attn)}: nn.MultiheadAttention "
                                          "with its own mask. Remedy: not supported yet.")
            attn.update_kwarg("attn_mask", graph.call_function(
                mha_attention_bias, (size, mha.num_heads, proportional)))
        else:
            logits = attn.args[0]
            attn.update_arg(0, graph.call_function(logits_bias, (logits, size, proportional)))


_LITERAL_OPS = {"view", "reshape", "expand", "_unsafe_view", "new_zeros", "new_ones",
                "new_empty", "new_full", "zeros", "ones", "empty", "full"}


def _fix_literals(gm, reductions, n0: int) -> None:
    """Rewrite literal token counts (``n0``) after each reduction to the new count."""
    ends = {x: n for x, n in reductions}
    tokens, started = n0, False
    for node in list(gm.graph.nodes):
        if node in ends:
            tokens, started = ends[node], True
            continue
        if not started or node.op not in ("call_function", "call_method") \
                or op_key(node) not in _LITERAL_OPS:
            continue
        for i, arg in enumerate(node.args):
            if isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg):
                node.update_arg(i, type(arg)(_replace_count(node, list(arg), n0, tokens)))
        if node.op == "call_method" and len(node.args) > 2 and not any(
                isinstance(a, (list, tuple)) for a in node.args[1:]):
            sizes = [a if type(a) is int else None for a in node.args[1:]]
            fixed = _replace_count(node, sizes, n0, tokens)
            for i, (old, v) in enumerate(zip(sizes, fixed)):
                if old != v:
                    node.update_arg(i + 1, v)


def _replace_count(node, sizes: list, n0: int, tokens: int) -> list:
    """``sizes`` with ``n0`` replaced by ``tokens`` (position 0 is the batch)."""
    sizes = list(sizes)
    hits = [i for i, s in enumerate(sizes) if s == n0 and i > 0]
    if len(hits) > 1:
        raise StaticShapeError(f"{describe_node(node)}: the literal sizes {sizes} hold the "
                               f"token count {n0} more than once; cannot tell which to "
                               f"rewrite to {tokens}. Remedy: use example inputs whose "
                               "token count differs from the other sizes (batch, heads...).")
    for i in hits:
        sizes[i] = tokens
    return sizes


def _weight_pooling(gm, last, size, padding, n0: int) -> None:
    """After the last reduction: token means become size-weighted means, and a padding
    mask that multiplies the tokens (masked mean pooling) becomes the token sizes."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    reduced = {last}
    for node in list(graph.nodes):
        if order.get(node, -1) <= order[last]:
            continue
        ins = node.all_input_nodes
        if not any(a in reduced for a in ins):
            continue
        reduced.add(node)
        key = op_key(node) if node.op in ("call_function", "call_method") else None
        if key == "mean" and _token_mean(node):
            x = node.args[0]
            keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            with graph.inserting_before(node):
                size_in = _sliced_like(graph, x, size, reduced)
                new = graph.call_function(weighted_token_mean, (x, size_in, keepdim))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            reduced.add(new)
        elif key == "mul" and padding is not None:
            for other in ins:
                if other not in reduced and _from_padding(other, padding, n0):
                    with graph.inserting_before(node):
                        new = graph.call_function(size_as_mask, (size, other))
                    node.replace_input_with(other, new)


def _token_mean(node) -> bool:
    meta = node.args[0].meta.get("tensor_meta") if node.args else None
    if len(getattr(meta, "shape", ())) != 3:
        return False  # B x N x C token tensors only (a mean over heads is no pooling)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    return list(dims) == [1]


def _sliced_like(graph, x, size, reduced):
    """``size`` with the token slicing that produced ``x`` (``x[:, p:]``) applied."""
    if x.op == "call_function" and x.target is operator.getitem and x.args[0] in reduced:
        index = x.args[1]
        if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None):
            return graph.call_function(operator.getitem, (size, index))
    return size


def _from_padding(node, padding, n0: int) -> bool:
    """``node`` is computed from the padding mask alone and has ``n0`` tokens on dim 1."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) < 2 or shape[1] != n0:
        return False
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and n is not padding:
            return False
        stack.extend(n.all_input_nodes)
    return padding in seen
