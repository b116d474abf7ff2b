"""Rewrite pass: the user's own module class, sliced exactly as the pruned GraphModule.

Requires: ``model`` (the analysed user model), its ``GroupAnalysis``, the bool-per-unit
``kept`` of a plan and ``pruned``, the GraphModule ``slice_weights`` built from them.
Ensures: the result is a deep copy of ``model`` (same class; ``model`` is untouched) whose
parameters and buffers are the pruned GraphModule's tensors (no second slicing algorithm:
every tensor whose shape changed is copied from ``pruned`` under the same FQN); torch
module attributes are re-derived by the module fixups of ``passes.rules`` (the same table
``slice_weights`` uses); of other modules, only attributes that held a size the rewrite
changed follow (width names, a split's sections or a view's shape, slice bounds), the
rest are left alone (a stale one is caught by the check); an int attribute of the module
that runs a reshape/view/split follows one int of it (LeViT ``key_dim``); a chunk or
split(int) whose pieces the plan keeps unevenly, a plan breaking a count tie (a size the
forward computes from another layer's width, ``analysis.count_ties``) and an original
softmax scale the forward derives from the kept width (torchvision Swin v1) are
refused; submodules only another mode
runs (train-only heads, ``analysis.other_modes``) take their slices from that mode's
graph sliced with the same labels, and ``check_other_modes`` proves slice == mask on that
path (float64, dropout off, train-mode BatchNorm); parametrised submodules no analysed
graph ran whose input is sliced are refused; the copy's outputs
equal ``pruned``'s in float64 on the example inputs and on a
doubled batch (float32 for a torch.export graph, which is specialised to its dtype),
or ``ModuleOutputError`` / ``LiteralSizeError`` is raised.

Before/after (ResNet-18, 25% of layer1.0.conv1's channels removed)::

    small = slice_module(model, analysis, kept, pruned)
    type(small) is ResNet                    # the class is kept
    small.layer1[0].conv1                    # Conv2d(64, 48, ...)
    small.layer1[0].bn1.num_features         # 48
"""
from __future__ import annotations

import copy
import math
import operator
import warnings
from typing import Any

import numpy as np
import torch
import torch.fx

from fxprune.core.errors import (LiteralSizeError, ModuleOutputError, OtherModeWarning,
                                 RewriteError, UnprovenBranchWarning, exception_line,
                                 source_line)
from fxprune.core.count_ties import broken_count_ties
from fxprune.core.groups import GroupAnalysis
from fxprune.core.graph_meta import get_meta
from passes.mask import insert_masks
from passes.slice_weights import keep_mask, slice_weights
from passes.rules.registry import (MODULE_FIXUPS, RewriteOptions, apply_module_fixup,
                                   find_module_entry, normalized_call)

__all__ = ["slice_module", "literal_rewrites", "check_module_output", "uneven_chunks",
           "refuse_uneven_chunks", "refuse_broken_count_ties", "refuse_derived_scales",
           "check_unrun_modules", "check_other_modes", "unrun_modules", "head_reading"]


def slice_module(model: torch.nn.Module, analysis: GroupAnalysis, kept: np.ndarray,
                 pruned: torch.fx.GraphModule, *, check: bool = True,
                 rtol: float = 1e-6, atol: float = 1e-7) -> torch.nn.Module:
    """A deep copy of ``model`` (its own class) holding ``pruned``'s sliced tensors.

    Raises ``RewriteError`` when a tensor of ``pruned`` has no place in ``model`` (the
    graph was captured from another model), ``ModuleOutputError`` when the copy's
    outputs differ from ``pruned``'s, ``LiteralSizeError`` when they differ and the
    forward holds a literal size that fxprune rewrote in the graph (the error names the
    source line; ``output="graph"`` is the remedy), or before slicing when ``kept``
    breaks a count tie (``refuse_broken_count_ties``).
    """
    refuse_broken_count_ties(analysis, kept)
    small = copy.deepcopy(model)
    touched = _copy_tensors(small, pruned)
    options = RewriteOptions(get_meta(pruned, "attention_scale", "original"))
    # modules only another mode runs (train-only heads) take their slices from that
    # mode's graph, sliced with the same kept labels
    others = [(mode, slice_weights(mode.analysis, kept, attention_scale=options.attention_scale))
              for mode in analysis.other_modes]
    owner = dict.fromkeys(touched, analysis)
    for mode, gm in others:
        owner.update(dict.fromkeys(_copy_tensors(small, gm, only=mode.modules) - touched,
                                   mode.analysis))
    touched = set(owner)
    parents = {p.rsplit(".", k)[0] for p in touched for k in range(1, p.count(".") + 1)}
    for path in sorted(touched | parents | {""}, key=lambda p: (-p.count("."), p)):
        # torch modules re-derive their attributes (in_channels, num_features...); other
        # modules keep theirs, and a stale one shows up in check_module_output
        apply_module_fixup(small, path, analysis.module_notes.get(path), options,
                           inherited=True)
    changes = _size_changes(model, small)
    for path in sorted(parents | {""} | touched):
        _follow_sizes(small, path, changes)
        _follow_heads(small, path, owner.get(path, analysis), kept, options)
    _follow_size_tuples(model, small, analysis, pruned)
    for mode, gm in others:
        _follow_size_tuples(model, small, mode.analysis, gm)
    if check:
        check_module_output(small, pruned, analysis, rtol=rtol, atol=atol)
        check_unrun_modules(model, small, analysis, pruned)
        check_other_modes(small, analysis, kept)
    return small


def _copy_tensors(small: torch.nn.Module, pruned: torch.nn.Module,
                  only: tuple[str, ...] | None = None) -> set[str]:
    """Put every tensor of ``pruned`` whose shape changed into ``small`` under its FQN
    (tied names share one tensor, as in ``pruned``); returns the owning module paths.
    ``only``: just the tensors of these submodules."""
    own = dict(small.named_parameters(remove_duplicate=False))
    own.update(small.named_buffers(remove_duplicate=False))
    theirs = dict(pruned.named_parameters(remove_duplicate=False))
    theirs.update(pruned.named_buffers(remove_duplicate=False))
    if only is not None:
        theirs = {f: t for f, t in theirs.items() if f.startswith(tuple(p + "." for p in only))}
    touched: set[str] = set()
    for fqn, new in theirs.items():
        if fqn not in own:
            if _tracked_name(fqn):  # constants the tracer lifted have no place in the model
                raise RewriteError(f"the pruned graph holds tensor '{fqn}', which the model "
                                   f"({type(small).__name__}) does not have: pass the model "
                                   f"the plan was analysed on, or use output=\"graph\"")
            continue
        if own[fqn].shape == new.shape:
            continue
        path, _, name = fqn.rpartition(".")
        holder = small.get_submodule(path) if path else small
        value = new.detach().clone()
        if isinstance(own[fqn], torch.nn.Parameter):
            holder._parameters[name] = torch.nn.Parameter(
                value, requires_grad=own[fqn].requires_grad)
        elif name in holder._buffers:
            holder._buffers[name] = value
        else:
            setattr(holder, name, value)
        touched.add(path)
    _retie(small, pruned)
    return touched


def _tracked_name(fqn: str) -> bool:
    return not fqn.startswith(("_tensor_constant", "_lifted_tensor_constant"))


def _retie(small: torch.nn.Module, pruned: torch.nn.Module) -> None:
    """Names that share one tensor in ``pruned`` (tied embeddings) share one in ``small``."""
    first: dict[int, str] = {}
    for fqn, t in pruned.named_parameters(remove_duplicate=False):
        if id(t) in first:
            src_path, _, src_name = first[id(t)].rpartition(".")
            path, _, name = fqn.rpartition(".")
            try:
                src = small.get_submodule(src_path) if src_path else small
                dst = small.get_submodule(path) if path else small
            except AttributeError:
                continue
            if src_name in src._parameters and name in dst._parameters:
                dst._parameters[name] = src._parameters[src_name]
        else:
            first[id(t)] = fqn


# Field-standard names of a module-wide width (torchvision ViT ``hidden_dim``, timm
# ``num_features``/``embed_dim``/``head_hidden_size``, transformers ``hidden_size``). Only
# these follow: any int attribute could coincide with a width (ViT's image_size 32).
WIDTH_ATTRIBUTES = frozenset({"hidden_dim", "hidden_size", "embed_dim", "num_features",
                              "head_hidden_size", "d_model", "width", "dim"})


def _size_changes(model: torch.nn.Module, small: torch.nn.Module) -> dict[str, list]:
    """Per tensor FQN, the (old, new) sizes of each dim that changed."""
    old = dict(model.named_parameters()) | dict(model.named_buffers())
    out = {}
    for fqn, t in [*small.named_parameters(), *small.named_buffers()]:
        if fqn in old and old[fqn].shape != t.shape and old[fqn].dim() == t.dim():
            out[fqn] = [(a, b) for a, b in zip(old[fqn].shape, t.shape) if a != b]
    return out


def _follow_sizes(small: torch.nn.Module, path: str, changes: dict[str, list]) -> None:
    """A module without a fixup (the user's own, timm's, torchvision's ViT) may hold a
    width as an int attribute named in ``WIDTH_ATTRIBUTES``: such an attribute equal to a
    size that changed in the module's subtree takes the new size
    most of those dims took (the residual stream's width dominates). This is a guess
    that ``check_module_output`` proves or refutes for every attribute ``forward`` reads."""
    module = small.get_submodule(path) if path else small
    if find_module_entry(MODULE_FIXUPS, module) is not None:
        return
    prefix = f"{path}." if path else ""
    votes: dict[int, dict[int, int]] = {}
    for fqn, pairs in changes.items():
        if fqn.startswith(prefix):
            for old, new in pairs:
                votes.setdefault(old, {}).setdefault(new, 0)
                votes[old][new] += 1
    for name, value in list(vars(module).items()):
        if type(value) is int and value in votes and name in WIDTH_ATTRIBUTES:
            setattr(module, name, max(votes[value].items(), key=lambda kv: kv[1])[0])


def _follow_size_tuples(model: torch.nn.Module, small: torch.nn.Module,
                        analysis: GroupAnalysis, pruned: torch.fx.GraphModule) -> None:
    """A split's sections or a view's shape held as an int tuple/list attribute of the
    module that runs the op (timm InceptionNeXt ``split_indexes``, FocalNet
    ``input_split``, PoolFormer's layer scale ``shape``), or one of its items held as an
    int attribute of that module (LeViT ``key_dim``), takes the sizes the rewrite gave
    that op, where every op of the module that held the old value got the same new one
    (otherwise it is left, and ``check_module_output`` refuses)."""
    new_nodes = {n.name: n for n in pruned.graph.nodes}
    wanted: dict[tuple[str, str], set] = {}
    for node in analysis.gm.graph.nodes:
        after = new_nodes.get(node.name)
        if after is None or node.op not in ("call_function", "call_method"):
            continue
        stack = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
        if stack:  # one int of a shape or of sections: only the module that runs the op
            _want_ints(model, small, stack[-1], _changed_ints(node, after), wanted)
        for old, new in _changed_sequences(node, after):
            for path in [*reversed(stack), ""]:  # innermost first; the root has no entry
                try:
                    module = small.get_submodule(path) if path else small
                except AttributeError:
                    continue
                names = [k for k, v in vars(module).items()
                         if (_int_seq(v) and isinstance(old, list) and list(v) == old)
                         or (type(v) is int and type(old) is int and v == old)]
                for k in names:
                    wanted.setdefault((path, k), set()).add(
                        tuple(new) if isinstance(new, list) else new)
                if names:
                    break
    for (path, name), values in wanted.items():
        if len(values) == 1:
            module = small.get_submodule(path) if path else small
            value, new = getattr(module, name), next(iter(values))
            setattr(module, name, type(value)(new) if isinstance(value, (list, tuple)) else new)


def _want_ints(model: torch.nn.Module, small: torch.nn.Module, path: str,
               pairs: list[tuple[int, int]], wanted: dict[tuple[str, str], set]) -> None:
    """Int attributes that held an ``old`` of ``pairs`` in the original module at
    ``path`` want its ``new`` (LeViT's ``key_dim``/``val_dim`` in ``split([self.key_dim,
    self.key_dim, self.val_dim])``, its ``val_attn_dim`` in ``reshape(B, N,
    self.val_attn_dim)``); one that an earlier rule already set to another value is
    left to that rule."""
    try:
        before = model.get_submodule(path) if path else model
        module = small.get_submodule(path) if path else small
    except AttributeError:
        return
    for old, new in pairs:
        names = [k for k, v in vars(before).items() if type(v) is int and v == old
                 and getattr(module, k, None) in (old, new)]
        if len(names) > 1:  # LeViT: num_heads == key_dim == 16; heads follow their
            # projection's rows (_follow_heads), not a literal that another size shares
            names = [k for k in names if k not in HEAD_COUNT_ATTRIBUTES]
        for k in names:
            wanted.setdefault((path, k), set()).add(new)


def _changed_ints(before: torch.fx.Node, after: torch.fx.Node) -> list[tuple[int, int]]:
    """(old, new) ints the rewrite changed at the same position of a reshape/view/split's
    arguments, one by one: a positional int (``reshape(x, b, n, 128)``) or an item of an
    int list (``split(x, [16, 16, 32])``)."""
    if getattr(before.target, "__name__", before.target) not in _SHAPE_OPS:
        return []
    pairs = []
    for a, b in zip(before.args[1:], after.args[1:]):
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
            pairs += [(u, v) for u, v in zip(a, b) if type(u) is int and type(v) is int]
        elif type(a) is int and type(b) is int:
            pairs.append((a, b))
    return [(u, v) for u, v in pairs if u != v]


# ops whose int arguments are sizes (a shape, split sections)
_SHAPE_OPS = frozenset({"reshape", "view", "split", "split_with_sizes", "expand",
                        "unflatten", "new_zeros", "new_ones", "new_empty", "zeros", "ones"})


def _int_seq(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(type(i) is int for i in v)


def _changed_sequences(before: torch.fx.Node, after: torch.fx.Node) -> list[tuple[list, list]]:
    """(old, new) int sequences at the same argument position that the rewrite changed,
    and (old, new) slice bounds of a getitem (``x[:, :self.num_1x1_c]``)."""
    pairs: list = []
    if before.target is operator.getitem and after.target is operator.getitem:
        for a, b in zip(_slices(before.args[1]), _slices(after.args[1])):
            for u, v in ((a.start, b.start), (a.stop, b.stop)):
                if type(u) is int and type(v) is int and u != v:
                    pairs.append((u, v))
        return pairs
    split_int = _split_int_pairs(before, after)
    if split_int:
        return split_int
    for old, new in _same_arguments(before, after):
        if _int_seq(old) and _int_seq(new) and len(new) == len(old) \
                and list(new) != list(old):
            pairs.append((list(old), list(new)))
    return pairs


def _same_arguments(before: torch.fx.Node, after: torch.fx.Node) -> list[tuple[Any, Any]]:
    """(old, new) values of each argument of the call, paired by schema name where both
    calls bind to the same schema (a fixup may move a keyword to a position), else by
    position and keywords by name: aten.conv2d's stride is never paired with its padding."""
    b, a = normalized_call(before), normalized_call(after)
    if b.names and b.names == a.names:
        return [(b.values[k], a.values[k]) for k in b.names[1:]]
    pairs = list(zip(before.args[1:], after.args[1:]))
    return pairs + [(v, after.kwargs[k]) for k, v in before.kwargs.items() if k in after.kwargs]


def _split_int_pairs(before: torch.fx.Node, after: torch.fx.Node) -> list[tuple[int, int]]:
    """A ``split(int)`` the rewrite cut into the pieces ``split`` cuts (a plan honouring
    the analysis' ``split_ties``): the forward's section (``self.expand_chs // 2``)
    follows the first kept piece, (old section, new); where the pieces are all equal,
    the total it was derived from too, (old total, new total). A shorter last piece
    (``split(self.split_size)`` of 22: 8 / 8 / 6) leaves the total unknown here."""
    if getattr(before.target, "__name__", before.target) not in ("split", "unsafe_split"):
        return []
    arg = before.args[1] if len(before.args) > 1 else before.kwargs.get(
        "split_size", before.kwargs.get("split_size_or_sections"))
    new = after.args[1] if len(after.args) > 1 else None
    if type(arg) is not int or not _int_seq(new) or new[0] == arg or \
            len(set(new[:-1])) > 1 or not 0 < new[-1] <= new[0]:
        return []
    if new[-1] != new[0]:
        return [(arg, int(new[0]))]
    return [(arg, int(new[0])), (arg * len(new), int(new[0]) * len(new))]


def _slices(index: Any) -> list[slice]:
    items = index if isinstance(index, tuple) else (index,)
    return [i if isinstance(i, slice) else slice(None) for i in items]


# Field-standard names of an attention module's head count, head width and their
# product (timm ``num_heads``/``head_dim``/``attn_dim``, transformers
# ``num_attention_heads``/``attention_head_size``/``all_head_size``, others'
# ``n_heads``/``dim_head``/``inner_dim``, T5's ``key_value_proj_dim``), its softmax
# scale, and the projections whose output rows are laid out (q/k/v, heads, head_dim) (a
# fused ``qkv``: 3 x heads x head_dim).
HEAD_COUNT_ATTRIBUTES = ("num_heads", "n_heads", "n_head", "num_attention_heads", "heads")
HEAD_DIM_ATTRIBUTES = ("head_dim", "dim_head", "attention_head_size", "head_size", "d_head",
                       "key_value_proj_dim")
HEAD_TOTAL_ATTRIBUTES = ("attn_dim", "all_head_size", "inner_dim", "split_size")
SCALE_ATTRIBUTES = ("scale", "scaling")
QUERY_PROJECTIONS = ("qkv", "q", "query", "q_proj", "to_q", "to_qkv", "wq", "in_proj")
FUSED_PROJECTIONS = ("qkv", "to_qkv", "in_proj")  # rows laid out (q/k/v, heads, head_dim)


def _follow_heads(small: torch.nn.Module, path: str, analysis: GroupAnalysis,
                  kept: np.ndarray, options: RewriteOptions) -> None:
    """An attention module without a fixup (timm's ``Attention``, window attention, the
    user's own) holds its head count and head_dim as int attributes named in
    ``HEAD_COUNT_ATTRIBUTES`` / ``HEAD_DIM_ATTRIBUTES``: they take the counts its query
    projection's kept rows show when read as (q/k/v, heads, head_dim) blocks (a head is
    kept whole or not at all, every kept head keeps as many features); totals follow,
    a scale derived from head_dim is recomputed where ``attention_scale="recompute"``.
    A guess, as in ``_follow_sizes``: ``check_module_output`` proves or refutes it."""
    module = small.get_submodule(path) if path else small
    if find_module_entry(MODULE_FIXUPS, module) is not None:
        return
    heads0 = next((getattr(module, n) for n in HEAD_COUNT_ATTRIBUTES
                   if type(getattr(module, n, None)) is int and getattr(module, n) > 0), None)
    proj = next((n for n in QUERY_PROJECTIONS
                 if isinstance(getattr(module, n, None), torch.nn.Module)), None)
    if heads0 is None or proj is None:
        return
    weight = f"{path}.{proj}.weight" if path else f"{proj}.weight"
    reading = head_reading(analysis, kept, weight, heads0,
                            _int_attribute(module, HEAD_DIM_ATTRIBUTES),
                            parts=(3, 1, 2) if proj in FUSED_PROJECTIONS else (1, 2, 3))
    if reading is None:
        return
    head_dim0, heads, head_dim = reading
    _set_ints(module, HEAD_COUNT_ATTRIBUTES, heads0, heads)
    _set_ints(module, HEAD_DIM_ATTRIBUTES, head_dim0, head_dim)
    _set_ints(module, HEAD_TOTAL_ATTRIBUTES, heads0 * head_dim0, heads * head_dim)
    if head_dim == head_dim0:
        return
    for name in SCALE_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, float) and math.isclose(value, head_dim0 ** -0.5):
            if _multiplied_literally(analysis.gm, path, value):
                continue  # the graph multiplies by it as a literal: it stays as traced
            setattr(module, name, options.softmax_scale(head_dim0, head_dim))
            if options.attention_scale == "original" and \
                    type(getattr(module, "fused_attn", None)) is bool:
                # timm's fused path calls SDPA without a scale (1/sqrt(head_dim) of the
                # pruned q): its explicit path multiplies by the scale kept above
                module.fused_attn = False


def _multiplied_literally(gm: torch.fx.GraphModule, path: str, value: float) -> bool:
    """A node run by module ``path`` multiplies by ``value`` as a literal (timm Swin's
    explicit ``q * self.scale``): the GraphModule keeps that scale whatever
    ``attention_scale`` says (only SDPA / fxprune's own attention calls are rescaled)."""
    for node in gm.graph.nodes:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if not stack or stack[-1][0] != path or \
                getattr(node.target, "__name__", node.target) not in ("mul", "mul_"):
            continue
        if any(isinstance(a, float) and math.isclose(a, value) for a in node.args):
            return True
    return False


def head_reading(analysis: GroupAnalysis, kept: np.ndarray, weight: str, heads0: int,
                  head_dim0: int | None, *, dim: int = 0, parts: tuple[int, ...] = (1, 2, 3)
                  ) -> tuple[int, int, int] | None:
    """``(head_dim, kept heads, kept head_dim)`` read from the kept rows of ``weight``
    (its output dim ``dim``: 1 for transformers' Conv1D) as (q/k/v, heads, head_dim)
    blocks, the first even reading in ``parts`` order (a fused qkv reads 3 parts first:
    without a head_dim attribute, 1 part of 3 x head_dim rows per head is even too), or
    None when no such reading is even."""
    labels = analysis.tensor_labels.get((weight, dim))
    if labels is None:
        return None
    rows = keep_mask(np.asarray(labels), kept)
    for parts in parts:
        if len(rows) % (parts * heads0) or \
                (head_dim0 is not None and len(rows) != parts * heads0 * head_dim0):
            continue
        per_head = rows.reshape(parts, heads0, -1).sum(axis=2)
        alive = per_head > 0
        counts = set(per_head[alive].tolist())
        if len(counts) == 1 and (alive == alive[:1]).all():
            return rows.size // (parts * heads0), int(alive[0].sum()), counts.pop()
    return None


def _set_ints(module: torch.nn.Module, names: tuple[str, ...], old: int, new: int) -> None:
    for name in names:
        if type(getattr(module, name, None)) is int and getattr(module, name) == old:
            setattr(module, name, new)


def _int_attribute(module: torch.nn.Module, names: tuple[str, ...]) -> int | None:
    return next((getattr(module, n) for n in names if type(getattr(module, n, None)) is int),
                None)


def literal_rewrites(analysis: GroupAnalysis, pruned: torch.fx.GraphModule) -> list[str]:
    """Source lines of nodes whose literal arguments the rewrite changed (a reshape's
    sizes, a split's sections): each is a size the user's forward may hold as a literal."""
    old = {n.name: n for n in analysis.gm.graph.nodes}
    lines = []
    for node in pruned.graph.nodes:
        before = old.get(node.name)
        if before is None or node.op not in ("call_function", "call_method"):
            continue
        if _literals(before.args, before.kwargs) != _literals(node.args, node.kwargs):
            where = source_line(node) or source_line(before)
            lines.append(f"{node.name} ({node.format_node()})" + (f" at {where}" if where else ""))
    return lines


def _literals(args: Any, kwargs: dict) -> list:
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    return [a for a in flat if isinstance(a, (int, float, bool)) and not isinstance(a, torch.fx.Node)]


def check_module_output(small: torch.nn.Module, pruned: torch.fx.GraphModule,
                        analysis: GroupAnalysis, *, rtol: float = 1e-6,
                        atol: float = 1e-7) -> None:
    """Compare ``small`` with ``pruned`` in float64, eval mode, on float64 copies (the
    originals are untouched): on the example inputs, and on the example batch doubled
    (``[x; x]``: each half of ``small``'s output must equal ``pruned(x)``, so a batch size
    the graph was not captured for is checked too)."""
    refuse_uneven_chunks(analysis, pruned)
    refuse_derived_scales(analysis, pruned)
    inputs = analysis.example_inputs
    a, b = _double(small), _double(pruned)
    x = tuple(_to_double(t) for t in inputs)
    with torch.no_grad():
        try:
            want = _flat(b(*x))
        except RuntimeError:  # a torch.export graph is specialised to its dtype (float32)
            a, b = copy.deepcopy(small).eval(), copy.deepcopy(pruned).eval()
            x, rtol, atol = tuple(inputs), max(rtol, 1e-4), max(atol, 1e-5)
            want = _flat(b(*x))
        got = _flat(_run_small(a, x, analysis, pruned))
        _compare(got, want, "the example inputs", analysis, pruned, rtol, atol)
        doubled = tuple(torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() else t
                        for t in x)
        if all(d is o for d, o in zip(doubled, x)) or get_meta(analysis.gm, "specialised"):
            return  # a recorded path may not hold for another batch: fxprune.check_paths
        got2 = _flat(_run_small(a, doubled, analysis, pruned))
        halves = [g[:len(g) // 2] if g.dim() and w.dim() and g.shape[0] == 2 * w.shape[0]
                  else g for g, w in zip(got2, want)]
        second = [g[len(g) // 2:] if g.dim() and w.dim() and g.shape[0] == 2 * w.shape[0]
                  else g for g, w in zip(got2, want)]
        _compare(halves, want, "a doubled batch (first half)", analysis, pruned, rtol, atol)
        _compare(second, want, "a doubled batch (second half)", analysis, pruned, rtol, atol)


def refuse_uneven_chunks(analysis: GroupAnalysis, pruned: torch.fx.GraphModule) -> None:
    """Raise ``LiteralSizeError`` where the plan keeps different counts in the pieces of a
    chunk or split(int) (``uneven_chunks``): the forward cuts equal pieces, so no attribute
    can make the module follow (GPT-2's ``c_attn(x).split(self.split_size)`` where the
    plan keeps 6 query/key but 5 value features per head)."""
    uneven = uneven_chunks(analysis, pruned)
    if uneven:  # the forward's chunk makes equal pieces: the module cannot follow the plan
        raise LiteralSizeError(
            f"compile(output=\"module\"): the plan keeps different counts in the pieces of "
            f"a chunk or split: {'; '.join(uneven[:3])}{' ...' if len(uneven) > 3 else ''}. The "
            f"forward cuts equal pieces, so the module cannot take these sizes. "
            f"Use output=\"graph\" (the GraphModule), a plan that keeps the same count in "
            f"every piece (fxprune.plan / Plan.from_ratio with split_ties=True, the default; "
            f"CLI: without --no-split-ties), or keep those channels (ignore=[...]).")


def refuse_derived_scales(analysis: GroupAnalysis, pruned: torch.fx.GraphModule) -> None:
    """Raise ``LiteralSizeError`` where the GraphModule keeps an attention's original
    softmax scale (``attention_scale="original"``) that the module computes from the kept
    width: torchvision Swin v1's ``shifted_window_attention`` scales q by ``(C //
    num_heads) ** -0.5`` (v2's cosine attention has no such scale), and no attribute
    holds it; with ``attention_scale="recompute"`` the module follows."""
    from fxprune.core.functional import window_attention

    if get_meta(pruned, "attention_scale", "original") != "original":
        return
    lines = []
    for node in pruned.graph.nodes:
        note = analysis.module_notes.get(node.name)
        if node.target is not window_attention or not note:
            continue
        cosine = node.kwargs.get("logit_scale", node.args[11] if len(node.args) > 11 else None)
        if cosine is None and node.kwargs.get("head_dim") != note["head_dim"]:
            where = source_line(node)
            lines.append(f"{node.name} (head_dim {note['head_dim']} -> "
                         f"{node.kwargs.get('head_dim')})" + (f" at {where}" if where else ""))
    if lines:
        raise LiteralSizeError(
            f"compile(output=\"module\"): torchvision's shifted_window_attention computes its "
            f"softmax scale from the kept width ((C // num_heads) ** -0.5), so the module "
            f"cannot keep the original scale that the GraphModule keeps "
            f"(attention_scale=\"original\"): {'; '.join(lines[:3])}"
            f"{' ...' if len(lines) > 3 else ''}. Use attention_scale=\"recompute\" (the "
            f"module then follows), output=\"graph\", or keep the attention's width "
            f"(ignore=[...]).")


def refuse_broken_count_ties(analysis: GroupAnalysis, kept: np.ndarray) -> None:
    """Raise ``LiteralSizeError`` where the plan breaks a count tie (``analysis.count_ties``:
    a reshape size the forward computes from another group's width, torchvision Swin's
    ``C // num_heads`` with ``C`` read off the block input): the module computes that
    size from the kept width, so it cannot take other counts."""
    if not analysis.count_ties:
        return
    broken = broken_count_ties(analysis, np.asarray(kept, dtype=bool))
    if broken:
        raise LiteralSizeError(
            f"compile(output=\"module\"): the forward computes a size from another "
            f"layer's width, and the plan keeps counts that size cannot take: "
            f"{'; '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}. Use "
            f"output=\"graph\" (the GraphModule), a plan that keeps the tie (fxprune.plan / "
            f"Plan.from_ratio with split_ties=True, the default; CLI: without "
            f"--no-split-ties), or keep those channels (ignore=[...]).")


def uneven_chunks(analysis: GroupAnalysis, pruned: torch.fx.GraphModule) -> list[str]:
    """``chunk`` nodes whose pieces the rewrite made unequal (the graph's ``split`` sizes
    are not what ``chunk`` cuts from the kept count): source line and sizes of each."""
    new = {n.name: n for n in pruned.graph.nodes}
    out = []
    for node in analysis.gm.graph.nodes:
        kind = getattr(node.target, "__name__", node.target)
        if node.op not in ("call_function", "call_method") or \
                kind not in ("chunk", "unsafe_chunk", "split", "unsafe_split"):
            continue
        after = new.get(node.name)
        if after is None or len(after.args) < 2 or \
                not isinstance(after.args[1], (list, tuple)):
            continue  # not rewritten: its dim kept its size
        sizes = [int(s) for s in after.args[1]]
        arg = node.args[1] if len(node.args) > 1 else node.kwargs.get(
            "chunks", node.kwargs.get("split_size", node.kwargs.get("split_size_or_sections")))
        if type(arg) is not int:
            continue  # sections as a list: an attribute may follow (_follow_size_tuples)
        total = sum(sizes)
        # torch.chunk: pieces of ceil(n / chunks); split(int): pieces of one size, whichever
        step = -(-total // arg) if "chunk" in kind else max(sizes[0], 1)
        cut = [min(step, total - k * step) for k in range(-(-total // step))]
        if cut != sizes:
            where = source_line(node)
            out.append(f"{node.name} ({kind}({arg}) of {total} kept channels: the plan keeps "
                       f"{sizes}, {kind} cuts {cut if 'chunk' in kind else 'equal pieces'})"
                       + (f" at {where}" if where else ""))
    return out


def check_unrun_modules(model: torch.nn.Module, small: torch.nn.Module,
                        analysis: GroupAnalysis, pruned: torch.fx.GraphModule) -> None:
    """Submodules with parameters that the captured graph never ran (GoogLeNet's and
    Inception-v3's auxiliary heads run only in training) were not sliced: where their
    input comes from a pruned layer, ``small`` crashes in that mode. Proven by running
    ``small.train()`` where the original runs in train mode on the example inputs; where
    it does not, an unrun module whose input width is a width the plan changed is refused.
    A graph recorded on one path of data-dependent control flow (``frontend="record"``)
    leaves the other branches' modules unrun: the width rule picks those that may crash
    and ``UnprovenBranchWarning`` names them (``fxprune.check_paths`` proves or refutes:
    a coinciding width is no proof). Raises ``ModuleOutputError`` naming the modules and the remedies."""
    covered = {p for mode in analysis.other_modes for p in mode.modules}
    unrun = [p for p in unrun_modules(small, pruned) if p not in covered]
    if not unrun:
        return
    if get_meta(analysis.gm, "specialised"):  # frontend="record": one recorded path
        changed = {old for pairs in _size_changes(model, small).values() for old, _ in pairs}
        hazards = [p for p in unrun if _input_width(small.get_submodule(p)) in changed]
        if hazards:  # train mode takes the same recorded path: it proves nothing, and
            # the width may coincide, so warn; fxprune.check_paths proves or refuses
            shown = ", ".join(hazards[:4]) + (" ..." if len(hazards) > 4 else "")
            warnings.warn(
                f"compile(output=\"module\"): modules {shown} lie on a branch the recorded path did "
                f"not take (frontend=\"record\") and were not sliced, and their input width "
                f"is one the plan changes: that branch may crash. Prove it with "
                f"fxprune.check_paths(model, small, plan, [inputs that take it]), which "
                f"names the remedy (ignore=[...]) if it does.", UnprovenBranchWarning,
                stacklevel=2)
        return
    x = tuple(analysis.example_inputs)
    failed = "".join(f"; its {mode}-mode path could not be analysed ({info['why']}), so "
                     f"they could not be sliced (example inputs the model accepts in {mode} "
                     f"mode would let fxprune analyse it)" for mode, info in
                     (get_meta(analysis.gm, "other_modes") or {}).items() if not info["analysed"])
    with torch.no_grad():
        try:
            copy.deepcopy(model).train()(*x)
        except Exception:
            changed = {old for pairs in _size_changes(model, small).values() for old, _ in pairs}
            hazards = [p for p in unrun if _input_width(small.get_submodule(p)) in changed]
            if hazards:
                raise _unrun_error(hazards, "its input width is one the plan changes (train "
                                   "mode could not be run on the example inputs to prove "
                                   "otherwise)" + failed)
            return
        try:
            copy.deepcopy(small).train()(*x)
        except Exception as exc:
            raise _unrun_error(unrun, f"the sliced model crashes in train mode "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                               + failed) from exc


def check_other_modes(small: torch.nn.Module, analysis: GroupAnalysis, kept: np.ndarray, *,
                      rtol: float = 1e-6, atol: float = 1e-7) -> None:
    """slice == mask on each other mode's path (``analysis.other_modes``: train-only
    heads): ``small`` in that mode against that mode's graph with the plan's channels
    masked (``passes.mask.insert_masks``), both float64 copies with dropout off (train-mode
    BatchNorm uses batch statistics, per channel, so a masked channel changes no kept
    one), on the example inputs with a second, perturbed copy of the batch appended
    (BatchNorm over one value per channel cannot train). Every output is compared, the
    auxiliary ones included. A graph with functional dropout (random, not switched off
    by a module's mode) is compared by output shapes only, with ``OtherModeWarning``.
    Raises ``ModuleOutputError`` naming the modules and the remedies."""
    for mode in analysis.other_modes:
        train = mode.mode == "train"
        masked = _in_mode(insert_masks(mode.analysis, kept), train)
        a = _in_mode(small, train)
        x = tuple(_to_double(t) for t in mode.analysis.example_inputs)
        random = [n.format_node() for n in masked.graph.nodes
                  if "dropout" in str(getattr(n.target, "__name__", n.target)).lower()
                  and n.op in ("call_function", "call_method")]
        with torch.no_grad():
            try:
                x2 = _two_samples(x)
                want = _flat(masked(*x2))
                x = x2
            except Exception:  # a graph specialised to its batch size: the inputs alone
                want = _flat(masked(*x))
            try:
                got = _flat(a(*x))
            except Exception as exc:
                raise _mode_error(mode, f"the sliced model does not run in {mode.mode} mode "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                                  ) from exc
        if random:
            warnings.warn(f"compile(output=\"module\"): the {mode.mode}-mode path holds "
                          f"functional dropout ({random[0]}), so it was checked by output "
                          f"shapes only, not numerically", OtherModeWarning, stacklevel=2)
            got = [g.new_zeros(g.shape) for g in got]
            want = [w.new_zeros(w.shape) for w in want]
        if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
            raise _mode_error(mode, f"in {mode.mode} mode it returns shapes "
                              f"{[tuple(g.shape) for g in got]}, the masked model "
                              f"{[tuple(w.shape) for w in want]}")
        for i, (g, w) in enumerate(zip(got, want)):
            if g.is_floating_point() and not torch.allclose(g, w.to(g.dtype), rtol=rtol, atol=atol):
                raise _mode_error(mode, f"in {mode.mode} mode output {i} differs from the "
                                  f"masked model's by up to {(g - w).abs().max().item():.3g} "
                                  f"(float64)")


def _in_mode(m: torch.nn.Module, train: bool) -> torch.nn.Module:
    """A float64 copy of ``m`` in mode ``train`` with its dropout modules off."""
    c = copy.deepcopy(m).to(torch.float64).train(train)
    for sub in c.modules():
        if isinstance(sub, torch.nn.modules.dropout._DropoutNd):
            sub.eval()
    return c


def _two_samples(x: tuple) -> tuple:
    """``x`` with a perturbed copy of its batch appended (floating tensors with a batch
    dim; others repeated), so batch statistics see two different samples."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.cat([t, t + 0.5 * torch.randn(t.shape, generator=g, dtype=t.dtype)])
                 if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() else
                 torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() else t for t in x)


def _mode_error(mode: Any, what: str) -> ModuleOutputError:
    shown = ", ".join(mode.modules[:4]) + (" ..." if len(mode.modules) > 4 else "")
    return ModuleOutputError(
        f"compile(output=\"module\"): {what}. The {mode.mode}-mode path was analysed with "
        f"the captured one ({shown} run only in {mode.mode} mode), but the module does not "
        f"follow it there. Keep the channels those modules read (ignore=[...]), remove "
        f"them before pruning (torchvision GoogLeNet/Inception3: aux_logits=False), or use "
        f"output=\"graph\" (the GraphModule, eval mode).")


def unrun_modules(small: torch.nn.Module, pruned: torch.fx.GraphModule) -> list[str]:
    """Outermost submodules of ``small`` with parameters, none of which the graph
    ``pruned`` holds (the captured mode never ran them: GoogLeNet's ``aux1``/``aux2`` in
    eval mode)."""
    used = {f for f, _ in pruned.named_parameters(remove_duplicate=False)}
    out: list[str] = []
    for path, m in small.named_modules():
        params = [f"{path}.{n}" if path else n for n, _ in m.named_parameters(remove_duplicate=False)]
        if not path or not params or any(p in used for p in params):
            continue
        if not any(path.startswith(o + ".") for o in out):
            out.append(path)
    return out


def _input_width(m: torch.nn.Module) -> int | None:
    """The input channel count of the first weight in ``m`` (conv / linear / norm)."""
    for sub in m.modules():
        w = getattr(sub, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 1:
            return int(w.shape[1] * getattr(sub, "groups", 1)) if w.dim() >= 2 else int(w.shape[0])
    return None


def _unrun_error(paths: list[str], why: str) -> ModuleOutputError:
    shown = ", ".join(paths[:4]) + (" ..." if len(paths) > 4 else "")
    return ModuleOutputError(
        f"compile(output=\"module\"): submodules with parameters that the captured graph "
        f"never ran (they run only in another mode, e.g. auxiliary heads in training) were "
        f"not sliced: {shown}; {why}. Keep the channels that feed them (ignore=[...]), "
        f"remove them before pruning (e.g. torchvision GoogLeNet/Inception3: "
        f"aux_logits=False), or use output=\"graph\" (the GraphModule, eval mode).")


def _double(m: torch.nn.Module) -> torch.nn.Module:
    c = copy.deepcopy(m).eval()
    return c.to(torch.float64)


def _to_double(t: Any) -> Any:
    return t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _run_small(m: torch.nn.Module, x: tuple, analysis: GroupAnalysis,
               pruned: torch.fx.GraphModule) -> Any:
    try:
        return m(*x)
    except Exception as exc:
        where = exception_line(exc)
        raise _mismatch(f"the rewritten {type(m).__name__} does not run ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})"
                        + (f" at {where}" if where else ""), analysis, pruned) from exc


def _flat(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple") and not isinstance(out, torch.Tensor):
        out = out.to_tuple()  # Hugging Face ModelOutput
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _compare(got: list, want: list, where: str, analysis: GroupAnalysis,
             pruned: torch.fx.GraphModule, rtol: float, atol: float) -> None:
    if len(got) != len(want):
        raise _mismatch(f"on {where} it returns {len(got)} tensors, the GraphModule "
                        f"{len(want)}", analysis, pruned)
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise _mismatch(f"on {where} output {i} has shape {tuple(g.shape)}, the "
                            f"GraphModule's {tuple(w.shape)}", analysis, pruned)
        if g.is_floating_point() and not torch.allclose(g, w.to(g.dtype), rtol=rtol, atol=atol):
            err = (g - w).abs().max().item()
            raise _mismatch(f"on {where} output {i} differs from the GraphModule's by up to "
                            f"{err:.3g} (float64)", analysis, pruned)
        if not g.is_floating_point() and not torch.equal(g, w):
            raise _mismatch(f"on {where} output {i} differs from the GraphModule's",
                            analysis, pruned)


def _mismatch(what: str, analysis: GroupAnalysis,
              pruned: torch.fx.GraphModule) -> ModuleOutputError:
    literals = literal_rewrites(analysis, pruned)
    if literals:
        return LiteralSizeError(
            f"compile(output=\"module\"): {what}. The forward holds sizes that pruning "
            f"changes and no module attribute controls; fxprune rewrote them in the graph "
            f"at: {'; '.join(literals[:3])}{' ...' if len(literals) > 3 else ''}. Use "
            f"output=\"graph\" (the GraphModule), keep those channels (ignore=[...]), or "
            f"derive the size from an attribute or the input's shape in the model's code.")
    return ModuleOutputError(
        f"compile(output=\"module\"): {what}. A module attribute the forward reads is "
        f"probably stale; use output=\"graph\" (the GraphModule) or keep that module's "
        f"channels (ignore=[...]).")
