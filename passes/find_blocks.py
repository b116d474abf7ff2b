"""Analysis pass: residual blocks ``y = x + f(x)`` whose skip is an identity.

Requires: a GraphModule (``tensor_meta`` on its nodes to rule out broadcasting adds).
Ensures: a tuple of frozen ``Block``s, keyed by node names and parameter FQNs; ``gm`` is
not mutated. A branch ``f`` qualifies when every node that depends on ``x`` on the way
to ``f`` is used only inside the branch (one entry ``x``, one exit ``y``): removing the
block (``y`` -> ``x``) then erases exactly those nodes and the parameters only they read.
With ``level="layer"`` consecutive blocks of one module (a transformer layer's attention
and MLP halves) are merged into one.

Before/after (what is found)::

    norm1 = self.blocks.0.norm1(x)      # \\
    attn = self.blocks.0.attn(norm1)    #  } f(x): nodes depending on x, used only here
    add = x + attn                      # y = x + f(x): Block(input="x", output="add")
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from passes.rules.registry import op_key

__all__ = ["Block", "find_blocks"]


@dataclass(frozen=True)
class Block:
    """A removable residual block: ``output = input + branch(input)`` (one or more branches).

    ``nodes`` are erased when the block is removed (``output`` is replaced by ``input``);
    ``params`` are the parameter/buffer FQNs that only those nodes read.
    """

    name: str
    input: str
    output: str
    residuals: tuple[str, ...]
    branches: tuple[str, ...]
    nodes: tuple[str, ...]
    params: tuple[str, ...]
    num_params: int


def find_blocks(gm: torch.fx.GraphModule, *, level: str = "layer") -> tuple[Block, ...]:
    """Every residual block with an identity skip, in graph order.

    ``level="layer"``: blocks chained inside one module (``x1 = x + attn(x)``,
    ``x2 = x1 + mlp(x1)`` in a transformer layer) are merged; ``"branch"``: one per add.
    """
    if level not in ("layer", "branch"):
        raise ValueError("level must be 'layer' (merge chained blocks of one module) or "
                         "'branch' (one block per residual add)")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found = [b for n in gm.graph.nodes if (b := _residual(gm, n, order)) is not None]
    # a branch that reads no parameter is arithmetic, not a layer (GPT-2's tanh GELU
    # computes x + 0.044715 * x**3): removing it would change an activation function
    found = [parts for parts in found if _reads_parameters(gm, parts[-1])]
    if level == "layer":
        found = _merge_layers(found)
    return tuple(_finish(gm, order, *parts) for parts in found)


def _reads_parameters(gm: torch.fx.GraphModule, body: set) -> bool:
    return any(n.op == "get_attr" and isinstance(_attr(gm, n.target), torch.nn.Parameter)
               or n.op == "call_module"
               and next(gm.get_submodule(n.target).parameters(), None) is not None
               for n in body)


def _attr(gm: torch.fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name, None)


# ----------------------------------------------------------------------------------
_Parts = tuple  # (owner, x, y, residual adds, branch outputs, erased nodes)


def _residual(gm: torch.fx.GraphModule, y: torch.fx.Node, order: dict) -> _Parts | None:
    """(owner, x, y, (y,), (f,), body) when ``y = x + f(x)`` with a private branch (the
    skip may pass through ``nn.Identity`` modules: ``x + self.shortcut(x)``)."""
    if y.op not in ("call_function", "call_method") or op_key(y) != "add" or y.kwargs:
        return None
    args = [a for a in y.args if isinstance(a, torch.fx.Node)]
    if len(args) != 2 or len(y.args) != 2 or args[0] is args[1]:
        return None
    shape = _shape(y)
    if shape is None or any(_shape(a) != shape for a in args):
        return None  # a broadcast add is no identity skip
    for x, f in (args, args[::-1]):
        for entry in _identity_chain(gm, x):
            body = _branch_body(entry, f, y, order)
            if body is not None:
                return _owner(y), x, y, (y,), (f,), body
    return None


def _identity_chain(gm: torch.fx.GraphModule, x: torch.fx.Node) -> list[torch.fx.Node]:
    """``x`` and what it is an ``nn.Identity`` of, nearest first (the branch's entry)."""
    chain = [x]
    while x.op == "call_module" and isinstance(gm.get_submodule(x.target), torch.nn.Identity) \
            and isinstance(x.args[0], torch.fx.Node):
        x = x.args[0]
        chain.append(x)
    return chain


def _branch_body(x: torch.fx.Node, f: torch.fx.Node, y: torch.fx.Node,
                 order: dict) -> set | None:
    """Nodes of f that go with it: those depending on x (single entry x, single exit y),
    plus inputs and dead ends (asserts) used by nothing else."""
    if order[x] >= order[f]:
        return None
    ancestors: set = set()
    stack = [f]
    while stack:
        n = stack.pop()
        if n in ancestors or n is x:
            continue
        ancestors.add(n)
        stack.extend(n.all_input_nodes)
    depends = {x}
    for n in sorted(ancestors, key=order.__getitem__):
        if any(a in depends for a in n.all_input_nodes):
            depends.add(n)
    core = depends - {x}
    if f not in core or any(n.op in ("placeholder", "output") for n in core):
        return None
    body = set(core) | _dead_ends(core, x, y, order)
    for n in body:
        if any(u not in body and u is not y for u in n.users):
            return None
    if set(f.users) != {y}:
        return None
    # inputs of the branch that nothing else reads (get_attr parameters, constants)
    for n in sorted(ancestors - depends, key=order.__getitem__, reverse=True):
        if n.op != "placeholder" and n.users and all(u in body for u in n.users):
            body.add(n)
    return body


def _dead_ends(core: set, x: torch.fx.Node, y: torch.fx.Node, order: dict) -> set:
    """Nodes fed by the branch whose results nobody uses (``_assert`` on its shapes)."""
    reach: set = set()
    stack = [u for n in core for u in n.users if u not in core and u is not y]
    while stack:
        u = stack.pop()
        if u in reach or u is y:
            continue
        reach.add(u)
        stack.extend(u.users)
    dead: set = set()
    for u in sorted(reach, key=order.__getitem__, reverse=True):
        if u.op != "output" and all(w in dead for w in u.users):
            dead.add(u)
    return dead


def _owner(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path if isinstance(path, str) else ""
    return ""


def _merge_layers(found: list[_Parts]) -> list[_Parts]:
    """Chain ``x -> y1 -> y2`` when both adds belong to one module and y1 feeds only y2's block."""
    merged: list[_Parts] = []
    for part in found:
        owner, x, y, adds, branches, body = part
        if merged:
            p_owner, p_x, p_y, p_adds, p_branches, p_body = merged[-1]
            bridge = _bridge(p_y, x) if owner and owner == p_owner else None
            if bridge is not None:
                inner = {p_y, *bridge, *(u for n in (p_y, *bridge) for u in n.users
                                         if not u.users and u.op != "output")}
                if all(u in body or u is y or u in inner for n in inner for u in n.users):
                    merged[-1] = (owner, p_x, y, p_adds + adds, p_branches + branches,
                                  p_body | inner | body)
                    continue
        merged.append(part)
    return merged


_NO_OPS = {"to", "_to_copy", "contiguous", "clone", "alias"}


def _bridge(p_y: torch.fx.Node, x: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The nodes from ``p_y`` to ``x`` when each only forwards its input (a cast to the
    same dtype, as exported graphs have between a layer's two residual adds), else None."""
    chain = []
    while x is not p_y:
        src = x.args[0] if x.args else None
        if x.op not in ("call_function", "call_method") or op_key(x) not in _NO_OPS \
                or not isinstance(src, torch.fx.Node) or _meta(x) is None \
                or _meta(x) != _meta(src):
            return None
        chain.append(x)
        x = src
    return chain


def _meta(n: torch.fx.Node) -> tuple | None:
    meta = n.meta.get("tensor_meta")
    return (tuple(meta.shape), meta.dtype) if hasattr(meta, "dtype") else None


def _finish(gm: torch.fx.GraphModule, order: dict, owner: str, x, y, adds, branches,
            body: set) -> Block:
    erased = body | set(adds)
    params = _private_tensors(gm, erased)
    named = dict(gm.named_parameters())
    count = sum(named[p].numel() for p in params if p in named)
    nodes = tuple(n.name for n in sorted(erased, key=order.__getitem__))
    return Block(owner or y.name, x.name, y.name, tuple(a.name for a in adds),
                 tuple(f.name for f in branches), nodes, params, count)


def _private_tensors(gm: torch.fx.GraphModule, erased: set) -> tuple[str, ...]:
    """Parameter/buffer FQNs read by ``erased`` nodes and by no other node."""
    def tensors_of(n: torch.fx.Node) -> set[str]:
        if n.op == "get_attr":
            return {n.target}
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            return {f"{n.target}.{k}" for k, _ in
                    list(mod.named_parameters()) + list(mod.named_buffers())}
        return set()

    inside, outside = set(), set()
    for n in gm.graph.nodes:
        (inside if n in erased else outside).update(tensors_of(n))
    named = list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False))
    by_name = dict(named)
    read_outside = {id(by_name[o]) for o in outside if o in by_name}
    return tuple(sorted(t for t in inside
                        if t in by_name and id(by_name[t]) not in read_outside))


def _shape(n: torch.fx.Node) -> tuple | None:
    meta = n.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    if not meta.dtype.is_floating_point:
        return None
    return tuple(meta.shape)
