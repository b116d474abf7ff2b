"""Generic index maps over dims: broadcasting, reshape (flatten / head split / shuffle),
permutation, slicing and concatenation. Rules are thin wrappers around these."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from passes.rules.registry import Dims, RuleContext

Shape = tuple[int, ...]


def shift(dims: Dims | None, by: int) -> Dims:
    return {a + by: u for a, u in (dims or {}).items()}


def broadcast_merge(ctx: RuleContext, operands: Sequence[tuple[Shape, Dims | None]],
                    out_shape: Shape) -> Dims:
    """Elementwise coupling: dims that line up are unioned; a dim broadcast from size 1,
    or tracked in one operand but untracked in another of full size, is pinned."""
    rank = len(out_shape)
    aligned = [(tuple([1] * (rank - len(s))) + tuple(s), shift(d, rank - len(s)))
               for s, d in operands]
    out: Dims = {}
    for axis in range(rank):
        n = out_shape[axis]
        tracked, untracked_full = [], False
        for shape, dims in aligned:
            units = dims.get(axis)
            if shape[axis] != n:  # broadcast from size 1
                if units is not None:
                    ctx.pin(units, "channel dim broadcast from size 1")
                continue
            if units is None:
                untracked_full = True
            else:
                tracked.append(units)
        if not tracked:
            continue
        if untracked_full:
            for units in tracked:
                ctx.pin(units, "tracked dim meets an untracked tensor")
            continue
        for units in tracked[1:]:
            ctx.union(tracked[0], units)
        out[axis] = tracked[0]
    return out


def permute(dims: Dims | None, perm: Sequence[int]) -> Dims:
    """Output axis i takes input axis perm[i]."""
    inverse = {src: dst for dst, src in enumerate(perm)}
    return {inverse[a]: u for a, u in (dims or {}).items()}


def reshape_groups(a: Shape, b: Shape) -> list[tuple[list[int], list[int]]]:
    """Finest pairing of input dims with output dims that have equal products."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i); pa *= a[i]; i += 1
            elif j < len(b):
                gj.append(j); pb *= b[j]; j += 1
            else:
                break
        groups.append((gi, gj))
    if not groups:
        groups.append(([], []))
    groups[-1][0].extend(range(i, len(a)))
    groups[-1][1].extend(range(j, len(b)))
    return groups


def reshape(ctx: RuleContext, dims: Dims | None, in_shape: Shape, out_shape: Shape) -> Dims:
    """Carry tracked dims through a reshape (view, flatten, unflatten, squeeze...).

    A tracked dim merged with untracked ones repeats its units (flatten: channel c covers
    features c*HW...). A tracked dim split into several dims keeps one varying dim: where
    the units vary along more than one output dim (head split, channel shuffle), units
    are unioned along all but one (``split_policy``: "inner" keeps the last, e.g.
    head_dim; "outer" keeps the one before it, e.g. heads), so any removal stays a
    rectangle and the reshape stays valid.
    """
    if not dims:
        return {}
    out: Dims = {}
    for gi, gj in reshape_groups(tuple(in_shape), tuple(out_shape)):
        inside = [a for a in gi if a in dims]
        if not inside:
            continue
        if len(inside) > 1:
            for a in inside:
                ctx.pin(dims[a], "reshape merges two channel dims")
            continue
        axis = inside[0]
        sizes = [in_shape[a] for a in gi]
        view = [1] * len(gi)
        view[gi.index(axis)] = in_shape[axis]
        full = np.broadcast_to(dims[axis].reshape(view), sizes)
        arr = full.reshape([out_shape[b] for b in gj]) if gj else full.reshape(-1)
        if not gj:
            ctx.pin(dims[axis], "reshape drops a channel dim")
            continue
        varying = [k for k in range(arr.ndim) if not _constant_along(arr, k)]
        if not varying:
            sized = [k for k in range(arr.ndim) if arr.shape[k] > 1]
            keep = sized[0] if sized else 0
            out[gj[keep]] = np.ascontiguousarray(arr.reshape(arr.shape[keep], -1)[:, 0]) \
                if arr.shape[keep] else arr.reshape(0)
            continue
        hint = consumer_channel_axis(ctx, len(out_shape))
        if len(varying) == 1:
            keep = varying[0]
        elif hint in gj and gj.index(hint) in varying:  # (B, C*H*W) -> (B, C, H, W) -> conv
            keep = gj.index(hint)
        else:
            keep = varying[-1] if ctx.state.split_policy == "inner" else varying[-2]
        out[gj[keep]] = ctx.store.union_along(arr, keep, ctx.why)
    return out


def consumer_channel_axis(ctx: RuleContext, rank: int) -> int | None:
    """The channel axis that a channel-first consumer (conv, transposed conv, batch or
    instance norm) reads from this node's output, following a chain of single-use
    pass-through ops; None when there is no such sole consumer. A feature vector viewed
    as (C, H, W) before a conv (DCGAN / VAE decoders) splits into blocks of H*W rows
    per channel, which the reshape rule keeps instead of the innermost dim."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.conv import _ConvNd
    from torch.nn.modules.instancenorm import _InstanceNorm

    from passes.rules.registry import lookup_rule, op_key

    node = ctx.node
    for _ in range(16):
        if len(node.users) != 1:
            return None
        (user,) = node.users
        if user.op == "call_module":
            module = ctx.state.gm.get_submodule(user.target)
            if isinstance(module, _ConvNd):
                return rank - (module.weight.dim() - 2) - 1
            if isinstance(module, (_BatchNorm, _InstanceNorm)):
                return 1
        elif op_key(user) in ("conv", "conv_transpose") and len(user.args) > 1:
            weight = ctx.shape(user.args[1])
            return rank - (len(weight) - 2) - 1 if isinstance(weight, tuple) else None
        rule = lookup_rule(user, ctx.state.gm)
        if getattr(rule, "__name__", None) != "unary" or not user.args or \
                user.args[0] is not node:
            return None
        node = user
    return None


def _constant_along(arr: np.ndarray, axis: int) -> bool:
    if arr.shape[axis] <= 1:
        return True
    first = np.take(arr, [0], axis=axis)
    return bool((arr == first).all())


def select(ctx: RuleContext, dims: Dims | None, axis: int, index: slice | int,
           size: int) -> tuple[Dims, bool]:
    """Take ``index`` along ``axis``; returns (dims, axis_kept)."""
    dims = dict(dims or {})
    units = dims.pop(axis, None)
    if isinstance(index, int):
        if units is not None:
            ctx.pin(units, "integer index into a channel dim")
        return {a - 1 if a > axis else a: u for a, u in dims.items()}, False
    if units is not None:
        start, stop, step = index.indices(size)
        if step == 1:
            dims[axis] = units[start:stop]
        else:
            ctx.pin(units, "strided slice of a channel dim")
    return dims, True


def concat(ctx: RuleContext, parts: Sequence[tuple[Shape, Dims | None]], axis: int,
           out_shape: Shape) -> Dims:
    """cat: units concatenate along ``axis``; the other dims couple elementwise."""
    along = [d.get(axis) if d else None for _, d in parts]
    others = [(s, {a: u for a, u in (d or {}).items() if a != axis}) for s, d in parts]
    out = broadcast_merge(ctx, [(tuple(s[:axis]) + (1,) + tuple(s[axis + 1:]), d)
                                for s, d in others],
                          tuple(out_shape[:axis]) + (1,) + tuple(out_shape[axis + 1:]))
    if any(u is not None for u in along) and not all(u is not None for u in along):
        # CoordConv's cat([x, coords]): the untracked piece gets units of its own, pinned,
        # so it keeps its columns in the consumer while the tracked pieces are pruned
        along = [u if u is not None else _kept_whole(ctx, s[axis]) for u, (s, _) in
                 zip(along, parts)]
    if all(u is not None for u in along):
        out[axis] = np.concatenate(along)
    return out


def _kept_whole(ctx: RuleContext, n: int) -> np.ndarray:
    units = ctx.fresh(n)
    ctx.pin(units, "untracked piece of a cat (kept whole)")
    return units
