"""Fold eval-mode BatchNorm into the conv / linear that feeds it (a rewrite).

For ``y = BN(conv(x))`` with running statistics ``mean``, ``var``, affine ``gamma``,
``beta`` and ``eps``, ``s = gamma / sqrt(var + eps)`` gives one conv with
``W'[o] = W[o] * s[o]`` and ``b'[o] = (b[o] - mean[o]) * s[o] + beta[o]`` (Ioffe &
Szegedy 2015, inference form; the standard "conv-BN fusion" of
``torch.fx.experimental.optimization.fuse``). The new weights are computed in float64
and cast back to the parameter dtype. Grouped and depthwise convs fold the same way
(the scale is per output channel); a conv without bias gets one.

Before / after::

    conv1 = self.conv1(x)           conv1 = self.conv1(x)    # folded weights, bias
    bn1 = self.bn1(conv1)           relu = self.relu(conv1)
    relu = self.relu(bn1)

Requires: a GraphModule. Ensures: a new GraphModule (no tensor shared with the source,
``graph.lint()`` passes) in which no eval-mode BatchNorm directly follows a foldable
conv/linear, its folded pairs recorded as ``gm.meta["fxprune"]["bn_folds"]``;
``check_fold`` proves ``folded(x) == gm(x)`` in float64.
Not folded (left as they are, never guessed): training-mode BN, BN without running
stats, a conv whose output has other users, a module called more than once,
transposed convs, a ``Linear`` whose output is not 2-D (BatchNorm1d would normalise
another dim).
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_leaves

from fxprune.core.errors import RewriteError, VerificationError
from fxprune.core.graph_meta import get_meta, set_meta
from fxprune.core.pipeline import checked_pass, ensure_new_module

__all__ = ["fold_bn", "find_bn_folds", "check_fold"]

_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
_BNS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def _module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _foldable_bn(bn: torch.nn.Module) -> bool:
    return (isinstance(bn, _BNS) and not bn.training and bn.running_mean is not None
            and bn.running_var is not None)


def _linear_2d(node: torch.fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and len(meta.shape) == 2


def find_bn_folds(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """(conv node name, BN node name) pairs that ``fold_bn`` folds, in graph order."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    pairs = []
    for node in gm.graph.nodes:
        bn = _module(gm, node)
        if bn is None or not _foldable_bn(bn) or not node.args:
            continue
        src = node.args[0]
        conv = _module(gm, src) if isinstance(src, torch.fx.Node) else None
        if (conv is None or not isinstance(conv, _CONVS) or len(src.users) != 1
                or calls[src.target] != 1 or calls[node.target] != 1):
            continue
        out = conv.out_channels if not isinstance(conv, torch.nn.Linear) else conv.out_features
        if out != bn.num_features or (isinstance(conv, torch.nn.Linear) and not _linear_2d(src)):
            continue
        pairs.append((src.name, node.name))
    return pairs


def folded_parameters(conv: torch.nn.Module, bn: torch.nn.Module
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``bn(conv(x))`` as one layer; float64 arithmetic, the conv's dtype.

    Shapes: weight as ``conv.weight`` (``out × in/groups × k...``), bias ``(out,)``."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(
        w.shape[0], dtype=torch.float64, device=w.device)
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    weight = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    bias = (b - mean) * scale + beta
    dtype = conv.weight.dtype
    return weight.to(dtype), bias.to(dtype)


def _requires(gm: Any, *args: Any, **kwargs: Any) -> None:
    if not isinstance(gm, torch.fx.GraphModule):
        raise RewriteError(f"fold_bn needs a torch.fx.GraphModule, got {type(gm).__name__}")


def _ensures(result: torch.fx.GraphModule, gm: torch.fx.GraphModule, *args: Any,
             **kwargs: Any) -> None:
    ensure_new_module(result, gm)
    left = find_bn_folds(result)
    if left:
        raise AssertionError(f"BatchNorm left unfolded after foldable convs: {left}")


@checked_pass(requires=_requires, ensures=_ensures, error_type=RewriteError)
def fold_bn(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with every foldable eval-mode BatchNorm folded into its producer.

    Raises ``RewriteError`` (through its checks) when ``gm`` is not a GraphModule."""
    out = copy.deepcopy(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    folds = find_bn_folds(out)
    for conv_name, bn_name in folds:
        conv_node, bn_node = nodes[conv_name], nodes[bn_name]
        conv, bn = out.get_submodule(conv_node.target), out.get_submodule(bn_node.target)
        weight, bias = folded_parameters(conv, bn)
        new = copy.deepcopy(conv)
        new.weight = torch.nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
        new.bias = torch.nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        _set_submodule(out, conv_node.target, new)
        bn_node.replace_all_uses_with(conv_node)
        out.graph.erase_node(bn_node)
    out.delete_all_unused_submodules()
    out.graph.lint()
    out.recompile()
    if folds:  # its convs no longer compute what the unfolded graph's nodes of that name do
        set_meta(out, "bn_folds", [*(get_meta(gm, "bn_folds") or []), *folds])
        out.meta["fxprune"].pop("state_digest", None)  # a compile's digest: stale now
    return out


def _set_submodule(gm: torch.nn.Module, target: str, module: torch.nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def compare_outputs(ya: Any, yb: Any, what: str, *, rtol: float, atol: float) -> float:
    """The max abs difference of two models' outputs (pytrees of tensors; other leaves
    skipped); ``VerificationError`` ``what.format(i=...)`` + the figures where one
    output is not ``allclose``."""
    worst = 0.0
    for i, (u, v) in enumerate(zip(tree_leaves(ya), tree_leaves(yb), strict=True)):
        if not torch.is_tensor(u):
            continue
        diff = float((u - v).abs().max()) if u.numel() else 0.0
        if not torch.allclose(u, v, rtol=rtol, atol=atol):
            raise VerificationError(f"{what.format(i=i)} in float64 by {diff:.3g} "
                                    f"(rtol={rtol}, atol={atol}); report this model")
        worst = max(worst, diff)
    return worst


def check_fold(gm: torch.fx.GraphModule, folded: torch.nn.Module, inputs: tuple, *,
               rtol: float = 1e-9, atol: float = 1e-9) -> float:
    """Prove the fold exact: the max abs output difference, in float64.

    Two checks (neither model is modified): (1) ``fold_bn`` applied to a float64 copy of
    ``gm`` computes ``gm`` in float64 on ``inputs`` (the algebra; ``rtol``/``atol``);
    (2) every parameter and buffer of ``folded`` is that float64 fold rounded to
    ``folded``'s dtype, bit for bit (so ``folded`` differs from ``gm`` only by the one
    rounding of its stored weights). Raises ``VerificationError`` naming the output or
    the parameter and the difference."""
    ref = copy.deepcopy(gm).double().eval()
    ref_folded = fold_bn(ref)
    xs = tuple(x.double() if torch.is_tensor(x) and x.is_floating_point() else x
               for x in inputs)
    with torch.no_grad():
        ya, yb = ref(*xs), ref_folded(*xs)
    worst = compare_outputs(ya, yb, "fold_bn: output {i} of the folded model differs from "
                            "the unfolded one", rtol=rtol, atol=atol)
    mine, exact = folded.state_dict(), ref_folded.state_dict()
    if mine.keys() != exact.keys():
        raise VerificationError(f"fold_bn: the folded model's tensors {sorted(mine)[:4]}... "
                                f"are not those of the float64 fold {sorted(exact)[:4]}...")
    for name, t in mine.items():
        if not torch.equal(t, exact[name].to(t.dtype)):
            diff = float((t.double() - exact[name]).abs().max())
            raise VerificationError(f"fold_bn: '{name}' differs from the float64 fold "
                                    f"rounded to {t.dtype} by {diff:.3g}")
    return worst
