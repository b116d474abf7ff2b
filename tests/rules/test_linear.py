"""Linear maps (passes/rules/linear.py): nn.Linear, F.linear on get_attr weights,
Embedding, contractions (matmul) and tied weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


def members(group):
    return {(m.fqn, m.dim, m.role) for m in group.members}


def units(group, fqn, dim):
    (m,) = [m for m in group.members if m.fqn == fqn and m.dim == dim]
    return m.units.tolist()


class MLP(nn.Module):
    def __init__(self, h1: int = 6, h2: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, 3)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(torch.relu(self.fc1(x)))))


def test_mlp_groups():
    a = fxprune.analyze(MLP(), torch.randn(2, 4))
    g1, g2 = a.groups
    assert members(g1) == {("fc1.weight", 0, "out"), ("fc1.bias", 0, "dep"),
                           ("fc2.weight", 1, "in")}
    assert members(g2) == {("fc2.weight", 0, "out"), ("fc2.bias", 0, "dep"),
                           ("fc3.weight", 1, "in")}
    assert (g1.size, g2.size) == (6, 5) and g1.exact and g2.exact


def test_mlp_golden(check_pruned):
    """Before: Linear(4,6)-Linear(6,5)-Linear(5,3); keep [1,2,5] and [0,3] ->
    Expected: Linear(4,3)-Linear(3,2)-Linear(2,3) holding the kept rows/columns."""
    before = MLP()
    x = torch.randn(3, 4)
    a = fxprune.analyze(before, x)
    plan = fxprune.Plan.from_indices(a, {"fc1.weight[0]": [1, 2, 5], "fc2.weight[0]": [0, 3]})
    small = check_pruned(before, x, plan).small
    expected = MLP(3, 2)
    k1, k2 = torch.tensor([1, 2, 5]), torch.tensor([0, 3])
    with torch.no_grad():
        expected.fc1.weight.copy_(before.fc1.weight[k1])
        expected.fc1.bias.copy_(before.fc1.bias[k1])
        expected.fc2.weight.copy_(before.fc2.weight[k2][:, k1])
        expected.fc2.bias.copy_(before.fc2.bias[k2])
        expected.fc3.weight.copy_(before.fc3.weight[:, k2])
        expected.fc3.bias.copy_(before.fc3.bias)
        torch.testing.assert_close(small(x), expected(x), rtol=1e-6, atol=1e-6)
    assert [(l.in_features, l.out_features) for l in (small.fc1, small.fc2, small.fc3)] == \
        [(4, 3), (3, 2), (2, 3)]


def test_linear_on_3d_input_uses_last_dim(check_pruned):
    before = MLP()
    x = torch.randn(2, 7, 4)
    a = fxprune.analyze(before, x)
    assert [g.size for g in a.groups] == [6, 5]
    check_pruned(before, x, fxprune.Plan.from_ratio(a, 0.5))


class FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4))
        self.b1 = nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(3, 6))

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.w1, self.b1)), self.w2)


def test_functional_linear_on_get_attr_weights(check_pruned):
    before = FunctionalLinear()
    x = torch.randn(2, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert (g.name, g.size) == ("w1[0]", 6)
    assert members(g) == {("w1", 0, "out"), ("b1", 0, "dep"), ("w2", 1, "in")}
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [5, 1]})).small
    assert torch.equal(small.w1, before.w1[[1, 5]])
    assert torch.equal(small.w2, before.w2[:, [1, 5]])


def test_embedding_produces_columns(check_pruned):
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(10, 6)
            self.l = nn.Linear(6, 2)

        def forward(self, i):
            return self.l(torch.relu(self.e(i)))

    before = Emb()
    i = torch.randint(0, 10, (2, 5))
    a = fxprune.analyze(before, i)
    (g,) = a.groups
    # The vocabulary (dim 0) is never pruned; dim 1 starts the space.
    assert members(g) == {("e.weight", 1, "out"), ("l.weight", 1, "in")}
    small = check_pruned(before, i, fxprune.Plan.from_indices(a, {g.id: [0, 2, 4]})).small
    assert small.e.weight.shape == (10, 3) and small.e.embedding_dim == 3
    assert small.e.num_embeddings == 10
    assert small.l.in_features == 3


def test_functional_embedding_on_get_attr(check_pruned):
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 6))
            self.l = nn.Linear(6, 2)

        def forward(self, i):
            return self.l(F.embedding(i, self.table))

    before = Emb()
    i = torch.randint(0, 10, (3,))
    a = fxprune.analyze(before, i)
    (g,) = a.groups
    assert members(g) == {("table", 1, "out"), ("l.weight", 1, "in")}
    small = check_pruned(before, i, fxprune.Plan.from_indices(a, {g.id: [1, 2]})).small
    assert small.table.shape == (10, 2)


def test_linear_over_tokens_after_transpose():
    """Linear(5, 3) mixes tokens after a transpose: the channel space (6) goes through both
    transposes untouched; the token dim comes from the model input and is never pruned."""
    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 6)
            self.tok = nn.Linear(5, 3)
            self.c = nn.Linear(6, 2)

        def forward(self, x):  # B, 5, 8
            return self.c(self.tok(self.a(x).transpose(1, 2)).transpose(1, 2))

    a = fxprune.analyze(T(), torch.randn(2, 5, 8))
    (g,) = a.groups
    assert members(g) == {("a.weight", 0, "out"), ("a.bias", 0, "dep"), ("c.weight", 1, "in")}
    assert {"transpose", "tok", "transpose_1"} <= set(g.nodes)


def test_tied_linear_used_twice_is_not_prunable():
    """Applying one Linear(6, 6) twice ties its rows to its columns, and its columns read
    the model input: the whole space is pinned."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 2)

        def forward(self, x):
            return self.b(self.a(torch.relu(self.a(x))))

    assert fxprune.analyze(Tied(), torch.randn(3, 6)).groups == ()


def test_matmul_with_parameter_contracts_channels(check_pruned):
    """x @ W.T with W a parameter: contraction couples x's channels with W's columns."""
    class MM(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.w = nn.Parameter(torch.randn(3, 6))

        def forward(self, x):
            return torch.matmul(self.a(x), self.w.t())

    before = MM()
    x = torch.randn(2, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert members(g) == {("a.weight", 0, "out"), ("a.bias", 0, "dep"), ("w", 1, "dep")}
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 3, 5]}))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bias_follows_rows(check_pruned, bias):
    before = nn.Sequential(nn.Linear(4, 5, bias=bias), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(2, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert (("0.bias", 0, "dep") in members(g)) == bias
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [4]})).small
    assert small.get_submodule("0").weight.shape == (1, 4)
