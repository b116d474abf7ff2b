"""Rewrite pass: bake constant-default placeholders into the graph.

Requires: a GraphModule and the number of inputs the caller passes (``n_inputs``).
Ensures: a deep copy in which every placeholder after the first ``n_inputs`` whose default
is a constant (``None``, ``bool``, ``int``, ``float``, ``str``) is erased and its uses read
the constant; ``graph.lint()`` passes. The module computes what the source computes when
called with ``n_inputs`` inputs. Exporters that trace with tensors only (the legacy
``torch.onnx`` exporter, ``torch.jit.trace``) need this: a traced timm ViT keeps
``attn_mask=None, is_causal=False`` as inputs, and ``is_causal`` arrives as a tensor.

Before/after (timm ViT)::

    attn_mask = placeholder[target=attn_mask](default=None)       ->  (erased)
    is_causal = placeholder[target=is_causal](default=False)      ->  (erased)
    sdpa = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
                              ->  sdpa = scaled_dot_product_attention(q, k, v, attn_mask=None,
                                                                      is_causal=False)
"""
from __future__ import annotations

import copy

import torch.fx

from fxprune.core.errors import RewriteError
from fxprune.core.pipeline import checked_pass, ensure_new_module

__all__ = ["bake_constants", "CONSTANT_TYPES"]

CONSTANT_TYPES = (type(None), bool, int, float, str)


def requires_inputs(gm: torch.fx.GraphModule, n_inputs: int) -> None:
    """Every placeholder the caller does not pass has a default to bake."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    missing = [n.name for n in holders[n_inputs:] if not n.args]
    if missing:
        raise RewriteError(f"bake_constants: placeholders {missing} have no default: pass "
                           f"them as inputs (got {n_inputs} of {len(holders)})")


def ensures_baked(new: torch.fx.GraphModule, gm: torch.fx.GraphModule, n_inputs: int) -> None:
    """A new module whose baked placeholders are gone."""
    ensure_new_module(new, gm)
    left = [n for n in new.graph.nodes if n.op == "placeholder"][n_inputs:]
    if any(n.args and isinstance(n.args[0], CONSTANT_TYPES) for n in left):
        raise AssertionError(f"constant placeholders left: {[n.name for n in left]}")


@checked_pass(requires=requires_inputs, ensures=ensures_baked, error_type=RewriteError)
def bake_constants(gm: torch.fx.GraphModule, n_inputs: int) -> torch.fx.GraphModule:
    """A copy of ``gm`` with the constant defaults of its unpassed placeholders inlined.

    ``n_inputs``: how many positional inputs the caller passes; later placeholders with a
    constant default are baked. Raises ``RewriteError`` (debug checks) when one of them
    has no default. Placeholders with tensor defaults are left as they are.
    """
    new = copy.deepcopy(gm)
    holders = [n for n in new.graph.nodes if n.op == "placeholder"]
    for node in holders[n_inputs:]:
        if node.args and isinstance(node.args[0], CONSTANT_TYPES):
            _inline(node, node.args[0])
            new.graph.erase_node(node)
    new.graph.lint()
    new.recompile()
    return new


def _inline(node: torch.fx.Node, value: object) -> None:
    """Every user of ``node`` reads ``value`` instead (a constant, not a Node)."""
    def swap(arg: torch.fx.Node) -> object:
        return value if arg is node else arg

    for user in list(node.users):
        user.args = torch.fx.node.map_arg(user.args, swap)
        user.kwargs = torch.fx.node.map_arg(user.kwargs, swap)
