"""Analysis pass: classify every node by its rule and union channel units into groups.

Requires: ``tensor_meta`` on every tensor node (``passes.shape_prop.propagate_shapes``).
Ensures: a frozen ``GroupAnalysis`` (with ``split_ties``: every ``chunk(n)`` /
``split(int)`` whose equal pieces cut prunable units); ``gm`` is not mutated. One pass over the nodes in
topological order with union-find: close to linear in graph size.

Before/after (what the analysis sees)::

    conv1 = self.conv1(x)        # stop op: units u0..u63 born (conv1.weight[0])
    bn1 = self.bn1(conv1)        # pass-through: bn1.weight[0] ... follow u0..u63
    add = bn1 + shortcut         # coupling: units of both sides unioned
    fc = self.fc(flatten)        # stop op: fc.weight[1] consumes u (x49 after flatten)
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx

import passes.rules  # noqa: F401  (registers the rule families)
from fxprune.core.errors import UnsupportedOpError, describe_node, source_line
from fxprune.core.groups import (ChannelGroup, CountTie, GroupAnalysis, Member, ModeAnalysis,
                                 SplitTie)
from passes.rules.registry import AnalysisState, RuleContext, iter_units, lookup_rule, op_key
from passes.rules.shape import size_read, size_reads, sizes_from_args
from passes.shape_prop import tensor_shapes

__all__ = ["find_groups", "graph_fingerprint", "OtherMode"]


class OtherMode(NamedTuple):
    """A capture of the analysed model in another mode: its graph (shapes propagated),
    the inputs it was propagated with and the submodules (with parameters) only it runs."""

    gm: torch.fx.GraphModule
    inputs: tuple
    modules: tuple[str, ...]


def find_groups(gm: torch.fx.GraphModule, *, strict: bool = False,
                split_policy: str = "inner", example_inputs: tuple = (),
                other_modes: Mapping[str, OtherMode] | None = None) -> GroupAnalysis:
    """Union-find over channel units; returns the coupled groups of ``gm``.

    ``other_modes``: ``{mode: OtherMode(graph, inputs, modules)}``, captures of the same
    model in another mode (train), whose tensors share ``gm``'s FQNs. Their nodes are
    visited with the same units (a tensor dim is one unit array in every graph), so a
    channel space coupled or pinned in either graph is coupled or pinned in the result,
    and a plan on it is valid for every path. Spaces that only another mode's graph makes
    (an auxiliary head's inner channels) are pinned. Each mode's graph gets its own
    ``GroupAnalysis`` over the same unit labels (``GroupAnalysis.other_modes``)."""
    split_policy = {"head_dim": "inner", "heads": "outer"}.get(split_policy, split_policy)
    if split_policy not in ("inner", "outer"):
        raise ValueError("split_policy must be 'inner'/'head_dim' (a unit is one index of "
                         "every head) or 'outer'/'heads' (a unit is one whole head)")
    state = AnalysisState(gm=gm, split_policy=split_policy)
    for node in gm.graph.nodes:
        _visit(state, node, strict)
    others = {mode: _visit_other(state, other, strict)
              for mode, other in (other_modes or {}).items()}
    _pin_uncoupled_attrs(state)
    if not others:
        return _build(state, example_inputs)
    _pin_other_only(state, others, other_modes)
    modes = tuple(ModeAnalysis(mode, _build(sub, other_modes[mode].inputs, keys),
                               other_modes[mode].modules)
                  for mode, (sub, keys, _) in others.items())
    merged = _build(state, example_inputs, set(state.tensor_users))
    # a plan made without the other modes' couplings must not pass for one made with them
    both = "|".join([merged.fingerprint, *(f"{m.mode}:{m.analysis.fingerprint}" for m in modes)])
    return dataclasses.replace(merged, other_modes=modes,
                               fingerprint=hashlib.sha256(both.encode()).hexdigest()[:16])


def _visit_other(state: AnalysisState, other: OtherMode, strict: bool
                 ) -> tuple[AnalysisState, set, tuple[int, int]]:
    """Visit another mode's graph with ``state``'s units (its own node values, barriers
    and tensor users); returns its state, its tensor keys and the unit and space counts
    before the visit (ids from there on were born in that graph)."""
    born = (len(state.store.parent), len(state.store.space_parent))
    sub = AnalysisState(gm=other.gm, store=state.store, tensors=state.tensors,
                        roles=state.roles, split_policy=state.split_policy,
                        attr_born=state.attr_born, module_notes=state.module_notes)
    sub.aliases.update(state.aliases)  # the first graph's canonical names win: one unit array
    for node in other.gm.graph.nodes:
        _visit(sub, node, strict)
    return sub, set(sub.tensor_users), born


def _pin_other_only(state: AnalysisState, others: dict,
                    other_modes: Mapping[str, OtherMode]) -> None:
    """Units in spaces that only another mode's graph made (no space of the first graph
    joined them: union-find keeps the oldest space as root) stay whole."""
    store = state.store
    space_roots = store.space_roots()
    space_of = np.asarray(store.space_of, dtype=np.int64)
    first_spaces = min(born[1] for _, _, born in others.values())
    for mode, (_, _, (n0, _)) in others.items():
        units = np.arange(n0, len(space_of), dtype=np.int64)
        alone = units[space_roots[space_of[units]] >= first_spaces]
        if len(alone):
            shown = ", ".join(other_modes[mode].modules[:4])
            store.pin(alone, f"made only in {mode} mode (by {shown or 'its graph'}, which "
                             f"only the {mode}-mode graph runs): kept whole")


def _pin_uncoupled_attrs(state: AnalysisState) -> None:
    """A get_attr tensor dim that no rule coupled to anything stays whole (fail closed)."""
    store = state.store
    for key in state.attr_born:
        units = state.tensors.get(key)
        if units is None or not len(units):
            continue
        space = store.space_of[int(units[0])]
        root = store.find_space(space)
        if root == space and not store.merged_by.get(root):
            store.pin(units, f"{key[0]}[{key[1]}]: read by get_attr but never coupled")


def _visit(state: AnalysisState, node: torch.fx.Node, strict: bool) -> None:
    ctx = RuleContext(state, node)
    if node.op == "placeholder":
        ctx.set({} if _is_tensor(tensor_shapes(node)) else None)
    elif node.op == "get_attr":
        shape = tensor_shapes(node)
        if not _is_tensor(shape):
            ctx.set(None)
            return
        if not node.meta["tensor_meta"].dtype.is_floating_point:
            ctx.set({})  # index tables and masks are never sliced
            return
        dims = {d: ctx.tensor_units(node.target, d, "dep") for d, n in enumerate(shape) if n > 1}
        state.attr_born.extend((node.target, d) for d in dims)
        ctx.set({d: u for d, u in dims.items() if u is not None})
    elif node.op == "output":
        ctx.pin_info(_collect(state, node.args[0]), "model output")
    else:
        fn = lookup_rule(node, state.gm)
        if fn is not None:
            fn(ctx)
        else:
            _barrier(ctx, strict)


def _collect(state: AnalysisState, value: Any) -> list:
    found: list = []
    torch.fx.map_arg(value, lambda n: found.append(state.values.get(n.name)) or n)
    return found


def _barrier(ctx: RuleContext, strict: bool) -> None:
    """No rule: pack tuples; otherwise everything that flows in is pinned (fail closed)."""
    node = ctx.node
    target = node.target
    if isinstance(target, type) and issubclass(target, tuple):  # namedtuple outputs
        ctx.set(tuple(ctx.dims(a) for a in node.args))
        return
    inputs = _collect(ctx.state, (node.args, node.kwargs))
    if any(len(u) for u in iter_units(inputs)):
        if strict:
            raise UnsupportedOpError(
                f"no rule for {describe_node(node)}, and prunable channels flow into it. "
                "Remedy: register a rule with passes.rules.registry.rule, mark the module "
                "as a leaf (fxprune.trace(..., leaf_modules=...)), or analyse with "
                "strict=False to treat it as a barrier.")
        ctx.pin_info(inputs, f"no rule for {node.op} {getattr(target, '__name__', target)}")
        ctx.state.barriers.append(node.name)
    ctx.set(_empty_like(tensor_shapes(node)))


def _empty_like(shape: Any) -> Any:
    if shape is None:
        return None
    if _is_tensor(shape):
        return {}
    return tuple(_empty_like(s) for s in shape)


def _is_tensor(shape: Any) -> bool:
    return isinstance(shape, tuple) and all(isinstance(s, int) for s in shape)


# ----------------------------------------------------------------------------------
def _build(state: AnalysisState, example_inputs: tuple,
           keys: set | None = None) -> GroupAnalysis:
    """The analysis of ``state.gm``; ``keys``: the tensor dims its graph uses (all of
    ``state.tensors`` when None; several graphs share one store)."""
    store = state.store
    n_units = len(store.parent)
    roots = store.roots() if n_units else np.zeros(0, dtype=np.int64)
    space_of = np.asarray(store.space_of, dtype=np.int64)
    space_roots = store.space_roots() if store.space_parent else np.zeros(0, dtype=np.int64)
    pinned = np.frombuffer(bytes(store.pinned), dtype=np.uint8).astype(bool) if n_units else \
        np.zeros(0, dtype=bool)

    is_root = roots == np.arange(n_units)
    free = is_root & ~pinned[roots]
    if n_units:  # a space no parameter joined (a zeros() that met no layer) is no group
        owned = np.zeros(len(space_roots), dtype=bool)
        for units in state.tensors.values():
            owned[space_roots[space_of[roots[units]]]] = True
        free &= owned[space_roots[space_of]]
    free_roots = np.flatnonzero(free)
    root_space = space_roots[space_of[free_roots]] if len(free_roots) else np.zeros(0, np.int64)
    order = np.lexsort((free_roots, root_space))  # by space, then by birth
    free_roots, root_space = free_roots[order], root_space[order]

    label_of_root = np.full(n_units, -1, dtype=np.int64)
    label_of_root[free_roots] = np.arange(len(free_roots))
    labels = label_of_root[roots] if n_units else np.zeros(0, dtype=np.int64)
    spaces, first, counts = np.unique(root_space, return_index=True, return_counts=True)
    space_gid = {int(s): i for i, s in enumerate(spaces)}
    group_of = np.array([space_gid[int(s)] for s in root_space], dtype=np.int64)
    local_of = np.arange(len(free_roots)) - first[group_of] if len(free_roots) else \
        np.zeros(0, dtype=np.int64)

    def relabel(info: Any) -> Any:
        if info is None:
            return None
        if isinstance(info, dict):
            return {a: labels[u] for a, u in info.items()}
        return tuple(relabel(i) for i in info)

    node_labels = {name: relabel(info) for name, info in state.values.items()}
    tensor_labels = {key: labels[u] for key, u in state.tensors.items()
                     if keys is None or key in keys}
    groups = _make_groups(state, spaces, counts, group_of, local_of, node_labels, tensor_labels)
    return GroupAnalysis(
        gm=state.gm, groups=groups, fingerprint=graph_fingerprint(state.gm),
        node_labels=node_labels, tensor_labels=tensor_labels, group_of=group_of,
        local_of=local_of, barriers=tuple(state.barriers), example_inputs=example_inputs,
        module_notes=dict(state.module_notes), tensor_aliases=_alias_table(state),
        pin_reasons=_tensor_pin_reasons(state, roots, pinned, space_of, space_roots),
        split_ties=_split_ties(state.gm, node_labels, group_of, groups),
        count_ties=_count_ties(state.gm, node_labels, group_of, groups)
        + _declared_count_ties(state, labels, group_of, groups))


EQUAL_SPLITS = ("chunk", "unsafe_chunk", "split", "unsafe_split")


def _split_ties(gm: torch.fx.GraphModule, node_labels: dict, group_of: np.ndarray,
                groups: tuple[ChannelGroup, ...]) -> tuple[SplitTie, ...]:
    """``chunk(n)`` / ``split(int)`` nodes cutting prunable units into pieces that the
    forward sizes alike (an int argument, not a list of sections an attribute can hold),
    the last piece shorter where the width is not a multiple (EdgeNeXt's ``chunk(3)`` of
    88 channels: 30 / 30 / 28)."""
    out = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or op_key(node) not in EQUAL_SPLITS:
            continue
        arg = node.args[1] if len(node.args) > 1 else node.kwargs.get(
            "chunks", node.kwargs.get("split_size", node.kwargs.get("split_size_or_sections")))
        pieces = node_labels.get(node.name)
        if type(arg) is not int or not isinstance(pieces, tuple) or len(pieces) < 2:
            continue
        axes = {a for p in pieces if isinstance(p, dict) for a in p}
        for axis in sorted(axes):
            labs = tuple(p.get(axis, np.zeros(0, np.int64)) for p in pieces)
            inside = np.concatenate([lab[lab >= 0] for lab in labs])
            if not len(inside) or any(len(lab) != len(labs[0]) for lab in labs[:-1]) or \
                    not 0 < len(labs[-1]) <= len(labs[0]):
                continue  # nothing prunable, or not what chunk / split(int) cuts
            names = tuple(groups[g].name for g in np.unique(group_of[inside]).tolist())
            chunks = arg if "chunk" in op_key(node) else 0
            out.append(SplitTie(node.name, int(axis), labs, names, source_line(node), chunks))
    return tuple(out)


# ops whose size arguments define their output dims (the same ops ``fix_sizes`` rewrites)
SIZED_OPS = ("view", "reshape", "expand", "broadcast_to", "_reshape_alias")


def _count_ties(gm: torch.fx.GraphModule, node_labels: dict, group_of: np.ndarray,
                groups: tuple[ChannelGroup, ...]) -> tuple[CountTie, ...]:
    """Reshape/view sizes of prunable dims computed (int arithmetic) from the size of
    another group's prunable dim (``C // num_heads``, ``reshape(B, N, C)`` with ``C`` read
    off the block input): the forward ties the two groups' kept counts."""
    out = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or op_key(node) not in SIZED_OPS:
            continue
        dims, shape = node_labels.get(node.name), tensor_shapes(node)
        sizes, _ = sizes_from_args(node)
        if not isinstance(dims, dict) or not _is_tensor(shape) or len(sizes) != len(shape):
            continue
        for axis, size in enumerate(sizes):
            lab = dims.get(axis)
            if not isinstance(size, torch.fx.Node) or lab is None:
                continue  # a literal, or no channel dim (batch, tokens)
            reads = _pruned_reads(size, node_labels)
            if reads:
                tie = _count_tie(node, axis, size, reads, lab, group_of, groups)
                if tie is not None:
                    out.append(tie)
            elif (lab >= 0).any() and (fixed := _pruned_reads(size, node_labels, fixed=True)):
                out.append(_fixed_tie(node, axis, fixed[0], lab, group_of, groups))
    return tuple(out)


def _fixed_tie(node: torch.fx.Node, axis: int, read: tuple, labels: np.ndarray,
               group_of: np.ndarray, groups: tuple[ChannelGroup, ...]) -> CountTie:
    """A prunable dim sized from a width no plan changes (timm CaiT/XCiT ``ClassAttn``:
    ``C // num_heads`` with C read off the never-pruned class-token stream): the forward
    keeps that size, so the dim's group must stay whole."""
    _, t, k, width = read
    follow = np.unique(group_of[labels[labels >= 0]]).tolist()
    ratio = Fraction(len(labels), width)
    return CountTie(node.name, axis, f"{t.name}.shape[{k}]", np.full(width, -1, np.int64),
                    labels, "", groups[follow[0]].name if len(follow) == 1 else "",
                    ratio.numerator, ratio.denominator, source_line(node),
                    "the width it reads is never pruned, so the dim it sizes must stay whole")


def _declared_count_ties(state: AnalysisState, labels: np.ndarray, group_of: np.ndarray,
                         groups: tuple[ChannelGroup, ...]) -> tuple[CountTie, ...]:
    """The count ties compound ops' rules declared (``RuleContext.count_tie``)."""
    by_name = {n.name: n for n in state.gm.graph.nodes}
    out = []
    for name, read, source, units, num, den in state.count_ties:
        src, lab = labels[source], labels[units]
        if not (src >= 0).any() and not (lab >= 0).any():
            continue
        lead = np.unique(group_of[src[src >= 0]]).tolist()
        follow = np.unique(group_of[lab[lab >= 0]]).tolist()
        if lead == follow and len(lead) == 1:
            continue
        ratio = Fraction(num, den)
        why = "a dim holds units of several groups" if len(lead) > 1 or len(follow) > 1 else \
            "" if lead and follow else "one of the dims holds no prunable unit"
        if not why and Fraction(len(lab), len(src)) != ratio:
            why = "the traced sizes do not keep the declared ratio"
        out.append(CountTie(name, -1, read, src, lab,
                            groups[lead[0]].name if len(lead) == 1 else "",
                            groups[follow[0]].name if len(follow) == 1 else "",
                            ratio.numerator, ratio.denominator,
                            source_line(by_name[name]), why))
    return tuple(out)


def _pruned_reads(value: torch.fx.Node, node_labels: dict, *, fixed: bool = False
                  ) -> list[tuple]:
    """(read node, tensor, dim, labels) of every ``t.shape[k]`` / ``t.size(k)`` of a dim
    holding prunable units that the int arithmetic computing ``value`` reads (``fixed``:
    (read node, tensor, dim, size) of every read of a dim holding none)."""
    found = []

    def arithmetic(n: torch.fx.Node) -> bool:  # size arithmetic, not a tensor
        return not _is_tensor(tensor_shapes(n)) or tensor_shapes(n) == ()

    for n, (t, k) in size_reads(value, descend=arithmetic):
        dims, shape = node_labels.get(t.name), tensor_shapes(t)
        if isinstance(dims, dict) and _is_tensor(shape) and -len(shape) <= k < len(shape):
            lab = dims.get(k % len(shape))
            prunable = lab is not None and (lab >= 0).any()
            if prunable and not fixed:
                found.append((n, t, k % len(shape), lab))
            elif fixed and not prunable:
                found.append((n, t, k % len(shape), int(shape[k])))
    return found


def _count_tie(node: torch.fx.Node, axis: int, size: torch.fx.Node, reads: list,
               labels: np.ndarray, group_of: np.ndarray, groups: tuple[ChannelGroup, ...]
               ) -> CountTie | None:
    """The tie of ``node``'s ``axis`` to the width it reads; None when both dims hold
    the same single group (a head split of its own width: the group's structure keeps it)."""
    read_node, t, k, source = reads[0]
    lead = np.unique(group_of[source[source >= 0]]).tolist()
    follow = np.unique(group_of[labels[labels >= 0]]).tolist()
    if lead == follow and len(lead) == 1 and len(reads) == 1:
        return None
    ratio = Fraction(len(labels), len(source))
    why = ""
    if not follow:  # EVA's attention width, pinned by its rotary embedding
        why = "the dim it sizes is never pruned, so the width it reads must stay whole"
    elif len(reads) > 1:
        why = f"the size reads {len(reads)} prunable widths"
    elif len(lead) > 1 or len(follow) > 1:
        why = "a dim holds units of several groups"
    elif not _linear(size, read_node, len(source), ratio):
        why = "the size is not a fixed multiple of the width it reads"
    return CountTie(node.name, axis, f"{t.name}.shape[{k}]", source, labels,
                    groups[lead[0]].name if len(lead) == 1 else "",
                    groups[follow[0]].name if len(follow) == 1 else "",
                    ratio.numerator, ratio.denominator, source_line(node), why)


def _linear(size: torch.fx.Node, read: torch.fx.Node, width: int, ratio: Fraction) -> bool:
    """``size`` computes ``ratio * C`` from ``C = read`` at the traced width and at two
    smaller multiples of the ratio's denominator (``C // heads`` is; ``C - 1`` is not)."""
    step = ratio.denominator
    probes = [c for c in (width, width - step, width - 2 * step) if c > 0]
    try:
        return all(_evaluate(size, {read: c}) == ratio * c for c in probes)
    except (TypeError, ValueError, ZeroDivisionError, ArithmeticError):
        return False


def _evaluate(n: Any, env: dict) -> Any:
    """Int arithmetic of the graph (``operator`` functions of sizes) with ``env`` read
    nodes replaced; other sizes read as traced; anything else raises ``TypeError``."""
    if not isinstance(n, torch.fx.Node):
        return n
    if n in env:
        return env[n]
    read = size_read(n)
    if read is not None:
        return tensor_shapes(read[0])[read[1]]
    if n.op == "call_function" and getattr(n.target, "__module__", "") in ("_operator", "operator"):
        return n.target(*(_evaluate(a, env) for a in n.args))
    raise TypeError(f"not size arithmetic: {n.format_node()}")


def _tensor_pin_reasons(state: AnalysisState, roots: np.ndarray, pinned: np.ndarray,
                        space_of: np.ndarray, space_roots: np.ndarray) -> dict:
    """Why each parameter dim with pinned units is pinned (for errors about refused cuts)."""
    out = {}
    for key, units in state.tensors.items():
        if key not in state.tensor_users:
            continue  # a tensor of another graph
        r = roots[units]
        bad = pinned[r]
        if not bad.any():
            continue
        spaces = np.unique(space_roots[space_of[r[bad]]]).tolist()
        reasons = [x for s in spaces for x in state.store.pin_reasons.get(s, ())]
        if reasons:
            out[key] = tuple(dict.fromkeys(reasons))[:6]
    return out


def _alias_table(state: AnalysisState) -> dict[str, tuple[str, ...]]:
    """Canonical FQN -> every FQN of the same tensor (tied weights are sliced once)."""
    table: dict[str, list[str]] = {}
    for name, canonical in state.aliases.items():
        table.setdefault(canonical, []).append(name)
    return {c: tuple(names) for c, names in table.items() if len(names) > 1}


def _make_groups(state, spaces, counts, group_of, local_of, node_labels, tensor_labels):
    store = state.store
    members: dict[int, list[Member]] = {i: [] for i in range(len(spaces))}
    for (fqn, dim), lab in tensor_labels.items():
        inside = lab >= 0
        for gid in np.unique(group_of[lab[inside]]).tolist():
            local = np.full(len(lab), -1, dtype=np.int64)
            mine = inside.copy()
            mine[inside] = group_of[lab[inside]] == gid
            local[mine] = local_of[lab[mine]]
            members[gid].append(Member(fqn, dim, state.roles.get((fqn, dim), "dep"), local))
    nodes: dict[int, list[str]] = {i: [] for i in range(len(spaces))}
    for name, info in node_labels.items():
        for lab in iter_units(info):
            for gid in np.unique(group_of[lab[lab >= 0]]).tolist():
                if not nodes[gid] or nodes[gid][-1] != name:
                    nodes[gid].append(name)
    by_name = {n.name: n for n in state.gm.graph.nodes}
    position = {name: i for i, name in enumerate(by_name)}
    groups = []
    for gid, space in enumerate(spaces.tolist()):
        mem = tuple(sorted(members[gid], key=lambda m: ("out", "in", "dep").index(m.role)))
        node_set = set(nodes[gid])
        users = tuple((f"{m.fqn}[{m.dim}]", user) for m in mem
                      for user in state.tensor_users.get((m.fqn, m.dim), ()))
        ends = node_set | {user for _, user in users}  # consumers end the group's edges
        edges = tuple((a.name, name) for name in sorted(ends, key=position.__getitem__)
                      for a in by_name[name].all_input_nodes if a.name in node_set)
        inexact = tuple(store.inexact.get(space, ()))
        groups.append(ChannelGroup(
            id=gid, size=int(counts[gid]), granularity=_granularity(mem),
            exact=not inexact, members=mem, nodes=tuple(nodes[gid]), edges=edges,
            merged_by=tuple(dict.fromkeys(store.merged_by.get(space, ()))),
            inexact_because=tuple(dict.fromkeys(inexact)),
            inexact_kinds=tuple(sorted(set(store.inexact_kinds.get(space, ())))),
            pinned_because=tuple(dict.fromkeys(store.pin_reasons.get(space, ()))),
            origin=store.space_origin[space], slice_users=users))
    return tuple(groups)


def _granularity(members: tuple[Member, ...]) -> int:
    for m in members:
        inside = m.units[m.units >= 0]
        if len(inside):
            return int(round(len(inside) / len(np.unique(inside))))
    return 1


def graph_fingerprint(gm: torch.fx.GraphModule) -> str:
    """Hash of the graph's structure and its tensors' shapes (not their values)."""
    h = hashlib.sha256()
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else getattr(
            node.target, "__qualname__", None) or str(node.target)
        text = f"{node.op}|{node.name}|{target}|{node.args}|{node.kwargs}\n"
        h.update(re.sub(r" at 0x[0-9a-fA-F]+", "", text).encode())
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
    return h.hexdigest()[:16]
