"""Learnable soft masks (ViT-Slim, Chavan et al. CVPR 2022): where each mask folds into weights.

The soft-masked student computes ``x * (hard * m)[labels]`` on every consumption edge
of ``passes.gates`` (and ``p * (hard * m)[labels]`` on the parameter slices of groups
gated on their source rows). At ``finish()`` the kept units' ``m`` must live in the
weights, so that the compiled model computes the student exactly. A gate folds exactly
when the gated tensor enters an op that is linear in it:

- **consumer columns**: the edge ends in ``nn.Linear`` / ``nn.ConvNd`` (``groups=1``) or
  ``F.linear`` / ``F.conv*`` / ATen ``linear`` / ``conv*d`` / ``convolution`` whose input
  columns are the group's ``"in"`` members: ``W[:, c] *= m[c]`` (``conv(x * m, W) ==
  conv(x, W * m)``, zero padding included);
- **producer rows**: otherwise (e.g. ``q`` in ``q @ k^T``) the gated tensor must be a
  chain of single-user reshapes / permutes / scalar multiplies of such an op's output:
  its weight rows and bias are scaled instead.

Anything else (a nonlinearity or a norm between the producer and the gate) is refused at
construction with ``SoftMaskFoldError``: no training run is spent on a student that cannot
be compiled exactly. :func:`find_soft_folds` is pure; it returns the parameter scalings.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.core.errors import SoftMaskFoldError, describe_node
from fxprune.core.groups import GroupAnalysis

__all__ = ["SoftFold", "find_soft_folds"]

_aten = torch.ops.aten
_LINEAR_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                   nn.ConvTranspose2d, nn.ConvTranspose3d)
# function -> positional index of ``groups`` (None: no groups argument)
_LINEAR_FUNCTIONS: dict[Any, int | None] = {
    F.linear: None, F.conv1d: 6, F.conv2d: 6, F.conv3d: 6,
    _aten.linear.default: None, _aten.conv1d.default: 6, _aten.conv2d.default: 6,
    _aten.conv3d.default: 6, _aten.convolution.default: 8,
}
_SHAPE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten",
                  "unflatten"}
_SHAPE_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten,
                    torch.unflatten, _aten.view.default, _aten._unsafe_view.default,
                    _aten.reshape.default, _aten.transpose.int, _aten.permute.default,
                    _aten.t.default, _aten.clone.default, _aten.contiguous.default,
                    _aten.alias.default}
_SCALAR_FUNCTIONS = {operator.mul, operator.truediv, torch.mul, torch.div,
                     _aten.mul.Tensor, _aten.mul.Scalar, _aten.div.Tensor, _aten.div.Scalar}


@dataclass(frozen=True)
class SoftFold:
    """Scale parameter ``fqn`` along ``dim`` by ``m[labels]`` (``labels < 0``: untouched)."""

    fqn: str
    dim: int
    labels: np.ndarray
    how: str  # "columns", "rows" or "source"


def find_soft_folds(analysis: GroupAnalysis, sites: Any, param_gates: Any
                    ) -> tuple[SoftFold, ...]:
    """The parameter scalings that put every gate's soft mask into the weights.

    Requires: ``analysis`` and the ``sites`` / ``param_gates`` of ``insert_gates`` on it.
    Ensures: applying every returned fold to a copy of ``analysis.gm`` with ``m`` computes
    what the soft-gated graph computes; each (parameter, dim, group) is scaled once.
    Raises ``SoftMaskFoldError`` naming the node and the remedy where a fold is not exact.
    """
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    modules = dict(analysis.gm.named_modules())
    folds: list[SoftFold] = [SoftFold(f, d, lab, "source") for f, d, lab in param_gates]
    for site in sites:
        v, u = nodes[site.consumer], nodes[site.producer]
        columns = _column_members(analysis, v, modules)
        for gid in site.groups:
            owned = [m for m in columns if gid in _groups_of(analysis, m.fqn, m.dim)]
            if owned:
                folds += [SoftFold(m.fqn, m.dim, _labels(analysis, m.fqn, m.dim, gid),
                                   "columns") for m in owned]
            else:
                folds += _row_folds(analysis, u, v, gid, modules)
    _check_once(analysis, folds)
    return tuple(folds)


def _column_members(analysis: GroupAnalysis, v: torch.fx.Node, modules: dict) -> list:
    """The ``"in"`` members of ``v`` when ``v`` is linear in its data input, else []."""
    if not _is_linear_op(v, modules):
        return []
    fqns = _param_fqns(v)
    return [m for g in analysis.groups for m in g.members if m.role == "in" and m.fqn in fqns]


def _is_linear_op(node: torch.fx.Node, modules: dict) -> bool:
    """True for a conv/linear (``groups=1``) node; its first argument is the data input."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        return isinstance(mod, _LINEAR_MODULES) and getattr(mod, "groups", 1) == 1
    if node.op != "call_function" or node.target not in _LINEAR_FUNCTIONS:
        return False
    index = _LINEAR_FUNCTIONS[node.target]
    groups = node.kwargs.get("groups", node.args[index] if index is not None
                             and len(node.args) > index else 1)
    return groups == 1


def _param_fqns(node: torch.fx.Node) -> set[str]:
    if node.op == "call_module":
        return {f"{node.target}.weight", f"{node.target}.bias"}
    return {a.target for a in node.all_input_nodes if a.op == "get_attr"}


def _row_folds(analysis: GroupAnalysis, u: torch.fx.Node, v: torch.fx.Node, gid: int,
               modules: dict) -> list[SoftFold]:
    """Fold into the rows of the linear op that produces ``u`` through a linear chain."""
    node = u
    while not _is_linear_op(node, modules):
        data = [a for a in node.all_input_nodes  # tensors, not sizes read off .shape
                if a.op != "get_attr" and isinstance(analysis.node_labels.get(a.name), dict)]
        if len(node.users) != 1 or len(data) != 1 or not _is_channel_linear(node):
            _refuse(analysis, u, v, gid, node)
        node = data[0]
    if len(node.users) != 1:
        _refuse(analysis, u, v, gid, node)
    fqns = _param_fqns(node)
    rows = [m for m in analysis.group(gid).members
            if m.role in ("out", "dep") and m.fqn in fqns]
    if not rows:
        _refuse(analysis, u, v, gid, node)
    return [SoftFold(m.fqn, m.dim, _labels(analysis, m.fqn, m.dim, gid), "rows") for m in rows]


def _is_channel_linear(node: torch.fx.Node) -> bool:
    """A reshape/permute, or a multiply/divide by a Python number: linear per channel."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op != "call_function":
        return False
    if node.target in _SHAPE_FUNCTIONS:
        return True
    return node.target in _SCALAR_FUNCTIONS and len(node.args) == 2 and \
        isinstance(node.args[1], (int, float)) and isinstance(node.args[0], torch.fx.Node)


def _refuse(analysis: GroupAnalysis, u: torch.fx.Node, v: torch.fx.Node, gid: int,
            at: torch.fx.Node) -> None:
    name = analysis.group(gid).name
    raise SoftMaskFoldError(
        f"selection='soft': the soft mask of group {name!r} gates the edge into "
        f"{describe_node(v)}, which is not a linear/conv input, and cannot be folded into "
        f"the rows of its producer: the path back from '{u.name}' meets {describe_node(at)} "
        "(not a single-user reshape, permute or scalar multiply of a linear/conv output), "
        "so folding the mask into weights would not be exact. Remedy: selection='slimming' "
        "or 'scored' for this model, or limit pruning with scope/ignored groups")


def _groups_of(analysis: GroupAnalysis, fqn: str, dim: int) -> set[int]:
    labels = analysis.tensor_labels[(fqn, dim)]
    return {int(g) for g in np.unique(analysis.group_of[labels[labels >= 0]])}


def _labels(analysis: GroupAnalysis, fqn: str, dim: int, gid: int) -> np.ndarray:
    """The unit labels of ``(fqn, dim)`` that belong to group ``gid`` (others: -1)."""
    labels = analysis.tensor_labels[(fqn, dim)]
    out = np.full(len(labels), -1, dtype=np.int64)
    inside = labels >= 0
    mine = inside.copy()
    mine[inside] = analysis.group_of[labels[inside]] == gid
    out[mine] = labels[mine]
    return out


def _check_once(analysis: GroupAnalysis, folds: list[SoftFold]) -> None:
    """Two folds on one (parameter, dim, unit) would apply a mask twice: refuse."""
    seen: dict[tuple[str, int], np.ndarray] = {}
    for f in folds:
        hit = seen.setdefault((f.fqn, f.dim), np.zeros(len(f.labels), dtype=bool))
        mine = f.labels >= 0
        if (hit & mine).any():
            raise SoftMaskFoldError(
                f"selection='soft': parameter {f.fqn!r} dim {f.dim} would take the soft mask "
                "of one unit twice (it reads the same gated units on two edges); folding is "
                "not exact. Remedy: selection='slimming' or 'scored' for this model")
        hit |= mine
