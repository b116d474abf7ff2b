"""Rewrite pass: a new, smaller GraphModule with sliced weights and fixed-up constants.

Requires: a ``GroupAnalysis`` of ``gm`` and a bool per unit label (True: kept).
Ensures: the returned module is a deep copy (the analysed module is untouched); every
tracked parameter dim has exactly the kept count; literal sizes of reshapes/splits and
module attributes follow; ``graph.lint()`` passes and shapes re-propagate to the
expected sizes.

Before/after (ResNet block, 25% of conv1's channels removed)::

    layer1_0_conv1 = self.layer1.0.conv1(x)        # Conv2d(64, 64)   -> Conv2d(64, 48)
    layer1_0_bn1 = self.layer1.0.bn1(layer1_0_conv1)  # BatchNorm2d(64) -> BatchNorm2d(48)
    layer1_0_conv2 = self.layer1.0.conv2(relu)     # Conv2d(64, 64)   -> Conv2d(48, 64)
"""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.fx

from fxprune.core.errors import RewriteError, describe_node
from fxprune.core.graph_meta import set_meta
from fxprune.core.groups import GroupAnalysis
from fxprune.core.pipeline import checked_pass, ensure_new_module
from passes.rules.registry import (MODULE_FIXUPS, NUMPY_ALIASES, RewriteOptions,
                                   apply_module_fixup, find_module_entry, lookup,
                                   normalized_call)
from passes.shape_prop import propagate_shapes, tensor_shapes

__all__ = ["slice_weights", "expected_shapes", "FixupContext"]


def expected_shapes(analysis: GroupAnalysis, kept: np.ndarray) -> dict[str, Any]:
    """Each node's output shape after slicing: tracked dims shrink to their kept count."""
    out = {}
    for node in analysis.gm.graph.nodes:
        out[node.name] = _shrink(tensor_shapes(node), analysis.node_labels.get(node.name), kept)
    return out


def _shrink(shape: Any, labels: Any, kept: np.ndarray) -> Any:
    if shape is None:
        return None
    if isinstance(labels, dict) and shape and all(isinstance(s, int) for s in shape):
        new = list(shape)
        for axis, lab in labels.items():
            new[axis] = int(np.count_nonzero(keep_mask(lab, kept)))
        return tuple(new)
    if isinstance(labels, (tuple, list)) and not all(isinstance(s, int) for s in shape):
        return tuple(_shrink(s, l, kept) for s, l in zip(shape, labels))
    return shape


def keep_mask(labels: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Bool per index: kept unless its unit is removed (-1: never pruned)."""
    mask = np.ones(len(labels), dtype=bool)
    inside = labels >= 0
    mask[inside] = kept[labels[inside]]
    return mask


class FixupContext:
    """What a rewrite fixup sees: the node in the new graph and old/new shapes."""

    def __init__(self, analysis: GroupAnalysis, kept: np.ndarray, new_shapes: dict,
                 node: torch.fx.Node, old_nodes: dict[str, torch.fx.Node],
                 module: torch.nn.Module | None = None,
                 options: RewriteOptions = RewriteOptions()) -> None:
        self.analysis, self.kept_labels, self.new_shapes, self.node = analysis, kept, new_shapes, node
        self.options = options  # this rewrite's options (attention_scale...)
        self._old = old_nodes  # the analysed graph's nodes by name, built once per rewrite
        self.module = module  # the called module of a call_module node (in the new graph)

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Argument ``index`` / ``name`` of the node's call, normalised to the op's schema
        like ``RuleContext.arg`` (keyword-only and aliased spellings included)."""
        return normalized_call(self.node).get(index, name, default)

    def set_arg(self, index: int, name: str, value: Any) -> None:
        """Write argument ``index`` / ``name`` back in the spelling the call used
        (positional if it was passed by position, else as keyword ``name``)."""
        node = self.node
        if index < len(node.args):
            node.args = node.args[:index] + (value,) + node.args[index + 1:]
        else:
            spelled = [k for k in node.kwargs if k == name or NUMPY_ALIASES.get(k) == name]
            node.kwargs = {**{k: v for k, v in node.kwargs.items() if k not in spelled},
                           name: value}

    def old_shape(self, value: Any) -> Any:
        return tensor_shapes(self._old[value.name]) if isinstance(value, torch.fx.Node) else None

    def new_shape(self, value: Any) -> Any:
        return self.new_shapes.get(value.name) if isinstance(value, torch.fx.Node) else None

    def kept(self, value: torch.fx.Node, axis: int) -> np.ndarray | None:
        """Kept indices along ``axis`` of ``value``, or None if that dim is untracked."""
        labels = self.analysis.node_labels.get(value.name)
        if not isinstance(labels, dict) or axis not in labels:
            return None
        return np.flatnonzero(keep_mask(labels[axis], self.kept_labels))

    def error(self, what: str) -> RewriteError:
        return RewriteError(f"{what} at {describe_node(self.node)}")


def requires_kept_labels(analysis: GroupAnalysis, kept: np.ndarray, *args: Any,
                         **kwargs: Any) -> None:
    """``kept`` is one bool per unit label of ``analysis``."""
    kept = np.asarray(kept)
    if kept.dtype != bool or kept.shape != (analysis.num_units,):
        raise AssertionError(f"kept must be {analysis.num_units} bools, got {kept.dtype} "
                             f"{kept.shape}")


def ensures_sliced(gm: torch.fx.GraphModule, analysis: GroupAnalysis, kept: np.ndarray,
                   *args: Any, **kwargs: Any) -> None:
    """A new module; every tracked dim of a model tensor kept under its FQN has the plan's
    kept count (tensors a module fixup replaced are checked by ``check_sliced``)."""
    ensure_new_module(gm, analysis.gm)
    tensors = dict(gm.named_parameters(remove_duplicate=False))
    tensors.update(gm.named_buffers(remove_duplicate=False))
    for (fqn, dim), labels in analysis.tensor_labels.items():
        t = tensors.get(fqn)
        want = int(np.count_nonzero(keep_mask(labels, kept)))
        if t is not None and t.dim() > dim and t.shape[dim] != want:
            raise RewriteError(f"{fqn} dim {dim} has {t.shape[dim]} entries, the plan keeps "
                               f"{want}")


@checked_pass(requires=requires_kept_labels, ensures=ensures_sliced, error_type=RewriteError)
def slice_weights(analysis: GroupAnalysis, kept: np.ndarray, *,
                  attention_scale: str = "original") -> torch.fx.GraphModule:
    """Return a deep copy of ``analysis.gm`` with every planned slice removed.

    ``attention_scale``: ``"original"`` keeps every softmax scale fxprune writes at
    1/sqrt(original head_dim) (slice == mask); ``"recompute"`` uses the kept head_dim.
    """
    options = RewriteOptions(attention_scale=attention_scale)  # ValueError when unknown
    gm = copy.deepcopy(analysis.gm) if kept.all() else _slice(analysis, kept, options)
    set_meta(gm, "attention_scale", attention_scale)
    return gm


def _slice(analysis: GroupAnalysis, kept: np.ndarray,
           options: RewriteOptions) -> torch.fx.GraphModule:
    gm = copy.deepcopy(analysis.gm, _share_sliced(analysis, kept))
    touched = _slice_tensors(gm, analysis, kept)
    _check_stale_attributes(gm, analysis, kept, touched)
    parents = {path.rsplit(".", k)[0] for path in touched for k in range(1, path.count(".") + 1)}
    for path in sorted(touched | parents, key=lambda p: (-p.count("."), p)):
        apply_module_fixup(gm, path, analysis.module_notes.get(path), options)
    new_shapes = expected_shapes(analysis, kept)
    old_nodes = {n.name: n for n in analysis.gm.graph.nodes}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        # modules whose attributes follow their input's shape have a fixup too
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        fn = lookup(node, gm, "fixup")
        if fn is not None:
            fn(FixupContext(analysis, kept, new_shapes, node, old_nodes, module, options))
    gm.graph.lint()
    gm.recompile()
    return gm


def _share_sliced(analysis: GroupAnalysis, kept: np.ndarray) -> dict[int, Any]:
    """A deepcopy memo that shares (does not copy) every tensor about to be replaced by
    its slice: each is copied once, by ``index_select``, instead of twice. Only a tensor
    whose every name in the module tree is replaced is shared, so the copy never keeps a
    reference to the user's storage."""
    gm = analysis.gm
    names: dict[int, set[str]] = {}
    for fqn, t in [*gm.named_parameters(remove_duplicate=False),
                   *gm.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), set()).add(fqn)
    named = dict(gm.named_parameters()) | dict(gm.named_buffers())
    memo: dict[int, Any] = {}
    for (fqn, _dim), labels in analysis.tensor_labels.items():
        t = named.get(fqn)
        if t is None or keep_mask(labels, kept).all():
            continue
        if names.get(id(t), set()) <= set(analysis.tensor_aliases.get(fqn, (fqn,))):
            memo[id(t)] = t
    return memo


def _check_stale_attributes(gm: torch.fx.GraphModule, analysis: GroupAnalysis,
                            kept: np.ndarray, touched: set[str]) -> None:
    """A module the graph calls, with sliced parameters, no module fixup and an int
    attribute equal to a size that was sliced away: its forward would use a stale size."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for path in touched & called:
        module = gm.get_submodule(path)
        if find_module_entry(MODULE_FIXUPS, module) is not None:
            continue
        for (fqn, dim), labels in analysis.tensor_labels.items():
            if fqn.rpartition(".")[0] != path:
                continue
            old, new = len(labels), int(np.count_nonzero(keep_mask(labels, kept)))
            stale = [k for k, v in vars(module).items() if type(v) is int and v == old != new]
            if stale:
                cls = type(module).__name__
                raise RewriteError(
                    f"module '{path}' ({cls}): {fqn} dim {dim} is sliced {old} -> {new}, but "
                    f"attribute {stale[0]!r} = {old} still names the old size and fxprune has "
                    f"no module fixup for {cls}, so its forward would be inconsistent. Valid: "
                    f"keep this module's channels (Plan.from_ratio(..., ignore=['{path}'])), or "
                    f"register @passes.rules.registry.module_fixup({cls}) to re-derive "
                    f"{stale[0]!r} from the sliced parameters.")


def _slice_tensors(gm: torch.nn.Module, analysis: GroupAnalysis, kept: np.ndarray) -> set[str]:
    touched: set[str] = set()
    kept_at: dict[str, dict[int, np.ndarray]] = {}
    for (fqn, dim), labels in analysis.tensor_labels.items():
        mask = keep_mask(labels, kept)
        if not mask.all():
            kept_at.setdefault(fqn, {})[dim] = np.flatnonzero(mask)
    for fqn, index in kept_at.items():
        owner_path, _, name = fqn.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        old = getattr(owner, name)
        with torch.no_grad():
            new = _take(old.detach(), index)  # a new tensor: never a view
        if isinstance(old, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
        for alias in analysis.tensor_aliases.get(fqn, (fqn,)):  # tied tensors: slice once
            path, _, attr = alias.rpartition(".")
            holder = gm.get_submodule(path) if path else gm
            if isinstance(new, torch.nn.Parameter):
                holder._parameters[attr] = new
            elif attr in getattr(holder, "_buffers", {}):
                holder._buffers[attr] = new
            else:
                setattr(holder, attr, new)
            touched.add(path)
    return touched


def _take(t: torch.Tensor, index: dict[int, np.ndarray]) -> torch.Tensor:
    """``t`` keeping ``index[d]`` along each dim ``d``, as a new tensor. Output and input
    dims of a conv weight with a kernel (0 and 1) are gathered in one pass, not two (the
    second ``index_select`` read a half-size copy the first had written); a matrix or a
    1x1 kernel takes two ``index_select``: 2-3x faster than the advanced-index gather,
    whose per-element overhead the kernel no longer amortises."""
    idx = {d: torch.as_tensor(i, device=t.device) for d, i in sorted(index.items())}
    if list(idx) == [0, 1]:
        if t.dim() > 2 and math.prod(t.shape[2:]) > 1:
            return t[idx[0][:, None], idx[1]]
        matrix = t.reshape(t.shape[0], t.shape[1])
        out = matrix.index_select(0, idx[0]).index_select(1, idx[1])
        return out.reshape(len(idx[0]), len(idx[1]), *t.shape[2:])
    for d, i in idx.items():
        t = t.index_select(d, i)
    return t


def check_sliced(gm: torch.fx.GraphModule, analysis: GroupAnalysis, kept: np.ndarray,
                 example_inputs: tuple) -> None:
    """Re-propagate shapes on ``gm`` and compare with the expected shapes and counts."""
    named = dict(gm.named_parameters())  # once, not per label (B7: 14 s, quadratic)
    for (fqn, dim), labels in analysis.tensor_labels.items():
        t = named[fqn] if fqn in named else gm.get_buffer(fqn)
        want = int(np.count_nonzero(keep_mask(labels, kept)))
        if t.shape[dim] != want:
            raise RewriteError(f"{fqn} dim {dim} has {t.shape[dim]} entries, plan keeps {want}")
    try:
        propagate_shapes(gm, example_inputs)
    except Exception as exc:
        raise RewriteError(f"the pruned graph does not run: {exc}") from exc
    expected = expected_shapes(analysis, kept)
    for node in gm.graph.nodes:
        want, got = expected.get(node.name), tensor_shapes(node)
        if not _shapes_agree(want, got):
            raise RewriteError(f"{describe_node(node)}: shape {got}, expected {want}")


def _shapes_agree(want: Any, got: Any) -> bool:
    """Equal where both sides are tensors (an optional output may be None on one side)."""
    if want is None or got is None:
        return True
    if all(isinstance(s, int) for s in want) and all(isinstance(s, int) for s in got):
        return tuple(want) == tuple(got)
    if len(want) != len(got):
        return False
    return all(_shapes_agree(w, g) for w, g in zip(want, got))
