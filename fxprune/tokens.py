"""Token merging (ToMe) and token pruning (EViT) on traced transformers, and their cost.

    small = fxprune.merge_tokens(model, (x,), r=8)             # ToMe, 8 tokens per layer
    small = fxprune.prune_tokens(model, (x,), keep_rate=[1, 1, 1, 0.7] * 3)  # EViT
    cost = fxprune.token_macs(model, (x,), small)              # MACs at each layer's count

The model is traced (``fxprune.trace``), or a GraphModule is used as given (an exported
or an ``fxprune.compile``-d one); the model is never modified. See ``passes/token_merge.py``
for the rewrite and docs/tokens.md for what was measured.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxprune.capture import trace
from fxprune.core.errors import TokenScheduleError
from fxprune.core.graph_meta import get_meta
from passes.rules.registry import op_key
from passes.shape_prop import propagate_shapes
from passes.token_merge import TokenSchedule, find_token_layers, reduce_tokens

__all__ = ["merge_tokens", "prune_tokens", "token_macs", "TokenCost", "token_schedule",
           "find_token_layers", "TokenSchedule"]


def _graph(model: torch.nn.Module, inputs: tuple, frontend: str) -> torch.fx.GraphModule:
    if isinstance(model, torch.fx.GraphModule) and _symbolic_sizes(model):
        # an exported graph with dynamic batch/sequence dims: token reduction rewrites
        # literal token counts, so it works on a copy specialised to the example inputs
        model = trace(model, inputs, frontend="export", dynamic=False)
    gm = model if isinstance(model, torch.fx.GraphModule) else trace(model, inputs,
                                                                       frontend=frontend,
                                                                       dynamic=False)
    if not _has_shapes(gm, inputs):
        propagate_shapes(gm, inputs)
    return gm


def _symbolic_sizes(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph queries sizes at run time (``aten.sym_size``) and may be
    specialised to the example inputs: fxprune's own export capture (batch and sequence
    dims dynamic by default), or a user's graph whose token inputs have a static length
    (a token count the user made dynamic is refused by the pass: ``StaticShapeError``)."""
    if not any(n.op == "call_function" and op_key(n) == "sym_size" for n in gm.graph.nodes):
        return False
    if get_meta(gm, "frontend") == "export":
        return True  # fxprune's own capture: its dynamic dims are defaults, not requests
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim() in (2, 3) and \
                not isinstance(val.shape[1], int):
            return False
    return True


def _has_shapes(gm: torch.fx.GraphModule, inputs: tuple) -> bool:
    """Every node carries ``tensor_meta`` propagated from inputs of these shapes (a graph
    this module made, or one shapes were propagated on): propagation can be skipped."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if len(tensors) != len(inputs) or len(placeholders) != len(inputs):
        return False
    for node, x in zip(placeholders, tensors):
        meta = node.meta.get("tensor_meta")
        if getattr(meta, "shape", None) != x.shape or meta.dtype != x.dtype:
            return False
    return all("tensor_meta" in n.meta for n in gm.graph.nodes
               if n.op in ("call_function", "call_method", "call_module")
               and n.users)


def _protected(model: torch.nn.Module, protected: int | None) -> int:
    if protected is not None:
        return protected
    for attr in ("num_prefix_tokens",):  # timm ViT/DeiT: class (+ distillation) tokens
        value = getattr(model, attr, None)
        if isinstance(value, int):
            return value
    return 1  # a class token first (torchvision ViT, BERT's [CLS], HF ViT)


def _padding(gm: torch.fx.GraphModule, padding_mask: str | None) -> str | None:
    if padding_mask != "auto":
        return padding_mask
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return "attention_mask" if "attention_mask" in names else None


def _as_tuple(x: Any) -> tuple:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def merge_tokens(model: torch.nn.Module, example_inputs: Any, *, r: int | Sequence[int],
                 protected: int | None = None, padding_mask: str | None = "auto",
                 proportional: bool = True, metric: str = "keys",
                 frontend: str = "auto") -> torch.fx.GraphModule:
    """ToMe (Bolya et al. 2023): merge ``r`` tokens in every transformer layer.

    ``r``: an int for every layer, or one per layer (``token_schedule`` makes a
    decreasing one). Tokens are matched on the attention keys averaged over heads
    ("keys"; the block input where attention is hand-written, or with
    ``metric="input"``), merged by size-weighted averaging between the attention
    residual and the MLP; later attentions add ``log(size)`` to their logits
    (``proportional``). The first ``protected`` tokens never merge (default: the
    model's ``num_prefix_tokens``, else 1: the class token). ``padding_mask``: the
    name of a ``B x N`` input of 1/0 (default: an input named ``attention_mask``);
    padded tokens get size 0, never merge into real ones, and masked mean pooling
    becomes size-weighted. ``r=0`` returns the same computation.

    Returns a new GraphModule for the example inputs' batch and token count, with
    ``meta["fxprune"]["tokens"]`` (a ``TokenSchedule``). Raises ``TokenScheduleError`` (r
    above the tokens available in a layer), ``AttentionNotFoundError``,
    ``StaticShapeError`` (dynamic token count, a literal that pins it).
    """
    inputs = _as_tuple(example_inputs)
    gm = _graph(model, inputs, frontend)
    out = reduce_tokens(gm, mode="merge", amounts=r, protected=_protected(model, protected),
                        padding=_padding(gm, padding_mask), proportional=proportional,
                        metric=metric, example_inputs=inputs)
    propagate_shapes(out, inputs)
    return out


def prune_tokens(model: torch.nn.Module, example_inputs: Any, *,
                 keep_rate: float | Sequence[float], protected: int | None = None,
                 padding_mask: str | None = "auto", proportional: bool = True,
                 frontend: str = "auto") -> torch.fx.GraphModule:
    """EViT (Liang et al. 2022), training-free: keep the ``keep_rate`` fraction of tokens
    the class token attends to most (mean over heads) in each layer, fuse the others
    into one token (their attention-weighted average, holding their sizes).

    ``keep_rate``: in (0, 1], one for every layer or one per layer (EViT prunes in a
    few layers: ``[1, 1, 1, 0.7] * 3`` for 12). ``keep_rate=1`` returns the same
    computation. Other arguments and errors as :func:`merge_tokens`.
    """
    inputs = _as_tuple(example_inputs)
    gm = _graph(model, inputs, frontend)
    out = reduce_tokens(gm, mode="prune", amounts=keep_rate,
                        protected=_protected(model, protected),
                        padding=_padding(gm, padding_mask), proportional=proportional,
                        example_inputs=inputs)
    propagate_shapes(out, inputs)
    return out


def token_schedule(start: int, end: int, layers: int) -> list[int]:
    """``r`` per layer falling linearly from ``start`` to ``end`` (rounded)."""
    if layers < 1:
        raise TokenScheduleError("a schedule needs at least one layer")
    if layers == 1:
        return [int(start)]
    return [round(start + (end - start) * i / (layers - 1)) for i in range(layers)]


# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenCost:
    """MACs of a model before and after token reduction (multiply-accumulates)."""

    macs_before: float
    macs_after: float
    reduction_macs: float  # matching / class attention the rewrite adds
    per_layer: tuple[tuple[str, int, int], ...]  # (layer, tokens in, tokens its MLP sees)

    @property
    def ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0


_QUADRATIC = {"scaled_dot_product_attention", "matmul", "bmm", "einsum", "baddbmm"}


def token_macs(model: torch.nn.Module, example_inputs: Any, reduced: torch.fx.GraphModule, *,
               frontend: str = "auto") -> TokenCost:
    """MACs of ``reduced`` predicted from ``model``'s dense per-node MACs and the token
    count each node sees (``get_meta(reduced, "tokens")``).

    Per node (FlopCounterMode on the source graph, fake tensors; attention from its
    shapes, which FlopCounterMode misses on CPU kernels): a linear/conv node
    scales with ``n / N``; an attention product (SDPA, q @ k^T, attn @ v: a tensor
    with two token dims) with ``(n / N)^2``; ``nn.MultiheadAttention`` splits into
    its projections (``n``) and its attention (``n^2``). The rewrite's own work is added:
    ToMe's matching ``B * |A| * |B| * d`` per layer, keys recomputed from ``in_proj`` for
    ``nn.MultiheadAttention`` (``B * n * E^2``), EViT's class attention ``B * H * n * d``.
    Tokens are assumed on dim 1, with ``N`` not equal to other sizes of those tensors.
    ``FlopCounterMode`` agrees on the rewritten graph when attention runs its counted
    path (``sdpa_kernel(SDPBackend.MATH)``, grad enabled: see tests/tokens).
    """
    from fxprune.planning.cost import node_flops

    inputs = _as_tuple(example_inputs)
    gm = _graph(model, inputs, frontend)
    schedule: TokenSchedule = get_meta(reduced, "tokens")
    flops = node_flops(gm, inputs)
    n0, b = schedule.tokens, schedule.batch
    counts = _node_tokens(gm, schedule)
    before = after = extra = 0.0
    for node in gm.graph.nodes:
        macs = _dense_macs(gm, node, flops.get(node.name, 0) / 2)
        if not macs:
            continue
        n = counts.get(node.name, n0)
        before += macs
        after += _scaled(gm, node, macs, n, n0, b)
    for layer, site in zip(schedule.layers, schedule.sites):
        if layer.op == "none":
            continue
        extra += _reduction_macs(gm, site, layer, schedule)
    return TokenCost(before, after + extra, extra,
                     tuple((lay.layer, lay.tokens_in, lay.tokens_out) for lay in schedule.layers))


def _node_tokens(gm: torch.fx.GraphModule, schedule: TokenSchedule) -> dict[str, int]:
    """Token count per node name of the source graph (graph order after each point)."""
    points = {lay.point: lay.tokens_out for lay in schedule.layers if lay.op != "none"}
    counts, n = {}, schedule.tokens
    for node in gm.graph.nodes:
        counts[node.name] = n
        if node.name in points:
            n = points[node.name]
    return counts


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _dense_macs(gm, node: torch.fx.Node, counted: float) -> float:
    """MACs of one node at the source token count. Attention is counted from its shapes:
    FlopCounterMode (torch 2.14) counts 0 for CPU SDPA kernels and for
    ``nn.MultiheadAttention``'s inference fast path, yet the attention products are
    what shrinks quadratically with the token count."""
    if node.op == "call_function" and op_key(node) == "scaled_dot_product_attention":
        q, k, v = (_shape(a) for a in node.args[:3])
        if q and k and v:
            batch = math.prod(q[:-2])
            return float(batch * q[-2] * k[-2] * (q[-1] + v[-1]))
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                torch.nn.MultiheadAttention):
        mod, x = gm.get_submodule(node.target), _shape(node.args[0])
        if x and mod._qkv_same_embed_dim:
            b, n, e = x
            return float(4 * b * n * e * e + 2 * b * n * n * e)
    return counted


def _token_dims(node: torch.fx.Node, n0: int) -> int:
    values = [node] + list(node.all_input_nodes)
    best = 0
    for v in values:
        shape = getattr(v.meta.get("tensor_meta"), "shape", None)
        if shape is not None and len(shape) >= 2:
            best = max(best, sum(1 for s in list(shape)[1:] if s == n0))
    return min(best, 2)


def _scaled(gm, node, macs: float, n: int, n0: int, b: int) -> float:
    if n == n0:
        return macs
    f = n / n0
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                torch.nn.MultiheadAttention):
        e = gm.get_submodule(node.target).embed_dim
        lin = 4.0 * b * n0 * e * e  # in_proj (3E) and out_proj (E) rows per token
        return lin * f + (macs - lin) * f * f  # q @ k^T and p @ v
    dims = _token_dims(node, n0)
    if node.op == "call_function" and op_key(node) == "scaled_dot_product_attention":
        dims = 2  # self-attention: queries and keys both reduced
    if dims == 2 and op_key(node) not in _QUADRATIC and node.op != "call_module":
        dims = 1
    return macs * f ** dims


def _reduction_macs(gm, site, layer, schedule) -> float:
    by_name = {n.name: n for n in gm.graph.nodes}
    n, b, p = layer.tokens_in, schedule.batch, schedule.protected
    attn = by_name[site.attention]
    if layer.op == "merge":
        free = n - p
        na, nb = (free + 1) // 2, free // 2
        if site.kind == "sdpa":
            d = attn.args[1].meta["tensor_meta"].shape[-1]
            return float(b * na * nb * d)
        if site.kind == "mha":
            e = gm.get_submodule(attn.target).embed_dim
            heads = gm.get_submodule(attn.target).num_heads
            return float(b * n * e * e + b * na * nb * (e // heads))
        c = by_name[site.attention_input].meta["tensor_meta"].shape[-1]
        return float(b * na * nb * c)
    if site.kind == "sdpa":
        shape = attn.args[1].meta["tensor_meta"].shape
        return float(b * shape[1] * n * shape[-1])
    if site.kind == "mha":
        mod = gm.get_submodule(attn.target)
        return float(b * n * mod.embed_dim * 2 * mod.embed_dim + b * n * mod.embed_dim)
    return 0.0
