"""Reductions and softmax (passes/rules/reduce.py): summing a channel dim consumes it,
other reductions over it pin it, softmax over it makes the group inexact."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune


def members(group):
    return {(m.fqn, m.dim, m.role) for m in group.members}


class Reduce(nn.Module):
    def __init__(self, op, n_out: int) -> None:
        super().__init__()
        self.op = op
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(n_out, 2)

    def forward(self, x):  # B, 5, 8
        return self.b(self.op(self.a(x)))


PINNING = [
    lambda y: y.amax(-1), lambda y: y.max(-1)[0], lambda y: y.norm(dim=-1),
    lambda y: torch.logsumexp(y, -1), lambda y: y.prod(2), lambda y: y.amin(-1, keepdim=True)[..., 0],
]


@pytest.mark.parametrize("op", PINNING, ids=[str(i) for i in range(len(PINNING))])
def test_reductions_over_channels_pin(op):
    """max/norm/logsumexp/... over the channel dim: a removed channel (a zero in the masked
    model) changes every output, and no rule makes that legal: the space is pinned."""
    a = fxprune.analyze(Reduce(op, 5), torch.randn(2, 5, 8))
    assert a.groups == ()


STATISTICS = [
    ("mean", lambda y: y.mean(-1)), ("var", lambda y: y.var(-1)), ("std", lambda y: y.std(2)),
    ("mean", lambda y: (y - y.mean(dim=2, keepdim=True)).sum(-1)),
]


@pytest.mark.parametrize("name,op", STATISTICS, ids=[str(i) for i in range(len(STATISTICS))])
def test_statistics_over_channels_are_channel_mixers(check_pruned, name, op):
    """GLOSSARY: mean/var over the channel dim is a channel mixer without weights: pruning
    through it is legal (the output has no channel dim left) but not exact."""
    before = Reduce(op, 5)
    x = torch.randn(2, 5, 8)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert not g.exact
    assert any(name in why for why in g.inexact_because)
    assert members(g) == {("a.weight", 0, "out"), ("a.bias", 0, "dep")}
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1, 2, 3]}))


@pytest.mark.parametrize("op", [lambda y: y.sum(-1), lambda y: torch.sum(y, dim=2),
                                lambda y: y.sum(-1, keepdim=True).squeeze(-1)])
def test_sum_over_channels_consumes_them(check_pruned, op):
    """sum over the channel dim: removed channels are zeros in the masked model and add
    nothing, so the sum is a consumer (exact) and a's rows stay prunable."""
    before = Reduce(op, 5)
    x = torch.randn(2, 5, 8)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert g.exact
    assert members(g) == {("a.weight", 0, "out"), ("a.bias", 0, "dep")}
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 4]})).small
    assert small.a.out_features == 2 and small.b.in_features == 5


def test_mean_over_spatial_dims_keeps_channels(check_pruned):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.l = nn.Linear(6, 2)

        def forward(self, x):
            return self.l(self.a(x).mean((2, 3)))

    before = M().eval()
    x = torch.randn(2, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert members(g) == {("a.weight", 0, "out"), ("a.bias", 0, "dep"), ("l.weight", 1, "in")}
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1, 5]}))


@pytest.mark.parametrize("softmax", [lambda y: torch.softmax(y, -1), lambda y: y.softmax(dim=2),
                                     nn.Softmax(dim=-1), nn.LogSoftmax(dim=2)])
def test_softmax_over_channels_is_inexact(check_pruned, softmax):
    before = Reduce(softmax, 6)
    x = torch.randn(2, 5, 8)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert not g.exact
    assert any("softmax" in why for why in g.inexact_because)
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 1, 2]}))


def test_softmax_over_another_dim_is_exact(check_pruned):
    before = Reduce(lambda y: torch.softmax(y, 1), 6)
    x = torch.randn(2, 5, 8)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert g.exact
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [3]}))
