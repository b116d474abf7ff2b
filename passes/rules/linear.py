"""Linear maps and contractions: Linear, matmul/bmm, einsum, Embedding."""
from __future__ import annotations

import numpy as np
import torch.nn as nn

from passes.rules.dims import broadcast_merge
from passes.rules.registry import (Contractions, Dims, MacContext, RuleContext, Terms,
                                   contractions, macs, module_fixup, present, rule)


def contract(ctx: RuleContext, a: np.ndarray | None, b: np.ndarray | None) -> None:
    """Both sides of a contracted dim must agree (tracked with untracked: pinned)."""
    if a is not None and b is not None and len(a) == len(b):
        ctx.union(a, b)
    else:
        ctx.pin(a, "contracted with an untracked dim")
        ctx.pin(b, "contracted with an untracked dim")


def apply_linear(ctx: RuleContext, x, w_out, w_in_fn, bias) -> None:
    dims = dict(ctx.dims(x) or {})
    last = len(ctx.shape(x)) - 1
    ctx.link(dims.pop(last, None), w_in_fn(), "linear input features are untracked")
    if bias is not None:
        ctx.union(w_out, bias)
    dims[last] = w_out
    ctx.set(dims)


@rule(nn.Linear, stop=True)
def linear_module(ctx: RuleContext) -> None:
    """out[..., o] from weight row o; weight column i consumes in[..., i]."""
    apply_linear(ctx, ctx.arg(0), ctx.module_tensor("weight", 0, "out"),
                 lambda: ctx.module_tensor("weight", 1, "in"),
                 ctx.module_tensor("bias", 0, "dep"))


@rule("linear", stop=True)
def linear_functional(ctx: RuleContext) -> None:
    """F.linear / aten.linear: a stop op when the weight is a get_attr, else a contraction."""
    x, w, b = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    fqn = ctx.fqn_of(w)
    if fqn is None:
        wd = ctx.dims(w) or {}
        dims = dict(ctx.dims(x) or {})
        contract(ctx, dims.pop(len(ctx.shape(x)) - 1, None), wd.get(1))
        out = wd.get(0)
        if b is not None:
            out = broadcast_merge(ctx, [((len(out) if out is not None else ctx.shape(w)[0],),
                                         {0: out} if out is not None else {}),
                                        (ctx.shape(b), ctx.dims(b))], (ctx.shape(w)[0],)).get(0)
        if out is not None:
            dims[len(ctx.out_shape) - 1] = out
        ctx.set(dims)
        return
    bias = None
    w_out = ctx.tensor_units(fqn, 0, "out")
    if b is not None:
        # a computed bias (EVA's cat(q_bias, k_bias, v_bias)) follows the rows it is added
        # to when its dim is tracked; an untracked one keeps the rows whole (fail closed)
        bias = ctx.tensor_units(ctx.fqn_of(b), 0, "dep") if ctx.fqn_of(b) else \
            (ctx.dims(b) or {}).get(0)
        if bias is None or len(bias) != len(w_out):
            ctx.pin_info(ctx.dims(b), "linear bias is computed")
            ctx.pin(w_out, "linear bias is computed and untracked")
            bias = None
    apply_linear(ctx, x, w_out, lambda: ctx.tensor_units(fqn, 1, "in"), bias)


@rule("matmul", "mm", "bmm")
def matmul(ctx: RuleContext) -> None:
    """(..., n, k) @ (..., k, m): k contracted, batch dims broadcast."""
    a, b = ctx.arg(0), ctx.arg(1)
    sa, sb = ctx.shape(a), ctx.shape(b)
    da, db = dict(ctx.dims(a) or {}), dict(ctx.dims(b) or {})
    if len(sb) == 1:  # matrix @ vector: the last dim of a is consumed
        contract(ctx, da.pop(len(sa) - 1, None), db.pop(0, None))
        ctx.set(da)
        return
    if len(sa) == 1:  # vector @ matrix: dim -2 of b is consumed
        k = len(sb) - 2
        contract(ctx, da.pop(0, None), db.pop(k, None))
        ctx.set({ax - (ax > k): u for ax, u in db.items()})
        return
    contract(ctx, da.pop(len(sa) - 1, None), db.pop(len(sb) - 2, None))
    rank = len(ctx.out_shape)
    out: Dims = {}
    if len(sa) - 2 in da:
        out[rank - 2] = da.pop(len(sa) - 2)
    if len(sb) - 1 in db:
        out[rank - 1] = db.pop(len(sb) - 1)
    out.update(broadcast_merge(ctx, [(tuple(sa[:-2]), da), (tuple(sb[:-2]), db)],
                               tuple(ctx.out_shape[:-2])))
    ctx.set(out)


@rule("addmm", stop=True)
def addmm(ctx: RuleContext) -> None:
    """bias + x @ W with W stored (in, out) (HF Conv1D): W's rows consume x's columns, its
    columns start out[:, o]; the bias follows them."""
    bias, x, w = ctx.arg(0, "input"), ctx.arg(1, "mat1"), ctx.arg(2, "mat2")
    fqn = ctx.fqn_of(w)
    wd = ctx.dims(w) or {}
    dims = dict(ctx.dims(x) or {})
    contract(ctx, dims.pop(1, None), ctx.tensor_units(fqn, 0, "in") if fqn else wd.get(0))
    out = ctx.tensor_units(fqn, 1, "out") if fqn else wd.get(1)
    if out is not None:
        dims[1] = out
    ctx.set(broadcast_merge(ctx, [(ctx.out_shape, dims), (ctx.shape(bias), ctx.dims(bias))],
                            ctx.out_shape))


@rule("einsum")
def einsum(ctx: RuleContext) -> None:
    """Each letter is one index space: equal letters couple; absent from output: consumed."""
    equation = ctx.arg(0)
    operands = list(ctx.node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    shapes = [ctx.shape(o) for o in operands]
    equation = expand_ellipsis(equation.replace(" ", ""), [len(s) for s in shapes])
    lhs, _, rhs = equation.partition("->")
    terms = lhs.split(",")
    if "..." in equation or not rhs or len(terms) != len(operands):
        for o in operands:
            ctx.pin_info(ctx.dims(o), "einsum form not supported")
        ctx.set({})
        return
    by_letter: dict[str, list[tuple[int, np.ndarray | None]]] = {}
    for term, op, shape in zip(terms, operands, shapes):
        dims = ctx.dims(op) or {}
        for axis, letter in enumerate(term):
            by_letter.setdefault(letter, []).append((shape[axis], dims.get(axis)))
    out: Dims = {}
    for letter, uses in by_letter.items():
        n = max(size for size, _ in uses)
        full = [u for size, u in uses if size == n]
        for size, u in uses:
            if size != n:
                ctx.pin(u, "einsum broadcast from size 1")
        if any(u is None for u in full):
            for u in full:
                ctx.pin(u, "einsum index tracked in one operand only")
            continue
        for u in full[1:]:
            ctx.union(full[0], u)
        if letter in rhs:
            out[rhs.index(letter)] = full[0]
    ctx.set(out)


@contractions("linear")
def linear_contractions(ctx: MacContext) -> Contractions:
    """x[..., i] with weight[:, i] (a computed weight; a get_attr one owns its columns)."""
    return [((ctx.arg(0, "input"), -1), (ctx.arg(1, "weight"), 1))]


@contractions("matmul", "mm", "bmm")
def matmul_contractions(ctx: MacContext) -> Contractions:
    """a[..., k] with b[..., k, :] (b[k] for a vector; a[k] for a vector a)."""
    a, b = ctx.arg(0), ctx.arg(1)
    return [((a, -1), (b, 0 if len(ctx.shape(b)) == 1 else -2))]


@contractions("addmm")
def addmm_contractions(ctx: MacContext) -> Contractions:
    """mat1[:, k] with mat2[k, :]."""
    return [((ctx.arg(1, "mat1"), 1), (ctx.arg(2, "mat2"), 0))]


@contractions("einsum")
def einsum_contractions(ctx: MacContext) -> Contractions:
    """Every letter absent from the output: the operand axes that carry it."""
    operands = list(ctx.node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    equation = expand_ellipsis(ctx.arg(0).replace(" ", ""),
                               [len(ctx.shape(o) or ()) for o in operands])
    lhs, _, rhs = equation.partition("->")
    by_letter: dict[str, list] = {}
    for term, op in zip(lhs.split(","), operands):
        for axis, letter in enumerate(term):
            by_letter.setdefault(letter, []).append((op, axis))
    return [tuple(uses) for letter, uses in by_letter.items() if letter not in rhs]


def expand_ellipsis(equation: str, ranks: list[int]) -> str:
    """``"...ij,...jk->...ik"`` with explicit letters for the broadcast dims (numpy
    rules: ellipsis dims align from the right). Unchanged when there is no ``...`` or no
    explicit output (implicit mode is left to the caller, which pins it)."""
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if "..." not in equation or not arrow or len(terms) != len(ranks):
        return equation
    used = set(equation) - set(".,->")
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
    widths = [rank - (len(t) - 3) if "..." in t else 0 for t, rank in zip(terms, ranks)]
    width = max(widths, default=0)
    if width > len(free) or min(widths, default=0) < 0:
        return equation
    letters = "".join(free[:width])
    terms = [t.replace("...", letters[width - w:]) for t, w in zip(terms, widths)]
    return ",".join(terms) + "->" + rhs.replace("...", letters)


@rule(nn.Embedding, stop=True)
def embedding_module(ctx: RuleContext) -> None:
    """out[..., d] is weight column d; the vocabulary dim is never pruned."""
    ctx.set({len(ctx.out_shape) - 1: ctx.module_tensor("weight", 1, "out")})


@rule("embedding", stop=True)
def embedding_functional(ctx: RuleContext) -> None:
    """F.embedding(indices, weight) with a get_attr weight."""
    w = ctx.arg(1, "weight")
    idx = ctx.named("indices", ctx.arg(0, "input"))  # aten.embedding(weight, indices)
    if ctx.fqn_of(w) is None and ctx.fqn_of(idx) is not None:  # unnormalised aten form
        idx, w = w, idx
    ctx.pin_info(ctx.dims(idx), "embedding indices")
    wd = ctx.dims(w) or {}
    ctx.pin(wd.get(0), "vocabulary dim")
    fqn = ctx.fqn_of(w)
    out = ctx.tensor_units(fqn, 1, "out") if fqn and 1 in wd else wd.get(1)
    ctx.set({len(ctx.out_shape) - 1: out} if out is not None else {})


@module_fixup(nn.Linear)
def fix_linear(m: nn.Module) -> None:
    m.out_features, m.in_features = m.weight.shape


@module_fixup(nn.Embedding)
def fix_embedding(m: nn.Module) -> None:
    m.embedding_dim = m.weight.shape[1]


# -- MAC scaling (cost model) -------------------------------------------------------
@macs(nn.Linear, "linear")
def linear_macs(ctx: MacContext) -> Terms:
    """MACs ~ every output axis x the consumed input features."""
    return [(1.0, ctx.out_axes() + present(ctx.axis(ctx.arg(0, "input"), -1)))]


@macs("addmm")
def addmm_macs(ctx: MacContext) -> Terms:
    """bias + x @ W: MACs ~ every output axis x the contracted columns of x."""
    return [(1.0, ctx.out_axes() + present(ctx.axis(ctx.arg(1, "mat1"), -1)))]


@macs("matmul", "mm", "bmm")
def matmul_macs(ctx: MacContext) -> Terms:
    """MACs ~ every output axis x the contracted dim."""
    a, b = ctx.arg(0), ctx.arg(1)
    k = ctx.axis(a, -1)
    if k is None and ctx.shape(b) is not None:
        k = ctx.axis(b, -2 if len(ctx.shape(b)) > 1 else 0)
    return [(1.0, ctx.out_axes() + present(k))]


@macs("einsum")
def einsum_macs(ctx: MacContext) -> Terms:
    """MACs ~ every output axis x every contracted letter (two-operand products)."""
    equation = ctx.arg(0)
    operands = list(ctx.node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    lhs, _, rhs = str(equation).replace(" ", "").partition("->")
    contracted: dict[str, np.ndarray] = {}
    for term, op in zip(lhs.split(","), operands):
        for axis, letter in enumerate(term):
            labels = ctx.axis(op, axis)
            if letter not in rhs and letter not in contracted and labels is not None:
                contracted[letter] = labels
    return [(1.0, ctx.out_axes() + list(contracted.values()))]


@macs(nn.Embedding, "embedding")
def embedding_macs(ctx: MacContext) -> Terms:
    """A table lookup: no MACs (FlopCounterMode counts none); any count follows the width."""
    return [(1.0, ctx.out_axes())]
