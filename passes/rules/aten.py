"""ATen ops that the ``torch.export`` front-end produces and that have no torch-level rule.

Most ATen overloads canonicalise onto the torch-level rules (``aten.linear.default`` ->
``"linear"``, ``aten.view.default`` -> ``"view"``). What is left here: ``aten.slice`` and
``aten.select`` (what ``x[..., a:b]`` and ``x[:, 0]`` become), dunder boolean ops, export's
runtime assertions and grad-mode switches, and the fused SDPA kernels of a decomposed
graph.
"""
from __future__ import annotations


import numpy as np
import torch

from passes.rules import dims as D
from passes.rules.attention import scaled_dot_product_attention, sdpa_contractions, set_sdpa_scale
from passes.rules.elementwise import binary
from passes.rules.linear import contract
from passes.rules.registry import RuleContext, contractions, fixup, rule
from passes.rules.shape import metadata

# Export's guards and runtime checks: they read metadata, produce no channels.
ASSERTIONS = ("_assert_tensor_metadata", "_assert_async", "_assert_scalar", "_set_grad_enabled",
              "is_grad_enabled", "sym_constrain_range", "sym_constrain_range_for_size",
              "_functional_assert_scalar", "_functional_assert_async")
DUNDER_BINARY = ("__and__", "__or__", "__xor__", "and", "or", "xor", "bitwise_xor")
FUSED_SDPA = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_attention_math")

rule(ASSERTIONS, torch._C._set_grad_enabled)(metadata)
rule(DUNDER_BINARY)(binary)
contractions(FUSED_SDPA)(sdpa_contractions)

_INT_MAX = 2 ** 63 - 1


def _slice_bounds(ctx_or_node, x_shape, axis: int) -> slice | None:
    node = getattr(ctx_or_node, "node", ctx_or_node)
    args = list(node.args) + [None] * 5
    start = node.kwargs.get("start", args[2])
    end = node.kwargs.get("end", args[3])
    step = node.kwargs.get("step", args[4] if args[4] is not None else 1)
    if not all(isinstance(v, (int, type(None))) for v in (start, end, step)):
        return None  # symbolic bounds
    return slice(start, end, step)


def _slice_axis(node: torch.fx.Node, rank: int) -> int:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % rank


@rule("slice")
def slice_(ctx: RuleContext) -> None:
    """aten.slice(x, dim, start, end, step): a run of units on ``dim``, others untouched."""
    x = ctx.arg(0, "self")
    shape = ctx.shape(x)
    axis = _slice_axis(ctx.node, len(shape))
    bounds = _slice_bounds(ctx, shape, axis)
    dims = dict(ctx.dims(x) or {})
    if bounds is None:
        ctx.pin(dims.pop(axis, None), "slice with symbolic bounds")
        ctx.set(dims)
        return
    ctx.set(D.select(ctx, dims, axis, bounds, shape[axis])[0])


@rule("select")
def select(ctx: RuleContext) -> None:
    """aten.select(x, dim, i): the dim is dropped (a tracked one is pinned, unless the
    value is dead: BART reads ``embeds[:, :, -1]`` for its shape only)."""
    x, dim, index = ctx.arg(0, "self"), ctx.arg(1, "dim"), ctx.arg(2, "index")
    if not ctx.node.users:
        ctx.set({})
        return
    rank = len(ctx.shape(x))
    ctx.set(D.select(ctx, ctx.dims(x), dim % rank, int(index) if isinstance(index, int)
                     else 0, ctx.shape(x)[dim % rank])[0])


@rule(FUSED_SDPA)
def fused_sdpa(ctx: RuleContext) -> None:
    """Fused attention kernels: output 0 is SDPA's; the rest (logsumexp, seeds) carry none.
    They take one head_dim for q, k and v alike, so q/k and v features are coupled too."""
    q, v = ctx.arg(0, "query"), ctx.arg(2, "value")
    contract(ctx, (ctx.dims(q) or {}).get(len(ctx.shape(q)) - 1),
             (ctx.dims(v) or {}).get(len(ctx.shape(v)) - 1))
    scaled_dot_product_attention(ctx)
    out = ctx.state.values[ctx.node.name]
    extra = ctx.out_shape[1:] if isinstance(ctx.out_shape[0], tuple) else ()
    ctx.set((out,) + tuple({} if isinstance(s, tuple) else None for s in extra))


@fixup(FUSED_SDPA)
def fix_fused_sdpa_scale(fctx) -> None:
    """As ``fix_sdpa_scale`` (``scale`` is keyword-only here)."""
    set_sdpa_scale(fctx, positional=None)


@fixup("slice")
def fix_slice(fctx) -> None:
    """Bounds on a pruned dim count the kept indices before them."""
    node = fctx.node
    x = node.args[0]
    shape = fctx.old_shape(x)
    axis = _slice_axis(node, len(shape))
    kept = fctx.kept(x, axis)
    bounds = _slice_bounds(node, shape, axis)
    if kept is None or bounds is None or len(kept) == shape[axis]:
        return
    start, stop, step = bounds.indices(shape[axis])
    new_start = int(np.count_nonzero(kept < start))
    new_stop = int(np.count_nonzero(kept < stop))
    args = [x, axis, new_start, new_stop if stop < shape[axis] else _INT_MAX, step]
    node.args, node.kwargs = tuple(args), {}
