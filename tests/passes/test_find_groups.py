"""The analysis pass (passes/find_groups.py): purity, barriers and strict mode, pinned
outputs, fingerprints, labels, split_policy."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from passes.find_groups import find_groups, graph_fingerprint
from passes.shape_prop import propagate_shapes


def members(group):
    return {(m.fqn, m.dim, m.role) for m in group.members}


@torch.fx.wrap
def mystery(x):
    return x.flip(1)


class WithUnknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(self.b(mystery(self.a(x))))


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


X = torch.randn(1, 3, 4, 4)


def traced(model, x=X):
    gm = fxprune.trace(model)
    propagate_shapes(gm, (x,))
    return gm


# ----------------------------------------------------------------------------------
def test_find_groups_is_pure():
    gm = traced(Chain())
    code, nodes = gm.code, [(n.name, n.op, n.target, n.args) for n in gm.graph.nodes]
    metas = {n.name: set(n.meta) for n in gm.graph.nodes}
    params = {k: v.clone() for k, v in gm.state_dict().items()}
    a = find_groups(gm)
    assert a.gm is gm
    assert gm.code == code
    assert [(n.name, n.op, n.target, n.args) for n in gm.graph.nodes] == nodes
    assert {n.name: set(n.meta) for n in gm.graph.nodes} == metas
    assert all(torch.equal(params[k], v) for k, v in gm.state_dict().items())
    again = find_groups(gm)
    assert [(g.name, g.size, members(g)) for g in again.groups] == \
        [(g.name, g.size, members(g)) for g in a.groups]


def test_groups_are_numbered_in_birth_order_and_named_by_their_source():
    a = fxprune.analyze(Chain(), X)
    assert [(g.id, g.name, g.size) for g in a.groups] == [(0, "a.weight[0]", 6),
                                                          (1, "b.weight[0]", 4)]
    assert a.group("b.weight[0]") is a.groups[1] and a.group(1) is a.groups[1]
    with pytest.raises(KeyError):
        a.group("c.weight[0]")  # c's output is the model output: never a group
    assert a.groups[0].origin == "a.weight[0]"  # the space was born as a's weight rows


def test_labels_are_consistent_with_members():
    a = fxprune.analyze(Chain(), X)
    assert len(a.group_of) == len(a.local_of) == a.num_units == 10
    for g in a.groups:
        for m in g.members:
            lab = a.tensor_labels[(m.fqn, m.dim)]
            inside = m.units >= 0
            assert (a.group_of[lab[inside]] == g.id).all()
            assert (a.local_of[lab[inside]] == m.units[inside]).all()
    # the conv activation a carries group 0's labels on dim 1 only
    assert set(a.node_labels["a"]) == {1}
    assert (a.group_of[a.node_labels["a"][1]] == 0).all()
    assert a.node_labels["x"] == {}   # a model input is tracked on no dim


def test_split_policy_must_be_known():
    with pytest.raises(ValueError, match="split_policy"):
        find_groups(traced(Chain()), split_policy="middle")


# ----------------------------------------------------------------------------------
# Barriers, strict mode, outputs
# ----------------------------------------------------------------------------------
def test_unknown_op_is_a_barrier():
    """mystery() has no rule: a's channels flowing into it are pinned (never guessed);
    b's space, which never touches it, is still a group."""
    a = fxprune.analyze(WithUnknown(), X)
    assert a.barriers == ("mystery",)
    (g,) = a.groups
    assert members(g) == {("b.weight", 0, "out"), ("b.bias", 0, "dep"), ("c.weight", 1, "in")}


def test_strict_mode_raises_naming_the_node():
    with pytest.raises(fxprune.UnsupportedOpError) as info:
        fxprune.analyze(WithUnknown(), X, strict=True)
    text = str(info.value)
    assert "node 'mystery'" in text
    assert "test_find_groups.py" in text and "fx/proxy.py" not in text  # the user's line
    assert "register a rule" in text and "strict=False" in text


def test_strict_mode_ignores_unknown_ops_without_prunable_channels():
    """An unknown op on the model input carries no prunable channel: no error."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.b(self.a(mystery(x)))

    a = fxprune.analyze(M(), X, strict=True)
    assert [g.name for g in a.groups] == ["a.weight[0]"]


def test_leaf_module_without_rule_is_a_barrier():
    class Leafy(nn.Module):
        def forward(self, x):
            return x * 2

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.leaf = Leafy()
            self.b = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.b(self.leaf(self.a(x)))

    assert [g.name for g in fxprune.analyze(M(), X).groups] == ["a.weight[0]"]
    a = fxprune.analyze(M(), X, leaf_modules=(Leafy,))
    assert a.groups == () and a.barriers == ("leaf",)
    with pytest.raises(fxprune.UnsupportedOpError, match="leaf"):
        fxprune.analyze(M(), X, leaf_modules=(Leafy,), strict=True)


def test_model_output_is_pinned():
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y), y

    assert fxprune.analyze(TwoOut(), X).groups == ()


def test_partly_returned_space_keeps_its_other_units():
    """cat([a (4), b (6)]) feeds c, and y[:, :4] (a's part) is returned: a's units are
    pinned by the output, b's stay prunable and the group records why."""
    class Part(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 6, 1)
            self.c = nn.Conv2d(10, 2, 1)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            return self.c(y), y[:, :4]

    a = fxprune.analyze(Part(), X)
    (g,) = a.groups
    assert g.size == 6
    (w_a,) = [m for m in g.members if m.fqn == "a.weight"] or [None]
    assert w_a is None  # none of a's rows is prunable
    (w_c,) = [m for m in g.members if m.fqn == "c.weight"]
    assert w_c.units.tolist() == [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5]
    assert any("model output" in why for why in g.pinned_because)


# ----------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------
def test_fingerprint_depends_on_structure_and_shapes_not_values():
    f1 = graph_fingerprint(traced(Chain()))
    f2 = graph_fingerprint(traced(Chain()))   # other random weights
    assert f1 == f2
    wider = Chain()
    wider.b = nn.Conv2d(6, 5, 1)
    wider.c = nn.Conv2d(5, 2, 1)
    assert graph_fingerprint(traced(wider)) != f1
    assert graph_fingerprint(traced(WithUnknown())) != f1


def test_analysis_of_a_copy_has_the_same_fingerprint():
    model = Chain()
    assert fxprune.analyze(model, X).fingerprint == \
        fxprune.analyze(copy.deepcopy(model), X).fingerprint


# ----------------------------------------------------------------------------------
# split_policy
# ----------------------------------------------------------------------------------
class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 12)
        self.o = nn.Linear(12, 8)

    def forward(self, x):
        b, n, _ = x.shape
        return self.o(torch.relu(self.q(x).view(b, n, 3, 4)).flatten(2))


@pytest.mark.parametrize("policy", ["inner", "outer"])
def test_split_policy_picks_the_prunable_axis(policy):
    a = fxprune.analyze(Heads(), torch.randn(2, 5, 8), split_policy=policy)
    (g,) = a.groups
    (q,) = [m for m in g.members if m.fqn == "q.weight" and m.dim == 0]
    f = np.arange(12)
    want = f % 4 if policy == "inner" else f // 4
    assert q.units.tolist() == want.tolist()
    assert q.index_map == ("x3 strided" if policy == "inner" else "x4 blocks")
