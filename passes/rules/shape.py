"""Shape ops: reshape/flatten/permute/expand/index/cat/split and shape metadata.

Analysis rules read shapes from ``tensor_meta`` and map units with ``passes.rules.dims``;
fixups rewrite literal sizes after slicing (a tracked dim's size becomes the kept count).
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from passes.rules import dims as D
from passes.rules.registry import RuleContext, fixup, op_key, rule

RESHAPES = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
            "reshape_as", "_reshape_alias", "ravel", "atleast_2d", "atleast_3d")
PERMUTES = ("permute", "transpose", "t", "movedim", "moveaxis", "numpy_T", "mT")
NON_TENSOR = ("size", "dim", "getattr", "numel", "len", "_assert", "sym_size", "sym_numel",
              "sym_stride", "stride", "is_contiguous", "int", "_assert_async",
              "_assert_scalar", "sym_constrain_range_for_size", "is_floating_point",
              "get_device", "_log_api_usage_once", "element_size", "nelement")
FACTORIES = ("arange", "empty", "randn", "rand", "randint", "tensor", "scalar_tensor",
             "linspace", "eye", "new_empty", "new_tensor", "as_tensor", "zeros_like_shape")
# every element the same value: slicing one equals masking it, whatever it meets
UNIFORM_FACTORIES = ("zeros", "ones", "full", "new_zeros", "new_ones", "new_full")


@rule(RESHAPES, nn.Flatten, nn.Unflatten)
def reshape(ctx: RuleContext) -> None:
    """Index maps through reshapes: flatten repeats, head splits block, shuffles permute."""
    x = ctx.arg(0, "input")
    ctx.set(D.reshape(ctx, ctx.dims(x), ctx.shape(x), ctx.out_shape))


@rule(PERMUTES)
def permute(ctx: RuleContext) -> None:
    """out dim i is in dim perm[i]; units move with their dim."""
    x = ctx.arg(0, "input")
    ctx.set(D.permute(ctx.dims(x), permutation(ctx, len(ctx.shape(x)))))


def permutation(ctx: RuleContext, rank: int) -> list[int]:
    """The permutation of permute / transpose / movedim / t, read from the normalised call
    (``x.permute(0, 2, 1)`` passes its dims as varargs)."""
    key = op_key(ctx.node)
    perm = list(range(rank))
    if key == "permute":
        dims = ctx.arg(1, "dims")
        if not isinstance(dims, (list, tuple)):
            dims = ctx.node.args[1:]
        return [d % rank for d in dims]
    if key in ("movedim", "moveaxis"):
        src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        return _movedim(rank, src, dst)
    a, b = ctx.arg(1, "dim0"), ctx.arg(2, "dim1")
    if isinstance(a, int) and isinstance(b, int):
        a, b = a % rank, b % rank
    else:  # t / mT / numpy_T: swap the last two
        a, b = rank - 2, rank - 1
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _movedim(rank: int, src: list[int], dst: list[int]) -> list[int]:
    src = [s % rank for s in src]
    dst = [d % rank for d in dst]
    order = [i for i in range(rank) if i not in src]
    perm = [None] * rank
    for s, d in zip(src, dst):
        perm[d] = s
    rest = iter(order)
    return [p if p is not None else next(rest) for p in perm]


@rule("expand", "expand_as", "broadcast_to")
def expand(ctx: RuleContext) -> None:
    """Broadcast to a bigger shape: a tracked dim may not grow from size 1."""
    x = ctx.arg(0, "input")
    in_shape, out_shape = ctx.shape(x), ctx.out_shape
    dims = D.shift(ctx.dims(x), len(out_shape) - len(in_shape))
    for axis, units in list(dims.items()):
        if len(units) != out_shape[axis]:
            ctx.pin(units, "channel dim expanded from size 1")
            del dims[axis]
    ctx.set(dims)


@rule("repeat", "tile")
def repeat(ctx: RuleContext) -> None:
    """Tiling repeats the units of a tracked dim."""
    x = ctx.arg(0, "input")
    in_shape, out_shape = ctx.shape(x), ctx.out_shape
    dims = D.shift(ctx.dims(x), len(out_shape) - len(in_shape))
    ctx.set({a: np.tile(u, out_shape[a] // max(len(u), 1)) for a, u in dims.items()})


@rule("roll")
def roll(ctx: RuleContext) -> None:
    """Cyclic shift along ``dims`` (shifted windows): other dims carry their units; a
    rolled channel dim, or a roll of the flattened tensor, is pinned."""
    x = ctx.arg(0, "input")
    dims = dict(ctx.dims(x) or {})
    axes = ctx.arg(2, "dims")
    if axes is None or (isinstance(axes, (list, tuple)) and not axes):
        ctx.pin_info(dims, "roll of the flattened tensor")
        ctx.set({})
        return
    rank = len(ctx.shape(x))
    for axis in (axes if isinstance(axes, (list, tuple)) else [axes]):
        ctx.pin(dims.pop(axis % rank, None), "roll along a channel dim")
    ctx.set(dims)


@rule(NON_TENSOR)
def metadata(ctx: RuleContext) -> None:
    """Reads sizes only; the value carries no channels."""
    ctx.set(None)


@rule(FACTORIES)
def factory(ctx: RuleContext) -> None:
    """A new tensor from literal sizes: untracked."""
    ctx.set({})


@rule(UNIFORM_FACTORIES)
def uniform_factory(ctx: RuleContext) -> None:
    """``zeros``/``ones``/``full``: each literal size > 1 carries fresh units, so the tensor
    follows what it meets (T5's ``zeros((1, n_heads, q, k))`` position bias takes the
    heads of the attention scores it is added to) and ``fix_factory_sizes`` writes the
    kept count back. Units that meet nothing prunable are pinned or, never joining a
    group with parameters, never pruned. Sizes computed at run time stay untracked."""
    shape, (sizes, _) = ctx.out_shape, _factory_sizes(ctx.node)
    if not _is_tensor_shape(shape) or sizes is None or len(sizes) != len(shape):
        ctx.set({})
        return
    ctx.set({axis: ctx.fresh(n) for axis, (n, size) in enumerate(zip(shape, sizes))
             if n > 1 and type(size) is int})


def _factory_sizes(node: torch.fx.Node) -> tuple[list | None, Any]:
    """The size arguments of a factory call and where they sit: ``"size"`` (keyword),
    an int (index of a packed list/tuple) or a slice (unpacked ``zeros(2, 3)``)."""
    name = op_key(node)
    start = 1 if isinstance(name, str) and name.startswith("new_") else 0  # x.new_zeros
    if "size" in node.kwargs:
        return list(node.kwargs["size"]), "size"
    args = node.args[start:]
    if args and isinstance(args[0], (list, tuple, torch.Size)):
        return list(args[0]), start
    if name in ("zeros", "ones", "new_zeros", "new_ones"):
        return list(args), slice(start, len(node.args))  # zeros(2, 3); x.new_zeros(2, 3)
    return None, None


@rule("getitem")
def getitem(ctx: RuleContext) -> None:
    """Tuple element, or basic tensor indexing (slices of a channel dim map units)."""
    value, index = ctx.arg(0), ctx.arg(1)
    info = ctx.dims(value)
    if not isinstance(ctx.shape(value), tuple) or not _is_tensor_shape(ctx.shape(value)):
        ctx.set(info[index] if isinstance(info, (tuple, list)) and isinstance(index, int)
                else (None if not isinstance(info, dict) else {}))
        return
    gathered = _gather_dims(ctx, info, ctx.shape(value), index)
    ctx.set(gathered if gathered is not None else index_dims(ctx, info, ctx.shape(value), index))


def _gather_dims(ctx: RuleContext, dims, shape, index) -> dict | None:
    """``x[idx]`` / ``x[:, idx]``: one integer tensor index, full slices elsewhere. The
    indexed dim becomes idx's dims (pinned if it was tracked); the others carry through
    (a relative position table ``table[idx]`` keeps its per-head dim)."""
    items = list(index) if isinstance(index, tuple) else [index]
    nodes = [k for k, it in enumerate(items) if isinstance(it, torch.fx.Node)]
    full = slice(None)
    if len(nodes) != 1 or any(it != full for k, it in enumerate(items) if k != nodes[0]):
        return None
    idx = items[nodes[0]]
    meta = idx.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "dtype") or meta.dtype not in (torch.int64,
                                                                         torch.int32):
        return None
    at, extra = nodes[0], len(meta.shape) - 1
    dims = dict(dims or {})
    ctx.pin(dims.pop(at, None), "tensor index into a channel dim")
    ctx.pin_info(ctx.dims(idx), "used as an index")
    return {a + (extra if a > at else 0): u for a, u in dims.items()}


def _is_tensor_shape(s: Any) -> bool:
    return all(isinstance(x, int) for x in s)


def index_dims(ctx: RuleContext, dims, shape, index) -> dict:
    items = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    out: dict = {}
    src, dst = 0, 0
    remaining = dict(dims or {})
    for item in items:
        if item is None:
            dst += 1
        elif item is Ellipsis:
            for _ in range(len(shape) - consumed):
                if src in remaining:
                    out[dst] = remaining.pop(src)
                src, dst = src + 1, dst + 1
        elif isinstance(item, int):
            ctx.pin(remaining.pop(src, None), "integer index into a channel dim")
            src += 1
        elif isinstance(item, slice) and all(isinstance(v, (int, type(None)))
                                             for v in (item.start, item.stop, item.step)):
            sub, _ = D.select(ctx, {0: remaining.pop(src)} if src in remaining else {}, 0,
                              item, shape[src])
            if 0 in sub:
                out[dst] = sub[0]
            src, dst = src + 1, dst + 1
        elif isinstance(item, slice):  # symbolic bounds (x[:, :H]): fine on an untracked dim
            ctx.pin(remaining.pop(src, None), "slice of a channel dim with computed bounds")
            src, dst = src + 1, dst + 1
        elif isinstance(item, torch.fx.Node) and not _is_tensor_node(item):
            # a computed integer (y[:, y.size(1) - 1]): drops its dim like a literal one
            ctx.pin(remaining.pop(src, None), "computed integer index into a channel dim")
            src += 1
        else:  # tensor index: fail closed on every tracked dim
            ctx.pin_info(ctx.dims(item) if isinstance(item, torch.fx.Node) else None,
                         "used as an index")
            ctx.pin_info(remaining, "advanced indexing")
            ctx.pin_info(out, "advanced indexing")
            return {}
    for axis in range(src, len(shape)):
        if axis in remaining:
            out[dst + axis - src] = remaining.pop(axis)
    return out


def _is_tensor_node(n: torch.fx.Node) -> bool:
    meta = n.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape")


@rule("narrow")
def narrow(ctx: RuleContext) -> None:
    """narrow(x, dim, start, length) == x[..., start:start + length] on ``dim``."""
    x, dim = ctx.arg(0, "input"), ctx.arg(1, "dim")
    start, length = ctx.arg(2, "start"), ctx.arg(3, "length")
    shape, dims = ctx.shape(x), dict(ctx.dims(x) or {})
    axis = dim % len(shape)
    if not (isinstance(start, int) and isinstance(length, int)):
        ctx.pin(dims.pop(axis, None), "narrow of a channel dim with computed bounds")
        ctx.set(dims)
        return
    start += shape[axis] if start < 0 else 0
    ctx.set(D.select(ctx, dims, axis, slice(start, start + length), shape[axis])[0])


@fixup("narrow")
def fix_narrow(fctx) -> None:
    """start / length on a pruned dim count the kept indices before / inside the run."""
    x = fctx.arg(0, "input")
    shape = fctx.old_shape(x)
    axis = fctx.arg(1, "dim") % len(shape)
    kept = fctx.kept(x, axis)
    start, length = fctx.arg(2, "start"), fctx.arg(3, "length")
    if kept is None or len(kept) == shape[axis]:
        return
    start += shape[axis] if start < 0 else 0
    new_start = int(np.count_nonzero(kept < start))
    fctx.set_arg(2, "start", new_start)
    fctx.set_arg(3, "length", int(np.count_nonzero(kept < start + length)) - new_start)


@rule("channel_shuffle", "native_channel_shuffle", nn.ChannelShuffle)
def channel_shuffle(ctx: RuleContext) -> None:
    """ShuffleNet's shuffle: out[j*g + i] = in[i*(C/g) + j]. Channels at position j of
    every group are coupled (kept positions are equal per group), so the shuffle with
    the same ``groups`` stays valid after slicing."""
    x = ctx.arg(0, "input")
    groups = ctx.module.groups if ctx.node.op == "call_module" else ctx.arg(1, "groups")
    dims = dict(ctx.dims(x) or {})
    units = dims.get(1)
    if units is not None:
        per_group = ctx.store.union_along(units.reshape(groups, -1), 1, ctx.why)
        dims[1] = np.repeat(per_group, groups)
    ctx.set(dims)


@rule("index_select")
def index_select(ctx: RuleContext) -> None:
    """index_select(x, dim, idx) with a constant (get_attr) index: out[k] = in[idx[k]], a
    selection or permutation of units; ``fix_index_select`` re-indexes the kept ones.
    A computed index is a barrier on ``dim``."""
    x, dim, index = ctx.arg(0, "input"), ctx.arg(1, "dim"), ctx.arg(2, "index")
    dims = dict(ctx.dims(x) or {})
    axis = dim % max(len(ctx.shape(x)), 1)
    units = dims.pop(axis, None)
    table = _constant_index(ctx.state.gm, index)
    if units is not None and table is not None:
        dims[axis] = units[table]
    elif units is not None:
        ctx.pin(units, "index_select with a computed index")
    ctx.set(dims)


def _constant_index(gm, index) -> np.ndarray | None:
    if not isinstance(index, torch.fx.Node) or index.op != "get_attr":
        return None
    from passes.rules.registry import _get_tensor

    t = _get_tensor(gm, index.target)
    if t is None or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32) or t.is_meta:
        return None
    return t.detach().cpu().numpy().astype(np.int64)


@fixup("index_select")
def fix_index_select(fctx) -> None:
    """The index keeps the entries of kept outputs, renumbered to the kept inputs (a new
    buffer; the user's index table is untouched)."""
    node = fctx.node
    x, index = fctx.arg(0, "input"), fctx.arg(2, "index")
    axis = fctx.arg(1, "dim") % len(fctx.old_shape(x))
    kept_in, kept_out = fctx.kept(x, axis), fctx.kept(node, axis)
    if kept_in is None or kept_out is None or not isinstance(index, torch.fx.Node):
        return
    gm = node.graph.owning_module
    table = _constant_index(gm, index)
    if table is None:
        return
    position = np.full(fctx.old_shape(x)[axis], -1)
    position[kept_in] = np.arange(len(kept_in))
    new = position[table[kept_out]]
    if (new < 0).any():
        raise fctx.error("index_select reads a removed channel for a kept one")
    name = f"_fxprune_{index.target.replace('.', '_')}_{node.name}"
    gm.register_buffer(name, torch.as_tensor(new, dtype=torch.int64,
                                             device=gm.get_buffer(index.target).device))
    with node.graph.inserting_before(node):
        fresh = node.graph.get_attr(name)
    fctx.set_arg(2, "index", fresh)


@rule("repeat_interleave")
def repeat_interleave(ctx: RuleContext) -> None:
    """repeat_interleave(x, r, dim) with an int r: each unit repeats r times in place."""
    x, repeats, dim = ctx.arg(0, "input"), ctx.arg(1, "repeats"), ctx.arg(2, "dim")
    dims = dict(ctx.dims(x) or {})
    if not isinstance(repeats, int) or dim is None or not isinstance(ctx.shape(x), tuple):
        ctx.pin_info(dims, "repeat_interleave with tensor repeats or no dim")
        ctx.set({})
        return
    axis = dim % len(ctx.shape(x))
    if axis in dims:
        dims[axis] = np.repeat(dims[axis], repeats)
    ctx.set(dims)


@fixup("repeat_interleave")
def fix_repeat_interleave(fctx) -> None:
    """An ``output_size`` hint follows the kept count of the repeated dim."""
    size, dim = fctx.arg(3, "output_size"), fctx.arg(2, "dim")
    new = fctx.new_shape(fctx.node)
    if isinstance(size, int) and isinstance(dim, int) and new is not None:
        fctx.set_arg(3, "output_size", new[dim % len(new)])


@rule("pixel_shuffle", nn.PixelShuffle)
def pixel_shuffle(ctx: RuleContext) -> None:
    """out[c, h*r + i, w*r + j] = in[c*r*r + i*r + j, h, w]: output channel c is a block of
    r*r input channels (unioned), and removing it removes the block."""
    x = ctx.arg(0, "input")
    r = ctx.module.upscale_factor if ctx.node.op == "call_module" else ctx.arg(1, "upscale_factor")
    dims, axis = dict(ctx.dims(x) or {}), len(ctx.shape(x)) - 3
    _pin_other_than(ctx, dims, axis, "pixel shuffle moves it into space")
    if axis in dims:
        dims[axis] = ctx.store.union_along(dims[axis].reshape(-1, r * r), 0, ctx.why)
    ctx.set(dims)


@rule("pixel_unshuffle", nn.PixelUnshuffle)
def pixel_unshuffle(ctx: RuleContext) -> None:
    """out[c*r*r + i*r + j, h, w] = in[c, h*r + i, w*r + j]: each input channel becomes a
    block of r*r output channels that live and die with it."""
    x = ctx.arg(0, "input")
    r = (ctx.module.downscale_factor if ctx.node.op == "call_module"
         else ctx.arg(1, "downscale_factor"))
    dims, axis = dict(ctx.dims(x) or {}), len(ctx.shape(x)) - 3
    _pin_other_than(ctx, dims, axis, "pixel unshuffle moves it into channels")
    if axis in dims:
        dims[axis] = np.repeat(dims[axis], r * r)
    ctx.set(dims)


def _pin_other_than(ctx: RuleContext, dims: dict, axis: int, reason: str) -> None:
    for a in [a for a in dims if a > axis]:
        ctx.pin(dims.pop(a), reason)


@rule("flip")
def flip(ctx: RuleContext) -> None:
    """Reverses ``dims``: units reverse with their indices (a permutation)."""
    x, axes = ctx.arg(0, "input"), ctx.arg(1, "dims")
    rank = len(ctx.shape(x))
    dims = dict(ctx.dims(x) or {})
    for axis in ([axes] if isinstance(axes, int) else list(axes or ())):
        if axis % rank in dims:
            dims[axis % rank] = np.ascontiguousarray(dims[axis % rank][::-1])
    ctx.set(dims)


@rule("cumsum", "cumprod", "logcumsumexp")
def cumulative(ctx: RuleContext) -> None:
    """A scan along ``dim``: other dims carry their units; a scanned channel dim is pinned
    (out[c] reads in[0..c])."""
    x = ctx.arg(0, "input")
    dims = dict(ctx.dims(x) or {})
    ctx.pin(dims.pop(ctx.arg(1, "dim") % len(ctx.shape(x)), None), "scan along a channel dim")
    ctx.set(dims)


@rule("cat")
def cat(ctx: RuleContext) -> None:
    """Concatenation: units concatenate along the dim, other dims must agree."""
    tensors = ctx.arg(0, "tensors")
    axis = ctx.arg(1, "dim", 0) % len(ctx.out_shape)
    parts = [(ctx.shape(t), ctx.dims(t)) for t in tensors]
    ctx.set(D.concat(ctx, parts, axis, ctx.out_shape))


@rule("stack")
def stack(ctx: RuleContext) -> None:
    """Stack along a new dim: inputs couple elementwise."""
    tensors = ctx.arg(0, "tensors")
    axis = ctx.arg(1, "dim", 0) % len(ctx.out_shape)
    parts = []
    for t in tensors:
        shape = list(ctx.shape(t))
        shape.insert(axis, 1)
        parts.append((tuple(shape), {a + (a >= axis): u for a, u in (ctx.dims(t) or {}).items()}))
    ctx.set(D.broadcast_merge(ctx, parts, ctx.out_shape))


@rule("split", "split_with_sizes", "chunk", "unbind", "tensor_split", "unsafe_split",
      "unsafe_chunk")
def split(ctx: RuleContext) -> None:
    """Pieces along a dim: each piece takes its run of units; other dims are shared."""
    x = ctx.arg(0, "input")
    shape, pieces = ctx.shape(x), ctx.out_shape
    default_dim = 0
    axis = ctx.arg(1 if op_key(ctx.node) == "unbind" else 2, "dim", default_dim) % len(shape)
    dims = ctx.dims(x) or {}
    units = dims.get(axis)
    out, offset = [], 0
    for piece in pieces:
        d = {a: u for a, u in dims.items() if a != axis}
        if len(piece) < len(shape):  # unbind drops the dim
            d = {a - (a > axis): u for a, u in d.items()}
            ctx.pin(units, "unbind of a channel dim")
        elif units is not None:
            d[axis] = units[offset:offset + piece[axis]]
            offset += piece[axis]
        out.append(d)
    ctx.set(tuple(out))


# ----------------------------------------------------------------------------------
# Fixups: rewrite literal sizes after slicing
# ----------------------------------------------------------------------------------
def sizes_from_args(node: torch.fx.Node) -> tuple[list, bool]:
    """(sizes, packed): sizes of view/reshape/expand, and whether they came as one list."""
    args = list(node.args[1:])
    if "shape" in node.kwargs or "size" in node.kwargs:
        return list(node.kwargs.get("shape", node.kwargs.get("size"))), True
    if len(args) == 1 and isinstance(args[0], (list, tuple, torch.Size)):
        return list(args[0]), True
    return args, False


@fixup("view", "reshape", "expand", "broadcast_to", "_reshape_alias")
def fix_sizes(fctx) -> None:
    """Sizes of channel dims become their kept counts (``pruned_size``: a literal, or the
    traced product rescaled at run time when it merges the batch with channels, as in
    ``reshape(n * c, -1)``); -1 and symbolic batch/spatial sizes stay."""
    node = fctx.node
    new = fctx.new_shape(node)
    sizes, packed = sizes_from_args(node)
    if len(sizes) == 1 and isinstance(sizes[0], torch.fx.Node) and len(new) != 1:
        _fix_computed_sizes(fctx, sizes[0], new)
        return
    if len(sizes) != len(new):
        raise fctx.error("cannot match size arguments to output dims")
    old = fctx.old_shape(node)
    old = old if isinstance(old, tuple) and len(old) == len(new) else new
    for axis, n in enumerate(new):
        if sizes[axis] != -1 and (fctx.kept(node, axis) is not None
                                  or _reads_pruned_size(fctx, sizes[axis])):
            sizes[axis] = pruned_size(fctx, sizes[axis], old[axis], n)
    if "shape" in node.kwargs or "size" in node.kwargs:
        key = "shape" if "shape" in node.kwargs else "size"
        node.kwargs = {**node.kwargs, key: sizes}
    elif packed:
        node.args = (node.args[0], sizes) + tuple(node.args[2:])
    else:
        node.args = (node.args[0], *sizes)


def pruned_size(fctx, size: Any, old: int, new: int) -> Any:
    """The size argument of a pruned output dim: the literal kept count when the traced
    size is a constant, else ``size * new // old`` computed at run time when the traced
    size is a product of run-time sizes and constants (``n * c`` of a batch merged with
    channels: the batch stays symbolic); anything else is refused (a literal would only be
    right at the example's sizes)."""
    kind = _size_expression(fctx, size)
    if kind in ("constant", "pruned") or kind == "other" and not _reads_leading_dim(size):
        return new  # a width (``C // heads`` of an input's C): the same at every batch
    if old == new:  # an unpruned dim sized from a pruned read: as before this rule
        return size if kind == "product" else new
    if kind != "product" or old == 0:
        raise fctx.error(
            "a pruned dim's size is computed from run-time sizes in a way fxprune cannot "
            "rescale (only products of sizes and constants are); a literal would be right at "
            "the example's sizes only. Remedy: write that size as a product (n * c) or -1, "
            "or keep those channels (ignore=[...])")
    graph = fctx.node.graph
    with graph.inserting_before(fctx.node):
        scaled = graph.call_function(operator.mul, (size, new))
        return graph.call_function(operator.floordiv, (scaled, old))


_SYM_SIZE = (torch.ops.aten.sym_size.int,)


def _size_expression(fctx, value: Any) -> str:
    """``"constant"`` (no run-time size in it), ``"product"`` (int constants and run-time
    sizes of unpruned dims joined by ``*`` only) or ``"other"``. Reads of pruned dims
    were replaced by their original counts by ``_keep_original_size``; one left (its
    run-time value is the kept count) is a constant that cannot be rescaled."""
    if isinstance(value, (int, float, bool)):
        return "constant"
    if not isinstance(value, torch.fx.Node):
        return "other"
    read = size_read(value) or (tuple(value.args) if value.target in _SYM_SIZE else None)
    if read is not None:
        return "pruned" if _read_is_pruned(fctx, *read) else "product"
    kinds = {_size_expression(fctx, a) for a in value.all_input_nodes}
    if value.target is operator.mul and len(value.args) == 2 and not value.kwargs:
        kinds |= {_size_expression(fctx, a) for a in value.args}
        if "other" in kinds or {"pruned", "product"} <= kinds:
            return "other"
        return "product" if "product" in kinds else "constant"
    if value.op in ("placeholder", "get_attr") or not kinds <= {"constant", "pruned"}:
        return "other"
    return "constant"  # arithmetic on constants (``C // heads`` once C is the original)


def _reads_leading_dim(value: Any) -> bool:
    """``value`` is computed from some ``t.shape[0]`` (the batch, or a batch merged with
    heads): a literal of it would hold at the example's batch only."""
    return any(k == 0 for _, (_, k) in size_reads(
        value, read=lambda n: size_read(n) or (tuple(n.args) if n.target in _SYM_SIZE else None)))


def _read_is_pruned(fctx, t: Any, k: Any) -> bool:
    """``t.shape[k]`` shrinks with slicing."""
    old, new = fctx.old_shape(t), fctx.new_shape(t)
    return isinstance(old, tuple) and isinstance(new, tuple) and len(old) == len(new) \
        and isinstance(k, int) and -len(old) <= k < len(old) and old[k] != new[k]


def _reads_pruned_size(fctx, value: Any) -> bool:
    """``value`` is computed (int arithmetic) from ``t.shape[k]`` / ``t.size(k)`` of a dim
    that slicing shrinks: a size the original reshape derived from there must become a
    literal when this output dim is not pruned (``reshape(B, N, C)`` or ``C // heads``
    with C read off a pruned input)."""

    def is_tensor(n: torch.fx.Node) -> bool:  # a tensor: not size arithmetic
        shape = fctx.old_shape(n)
        return isinstance(shape, tuple) and _is_tensor_shape(shape) and shape != ()

    return any(_read_is_pruned(fctx, t, k)
               for _, (t, k) in size_reads(value, descend=lambda n: not is_tensor(n)))


def size_reads(value: Any, *, read: Callable[[torch.fx.Node], Any] | None = None,
               descend: Callable[[torch.fx.Node], bool] = lambda n: True) -> Iterator[tuple]:
    """``(node, (t, k))`` for every size read (``read``, default ``size_read``: ``t.shape[k]``
    / ``t.size(k)``) in the int arithmetic computing ``value``, each node once; the walk
    goes on into the inputs of a node that is not a read where ``descend(node)``."""
    read = read or size_read
    seen: set = set()
    stack = [value]
    while stack:
        n = stack.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        got = read(n)
        if got is not None:
            yield n, got
        elif descend(n):
            stack.extend(n.all_input_nodes)


def size_read(n: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """(t, k) when ``n`` is ``t.size(k)``, ``t.size()[k]`` or ``t.shape[k]``."""
    t = k = None
    if n.op == "call_method" and n.target == "size" and len(n.args) == 2:
        t, k = n.args
    elif n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node):
        src = n.args[0]
        if (src.op == "call_method" and src.target == "size" and len(src.args) == 1) or (
                src.target is getattr and src.args[1:] == ("shape",)):
            t, k = src.args[0], n.args[1]
    return (t, k) if isinstance(t, torch.fx.Node) and isinstance(k, int) else None


def _fix_computed_sizes(fctx, sizes: torch.fx.Node, new: tuple) -> None:
    """A shape computed as one value (``x.shape[:-1] + (-1,)``) gets its channel entries
    replaced at run time by ``fxprune.functional.with_sizes``."""
    from fxprune.core.functional import with_sizes

    node = fctx.node
    updates = {axis: n for axis, n in enumerate(new) if fctx.kept(node, axis) is not None}
    if not updates:
        return
    with node.graph.inserting_before(node):
        fixed = node.graph.call_function(with_sizes, (sizes, updates))
    node.replace_input_with(sizes, fixed)


@fixup(UNIFORM_FACTORIES)
def fix_factory_sizes(fctx) -> None:
    """Literal sizes of tracked dims become the kept counts."""
    node = fctx.node
    sizes, where = _factory_sizes(node)
    new = fctx.new_shape(node)
    if sizes is None or new is None or len(sizes) != len(new):
        return
    changed = [fctx.kept(node, axis) is not None and sizes[axis] != n
               for axis, n in enumerate(new)]
    if not any(changed):
        return
    sizes = [n if c else s for s, n, c in zip(sizes, new, changed)]
    if where == "size":
        node.kwargs = {**node.kwargs, "size": sizes}
    elif isinstance(where, int):
        node.args = node.args[:where] + (sizes,) + node.args[where + 1:]
    else:
        node.args = node.args[:where.start] + tuple(sizes)


@fixup("unflatten")
def fix_unflatten(fctx) -> None:
    """unflatten(dim, sizes): the sizes are output dims dim..dim+len(sizes)."""
    node = fctx.node
    old, new = fctx.old_shape(node), fctx.new_shape(node)
    if old == new:
        return
    x = fctx.arg(0, "input")
    dim = fctx.arg(1, "dim") % len(fctx.old_shape(x))
    sizes = list(fctx.arg(2, "sizes"))
    for k in range(len(sizes)):
        if old[dim + k] != new[dim + k] and sizes[k] != -1:
            sizes[k] = pruned_size(fctx, sizes[k], old[dim + k], new[dim + k])
    node.args = (x, dim, sizes)
    node.kwargs = {}


@fixup("split", "split_with_sizes", "chunk", "unsafe_split", "unsafe_chunk", "tensor_split")
def fix_split(fctx) -> None:
    """Pieces along a pruned dim become an explicit ``split`` with the kept counts."""
    node = fctx.node
    x = fctx.arg(0, "input")
    old_in, new_in = fctx.old_shape(x), fctx.new_shape(x)
    axis = fctx.arg(2, "dim", 0) % len(old_in)
    if old_in[axis] == new_in[axis]:
        return
    sizes = [p[axis] for p in fctx.new_shape(node)]
    if node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split
    node.args = (x, sizes, axis)
    node.kwargs = {}


@fixup("size")
def fix_size_read(fctx) -> None:
    """``t.size(k)`` of a pruned dim: its users see the original count."""
    _keep_original_size(fctx)


def _keep_original_size(fctx) -> bool:
    """A size read off a pruned dim keeps its original value for the arithmetic that uses
    it (an attention scale ``q.shape[-1] ** -0.5`` stays as trained, as in the masked
    model); reshape sizes are made literal by their own fixups."""
    node = fctx.node
    read = size_read(node)
    if read is None:
        return False
    t, k = read
    old, new = fctx.old_shape(t), fctx.new_shape(t)
    if not (isinstance(old, tuple) and isinstance(new, tuple) and len(old) == len(new)
            and -len(old) <= k < len(old) and old[k] != new[k]):
        return False
    for user in list(node.users):
        user.args = torch.fx.node.map_arg(user.args, lambda n: old[k] if n is node else n)
        user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda n: old[k] if n is node else n)
    return True


@fixup("getitem")
def fix_getitem(fctx) -> None:
    """Slice bounds on a pruned dim count kept indices before them; ``t.shape[k]`` of a
    pruned dim keeps its original count."""
    node = fctx.node
    if _keep_original_size(fctx):
        return
    value, index = node.args[0], node.args[1]
    shape = fctx.old_shape(value)
    if shape is None or not _is_tensor_shape(shape):
        return
    items = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    src, changed = 0, False
    for k, item in enumerate(items):
        if item is None:
            continue
        if item is Ellipsis:
            src += len(shape) - consumed
            continue
        if isinstance(item, slice) and all(isinstance(v, (int, type(None)))
                                           for v in (item.start, item.stop)):
            kept = fctx.kept(value, src)
            if kept is not None and (item.start is not None or item.stop is not None):
                start, stop, _ = item.indices(shape[src])
                items[k] = slice(int(np.count_nonzero(kept < start)),
                                 int(np.count_nonzero(kept < stop)), item.step)
                changed = True
        src += 1
    if changed:
        node.args = (value, tuple(items) if isinstance(index, tuple) else items[0])

