"""One op entry per op (passes/rules/registry.py ``OPS``): every calling form of an op
reaches the same entry, and every stop op carries its MAC rule next to its analysis rule."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import passes.rules  # noqa: F401  (registers the families)
from passes.rules.registry import OPS, OpEntry, lookup, op_entry, op_key

aten = torch.ops.aten


def stop_ops_without_macs(ops: dict) -> list:
    return [key for key, entry in ops.items() if entry.stop and entry.macs is None]


def test_every_stop_op_has_a_mac_rule():
    assert stop_ops_without_macs(OPS) == []


def test_the_glossary_stop_ops_are_marked_stop():
    """Guards the test above against passing vacuously: the stop ops are flagged."""
    for key in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear, nn.Embedding,
                nn.MultiheadAttention, nn.LSTM, nn.GRU, "conv", "convolution", "linear",
                "embedding", "addmm"):
        assert OPS[key].stop, key
    assert not OPS["relu"].stop and not OPS["add"].stop


def contracting_ops_without_contractions(ops: dict) -> list:
    """Entries whose analysis rule calls ``contract(`` (a summed-over axis pair) but that
    declare no ``contractions`` rule: gates.py would not see the q.k-style consumption."""
    import inspect

    return [key for key, entry in ops.items() if entry.rule is not None
            and entry.contractions is None and "contract(" in inspect.getsource(entry.rule)]


def test_every_contracting_op_declares_its_contractions():
    assert contracting_ops_without_contractions(OPS) == []
    for key in ("matmul", "mm", "bmm", "linear", "addmm", "einsum",
                "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                nn.LSTM, nn.GRU, nn.RNN):
        assert OPS[key].contractions is not None, key
    fake = {"my_mm": OpEntry("my_mm", rule=_contracting_rule)}
    assert contracting_ops_without_contractions(fake) == ["my_mm"]


def _contracting_rule(ctx) -> None:
    from passes.rules.linear import contract

    contract(ctx, None, None)


def test_a_stop_op_without_macs_is_reported():
    fake = {"my_conv": OpEntry("my_conv", rule=lambda ctx: None, stop=True)}
    assert stop_ops_without_macs(fake) == ["my_conv"]


def test_registering_twice_fills_one_entry():
    from passes.rules.registry import ANALYSIS_RULES, MAC_RULES, macs, rule

    key = "_test_only_op"
    try:
        rule(key, stop=True)(lambda ctx: None)
        assert key in ANALYSIS_RULES and key not in MAC_RULES
        macs(key)(lambda ctx: [])
        assert op_entry(key).macs is MAC_RULES[key] and op_entry(key).stop
    finally:
        OPS.pop(key, None)


# -- calling forms ---------------------------------------------------------------------
def _nodes(forms: list, module: nn.Module | None, n_inputs: int = 1):
    """One node per calling form ('method:name' for Tensor methods), and the module form."""
    root = nn.Module()
    if module is not None:
        root.m = module
    g = torch.fx.Graph()
    xs = [g.placeholder(f"x{i}") for i in range(n_inputs)]
    nodes = []
    for form in forms:
        if isinstance(form, str) and form.startswith("method:"):
            nodes.append(g.call_method(form[len("method:"):], tuple(xs)))
        else:
            nodes.append(g.call_function(form, tuple(xs)))
    mod_node = g.call_module("m", tuple(xs)) if module is not None else None
    return torch.fx.GraphModule(root, g), nodes, mod_node


FAMILIES = {
    "elementwise (unary)": ([F.relu, torch.relu, "method:relu", "method:relu_", aten.relu.default,
                             aten.relu_.default], nn.ReLU(), 1),
    "elementwise (binary)": ([operator.add, operator.iadd, torch.add, "method:add",
                              "method:add_", aten.add.Tensor], None, 2),
    "conv": ([F.conv2d, torch.conv2d, aten.conv2d.default, F.conv1d], nn.Conv2d(2, 2, 1), 2),
    "linear": ([F.linear, torch._C._nn.linear, aten.linear.default], nn.Linear(2, 2), 2),
    "norm": ([F.batch_norm, torch.batch_norm, aten.batch_norm.default], nn.BatchNorm2d(2), 1),
    "pool": ([F.max_pool2d, torch.max_pool2d, aten.max_pool2d.default], nn.MaxPool2d(2), 1),
    "shape": ([torch.flatten, "method:flatten", aten.flatten.using_ints], nn.Flatten(), 1),
    "permute": ([torch.permute, "method:permute", aten.permute.default], None, 1),
    "reduce": ([torch.mean, "method:mean", aten.mean.dim], None, 1),
    "attention": ([F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default],
                  None, 3),
    "embedding": ([F.embedding, aten.embedding.default], nn.Embedding(3, 2), 2),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_calling_form_reaches_one_entry(family):
    forms, module, n_inputs = FAMILIES[family]
    gm, nodes, mod_node = _nodes(forms, module, n_inputs)
    keys = [op_key(n) for n in nodes]
    assert len(set(keys)) == 1, dict(zip(map(str, forms), keys))
    entry = OPS.get(keys[0])
    assert entry is not None and entry.rule is not None, keys[0]
    assert {id(lookup(n, gm, "rule")) for n in nodes} == {id(entry.rule)}
    if mod_node is not None:
        rule = lookup(mod_node, gm, "rule")
        assert rule is not None
        # the module form lives in the same family file, with a MAC rule iff the function has
        assert rule.__module__ == entry.rule.__module__, (rule, entry.rule)
        assert (lookup(mod_node, gm, "macs") is None) == (entry.macs is None)
