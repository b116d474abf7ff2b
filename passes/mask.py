"""Oracle pass: the masked model of GLOSSARY.md (slice == mask).

Requires: a ``GroupAnalysis`` and a bool per unit label (True: kept).
Ensures: a deep copy of the analysed module where every node whose output carries a
removed unit is followed by ``where(keep, node, 0)``, zeroing the removed indices, and
removed parameter slices are zeroed; ``gm.meta["fxprune"]["masked_value"]`` maps each
masked node to the name of its ``where`` (so activations can be compared node by node).
Zeroing *selects* 0 rather than multiplying by a 0/1 mask: a removed unit's value may be
non-finite in the masked model (``y / y.std()`` on a zeroed channel is 0/0) and
``nan * 0`` is nan, which the next layer would spread into kept units; a selected 0
contributes nothing, as the removed unit does in the sliced model. Non-finite values of
*kept* units pass through unchanged (verify reports them). It shares
no code with ``slice_weights`` beyond the labels, so that one checks the other.

Before/after::

    conv1 = self.conv1(x)                      conv1 = self.conv1(x)
    bn1 = self.bn1(conv1)              ->      mask_0 = self._fxprune_mask_0
                                               where = torch.where(mask_0, conv1, 0.0)
                                               bn1 = self.bn1(where)  ...
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.fx

from fxprune.core.graph_meta import set_meta
from fxprune.core.groups import GroupAnalysis
from fxprune.core.errors import RewriteError
from fxprune.core.pipeline import checked_pass, ensure_new_module
from passes.slice_weights import keep_mask, requires_kept_labels

__all__ = ["insert_masks", "insert_masks_shared", "mask_blocks", "zero_slices"]


def _mask_tensor(shape: tuple[int, ...], labels: dict, kept: np.ndarray) -> torch.Tensor | None:
    """The bool keep mask of a node's value (broadcast shape), None when nothing is removed."""
    mask = np.ones([1] * len(shape), dtype=bool)
    hit = False
    for axis, lab in labels.items():
        m = keep_mask(lab, kept)
        if m.all():
            continue
        hit = True
        view = [1] * len(shape)
        view[axis] = len(m)
        mask = mask & m.astype(bool).reshape(view)
    return torch.from_numpy(mask) if hit else None


def ensures_masked(gm: torch.fx.GraphModule, analysis: GroupAnalysis, kept: np.ndarray) -> None:
    """A new module with the source's parameter shapes (masks zero, they never slice)."""
    ensure_new_module(gm, analysis.gm)
    shapes = {n: t.shape for n, t in analysis.gm.named_parameters()}
    changed = [n for n, t in gm.named_parameters() if n in shapes and t.shape != shapes[n]]
    if changed:
        raise AssertionError(f"masking changed parameter shapes: {changed[:3]}")


@checked_pass(requires=requires_kept_labels, ensures=ensures_masked, error_type=RewriteError)
def insert_masks(analysis: GroupAnalysis, kept: np.ndarray) -> torch.fx.GraphModule:
    """Return a copy of ``analysis.gm`` with removed channels zeroed after every node."""
    gm = copy.deepcopy(analysis.gm)
    for _fqn, tensor, dim, m in _removed_slices(gm, analysis, kept):
        _zero_slice(tensor, dim, m)
    return _insert_mask_nodes(gm, analysis, kept)


def insert_masks_shared(analysis: GroupAnalysis, kept: np.ndarray
                        ) -> tuple[torch.fx.GraphModule, dict[str, list[tuple[int, np.ndarray]]]]:
    """``insert_masks`` without a copy of the weights, for a reader that never writes them.

    Requires: the caller reads the result's parameters and buffers only through copies
    (``fxprune.verify``'s float64 interpreter) and applies the returned zeroings to them.
    Ensures: the same graph as ``insert_masks``, sharing every parameter and buffer of
    ``analysis.gm``; its removed slices are returned, not zeroed, as
    ``{fqn: [(dim, keep mask)]}`` (other tensor attributes are copies, zeroed).
    Not a ``checked_pass``: it aliases its source on purpose (ViT-L/16: 1.2 GB saved).
    """
    shared = {id(t): t for t in [*analysis.gm.parameters(), *analysis.gm.buffers()]}
    gm = copy.deepcopy(analysis.gm, dict(shared))
    zeroed: dict[str, list[tuple[int, np.ndarray]]] = {}
    for fqn, tensor, dim, m in _removed_slices(gm, analysis, kept):
        if id(tensor) in shared:
            zeroed.setdefault(fqn, []).append((dim, m))
        else:
            _zero_slice(tensor, dim, m)
    return _insert_mask_nodes(gm, analysis, kept), zeroed


def zero_slices(tensor: torch.Tensor, slices: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    """``tensor`` (a private copy) with the removed entries of ``slices`` zeroed in place."""
    for dim, m in slices:
        _zero_slice(tensor, dim, m)
    return tensor


def _insert_mask_nodes(gm: torch.fx.GraphModule, analysis: GroupAnalysis,
                       kept: np.ndarray) -> torch.fx.GraphModule:
    graph = gm.graph
    count = 0
    masked_value: dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op in ("output", "placeholder"):
            continue
        labels = analysis.node_labels.get(node.name)
        meta = node.meta.get("tensor_meta")
        if not isinstance(labels, dict) or meta is None or not hasattr(meta, "dtype"):
            continue
        if not meta.dtype.is_floating_point:
            continue
        mask = _mask_tensor(tuple(meta.shape), labels, kept)
        if mask is None:
            continue
        name = f"_fxprune_mask_{count}"
        count += 1
        device = _device(gm)
        gm.register_buffer(name, mask.to(device=device))
        users = list(node.users)
        with graph.inserting_after(node):
            attr = graph.get_attr(name)
        with graph.inserting_after(attr):
            select = graph.call_function(torch.where, (attr, node, 0.0))
        for user in users:
            user.replace_input_with(node, select)
        masked_value[node.name] = select.name
    set_meta(gm, "masked_value", masked_value)
    graph.lint()
    gm.recompile()
    return gm


def ensures_blocks_masked(result: torch.fx.GraphModule, gm: torch.fx.GraphModule,
                          blocks: Any) -> None:
    """A new module computing on the same parameters' shapes."""
    ensure_new_module(result, gm)


@checked_pass(ensures=ensures_blocks_masked, error_type=RewriteError)
def mask_blocks(gm: torch.fx.GraphModule, blocks) -> torch.fx.GraphModule:
    """Oracle for block removal: a copy of ``gm`` where each block's residual add reads
    ``zeros_like(f(x))`` instead of its branch ``f(x)`` (nothing is erased; not ``f(x) * 0``,
    which is nan where the removed branch is not finite)."""
    gm = copy.deepcopy(gm)
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    for block in blocks:
        for add, branch in zip(block.residuals, block.branches):
            f = by_name[branch]
            with graph.inserting_after(f):
                zero = graph.call_function(torch.zeros_like, (f,))
            by_name[add].replace_input_with(f, zero)
    graph.lint()
    gm.recompile()
    return gm


def _removed_slices(gm: torch.nn.Module, analysis: GroupAnalysis,
                    kept: np.ndarray) -> list[tuple[str, torch.Tensor, int, np.ndarray]]:
    """Removed parameter slices, to be zeroed too: a compound op (MultiheadAttention) has
    internal channels that no graph node exposes, so only its weights can mask them."""
    out = []
    for (fqn, dim), labels in analysis.tensor_labels.items():
        m = keep_mask(labels, kept)
        if m.all():
            continue
        owner_path, _, name = fqn.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if name == "original1" and _weight_norm_dim(owner) == dim:
            continue  # w = g v/||v||: zeroing g zeroes the row; a zero v row would be 0/0
        out.append((fqn, getattr(owner, name), dim, m))
    return out


def _zero_slice(tensor: torch.Tensor, dim: int, m: np.ndarray) -> None:
    """Removed entries set to 0 (a fill, not a multiply: an inf or nan there becomes 0)."""
    view = [1] * tensor.dim()
    view[dim] = len(m)
    removed = torch.from_numpy(~np.asarray(m, dtype=bool)).to(tensor.device).reshape(view)
    with torch.no_grad():
        tensor.masked_fill_(removed, 0)


def _weight_norm_dim(plist: torch.nn.Module) -> int | None:
    """The norm dim when ``plist`` is a ParametrizationList holding one weight_norm."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.parametrize import ParametrizationList

    if isinstance(plist, ParametrizationList) and len(plist) == 1 and \
            isinstance(plist[0], _WeightNorm) and plist[0].dim not in (None, -1):
        return plist[0].dim % plist.original1.dim()
    return None


def _device(gm: torch.nn.Module) -> torch.device:
    for t in gm.parameters():
        return t.device
    return torch.device("cpu")
