"""Rewrite pass: remove residual blocks (``y = x + f(x)`` becomes ``y = x``).

Requires: a GraphModule and ``Block``s found on it (``passes.find_blocks``).
Ensures: a deep copy where every use of each block's output reads its input instead,
the block's nodes are erased, and the submodules, parameters and buffers that only
those nodes read are deleted; ``graph.lint()`` passes. The module it returns computes
what the original computes with every removed branch ``f(x)`` zeroed
(``passes.mask.mask_blocks``, the oracle).

Before/after (one ViT layer removed)::

    norm1 = self.blocks.3.norm1(add_5)
    attn = self.blocks.3.attn(norm1)            ->      (erased)
    add_6 = add_5 + attn                        ->      (erased)
    ... add_7 = add_6 + mlp                     ->      norm1_4 = self.blocks.4.norm1(add_5)
    norm1_4 = self.blocks.4.norm1(add_7)
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.fx

from fxprune.core.errors import RewriteError
from fxprune.core.pipeline import checked_pass, ensure_new_module
from passes.find_blocks import Block

__all__ = ["remove_blocks"]


def ensures_removed(new: torch.fx.GraphModule, gm: torch.fx.GraphModule,
                    blocks: Iterable[Block]) -> None:
    """A new module in which no removed block's output node is left."""
    ensure_new_module(new, gm)
    left = {n.name for n in new.graph.nodes} & {b.output for b in blocks}
    if left:
        raise AssertionError(f"removed blocks' outputs still in the graph: {sorted(left)[:3]}")


@checked_pass(ensures=ensures_removed, error_type=RewriteError)
def remove_blocks(gm: torch.fx.GraphModule, blocks: Iterable[Block]) -> torch.fx.GraphModule:
    """Return a copy of ``gm`` without ``blocks`` (a block nested in another goes with it)."""
    blocks = list(blocks)
    new = copy.deepcopy(gm)
    new.meta = dict(getattr(gm, "meta", {}))
    by_name = {n.name: n for n in new.graph.nodes}
    for block in blocks:
        missing = [n for n in (block.input, block.output, *block.nodes) if n not in by_name]
        if missing:
            raise RewriteError(f"block {block.name!r} does not belong to this graph (no node "
                               f"{missing[0]!r}): find blocks on the module you rewrite")
    erased: set[str] = set()
    replaced: dict[str, torch.fx.Node] = {}  # removed output -> the node now in its place
    for block in sorted(blocks, key=lambda b: -len(b.nodes)):  # outer blocks first
        if block.output in erased:
            continue  # inside a block removed already
        x = by_name[block.input]
        while x.name in replaced:  # chained blocks: the previous one is gone already
            x = replaced[x.name]
        _erase(new.graph, by_name, block, x, erased)
        replaced[block.output] = x
    _delete_unused_tensors(new, [b.params for b in blocks])
    new.delete_all_unused_submodules()
    new.graph.lint()
    new.recompile()
    return new


def _erase(graph: torch.fx.Graph, by_name: dict, block: Block, x: torch.fx.Node,
           erased: set[str]) -> None:
    body = {by_name[n] for n in block.nodes if n not in erased}
    by_name[block.output].replace_all_uses_with(x)
    for node in reversed(list(graph.nodes)):
        if node not in body:
            continue
        if node.users:
            outside = [u.name for u in node.users if u not in body]
            raise RewriteError(f"block {block.name!r}: node {node.name!r} is still used by "
                               f"{outside}; the block is not private to its branch")
        graph.erase_node(node)
        erased.add(node.name)


def _delete_unused_tensors(gm: torch.fx.GraphModule, params: list[tuple[str, ...]]) -> None:
    """Parameters/buffers that only removed nodes read (``get_attr`` targets) go too."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    used_modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for fqn in {p for group in params for p in group}:
        owner, _, name = fqn.rpartition(".")
        if fqn in read or any(owner == m or owner.startswith(m + ".") for m in used_modules):
            continue
        try:
            mod = gm.get_submodule(owner) if owner else gm
        except AttributeError:
            continue  # its module is gone already
        if name in mod._parameters:
            del mod._parameters[name]
        elif name in mod._buffers:
            del mod._buffers[name]
