"""Rewrite pass: the user's own module class, sliced exactly as the pruned GraphModule.

Requires: ``model`` (the analysed user model), its ``GroupAnalysis``, the bool-per-unit
``kept`` of a plan and ``pruned``, the GraphModule ``slice_weights`` built from them.
Ensures: the result is a deep copy of ``model`` (same class; ``model`` is untouched) whose
parameters and buffers are the pruned GraphModule's tensors (no second slicing algorithm:
every tensor whose shape changed is copied from ``pruned`` under the same FQN); torch
module attributes are re-derived by the module fixups of ``passes.rules`` (the same table
``slice_weights`` uses); attributes of other modules are left alone (a stale one is caught by the check); the copy's outputs equal ``pruned``'s in float64 on the example inputs and on a
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
from typing import Any

import numpy as np
import torch
import torch.fx

from fxprune.core.errors import LiteralSizeError, ModuleOutputError, RewriteError, source_line
from fxprune.core.groups import GroupAnalysis
from fxprune.core.graph_meta import get_meta
from passes.slice_weights import keep_mask
from passes.rules.registry import (MODULE_FIXUPS, RewriteOptions, apply_module_fixup,
                                   find_module_entry)

__all__ = ["slice_module", "literal_rewrites", "check_module_output", "head_reading"]


def slice_module(model: torch.nn.Module, analysis: GroupAnalysis, kept: np.ndarray,
                 pruned: torch.fx.GraphModule, *, check: bool = True,
                 rtol: float = 1e-6, atol: float = 1e-7) -> torch.nn.Module:
    """A deep copy of ``model`` (its own class) holding ``pruned``'s sliced tensors.

    Raises ``RewriteError`` when a tensor of ``pruned`` has no place in ``model`` (the
    graph was captured from another model), ``ModuleOutputError`` when the copy's
    outputs differ from ``pruned``'s, ``LiteralSizeError`` when they differ and the
    forward holds a literal size that fxprune rewrote in the graph (the error names the
    source line; ``output="graph"`` is the remedy).
    """
    small = copy.deepcopy(model)
    touched = _copy_tensors(small, pruned)
    parents = {p.rsplit(".", k)[0] for p in touched for k in range(1, p.count(".") + 1)}
    options = RewriteOptions(get_meta(pruned, "attention_scale", "original"))
    for path in sorted(touched | parents | {""}, key=lambda p: (-p.count("."), p)):
        # torch modules re-derive their attributes (in_channels, num_features...); other
        # modules keep theirs, and a stale one shows up in check_module_output
        apply_module_fixup(small, path, analysis.module_notes.get(path), options,
                           inherited=True)
    changes = _size_changes(model, small)
    for path in sorted(parents | {""} | touched):
        _follow_sizes(small, path, changes)
        _follow_heads(small, path, analysis, kept, options)
    if check:
        check_module_output(small, pruned, analysis, rtol=rtol, atol=atol)
    return small


def _copy_tensors(small: torch.nn.Module, pruned: torch.nn.Module) -> set[str]:
    """Put every tensor of ``pruned`` whose shape changed into ``small`` under its FQN
    (tied names share one tensor, as in ``pruned``); returns the owning module paths."""
    own = dict(small.named_parameters(remove_duplicate=False))
    own.update(small.named_buffers(remove_duplicate=False))
    theirs = dict(pruned.named_parameters(remove_duplicate=False))
    theirs.update(pruned.named_buffers(remove_duplicate=False))
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


# Field-standard names of an attention module's head count, head width and their
# product (timm ``num_heads``/``head_dim``/``attn_dim``, transformers
# ``num_attention_heads``/``attention_head_size``/``all_head_size``, others'
# ``n_heads``/``dim_head``/``inner_dim``), its softmax scale, and the projections whose
# output rows are laid out (q/k/v, heads, head_dim) (a fused ``qkv``: 3 x heads x head_dim).
HEAD_COUNT_ATTRIBUTES = ("num_heads", "n_heads", "n_head", "num_attention_heads", "heads")
HEAD_DIM_ATTRIBUTES = ("head_dim", "dim_head", "attention_head_size", "head_size", "d_head")
HEAD_TOTAL_ATTRIBUTES = ("attn_dim", "all_head_size", "inner_dim", "split_size")
SCALE_ATTRIBUTES = ("scale", "scaling")
QUERY_PROJECTIONS = ("qkv", "q", "query", "q_proj", "to_q", "to_qkv", "wq", "in_proj")


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
                            _int_attribute(module, HEAD_DIM_ATTRIBUTES))
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
            setattr(module, name, options.softmax_scale(head_dim0, head_dim))
            if options.attention_scale == "original" and \
                    type(getattr(module, "fused_attn", None)) is bool:
                # timm's fused path calls SDPA without a scale (1/sqrt(head_dim) of the
                # pruned q): its explicit path multiplies by the scale kept above
                module.fused_attn = False


def head_reading(analysis: GroupAnalysis, kept: np.ndarray, weight: str, heads0: int,
                  head_dim0: int | None) -> tuple[int, int, int] | None:
    """``(head_dim, kept heads, kept head_dim)`` read from the kept rows of ``weight``
    as (q/k/v, heads, head_dim) blocks, or None when no such reading is even."""
    labels = analysis.tensor_labels.get((weight, 0))
    if labels is None:
        return None
    rows = keep_mask(np.asarray(labels), kept)
    for parts in (1, 2, 3):
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
        raise _mismatch(f"the rewritten {type(m).__name__} does not run ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})",
                        analysis, pruned) from exc


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
