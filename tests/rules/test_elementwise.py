"""Elementwise rules (passes/rules/elementwise.py): unary pass-through (one family rule,
canonicalised targets), broadcasting coupling ops, broadcast-from-1 pins, PReLU."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


def members(group):
    return {(m.fqn, m.dim, m.role) for m in group.members}


class Residual(nn.Module):
    def __init__(self, combine=operator.add) -> None:
        super().__init__()
        self.combine = combine
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.head(self.combine(y, self.c2(torch.relu(self.c1(y)))))


@pytest.mark.parametrize("combine", [operator.add, operator.sub, operator.mul, torch.maximum,
                                     torch.minimum, torch.add, torch.sub])
def test_residual_couples_both_producers_and_all_consumers(check_pruned, combine):
    before = Residual(combine).eval()
    x = torch.randn(2, 3, 6, 6)
    a = fxprune.analyze(before, x)
    g_res, g_mid = a.groups
    assert members(g_res) == {("stem.weight", 0, "out"), ("stem.bias", 0, "dep"),
                              ("c2.weight", 0, "out"), ("c2.bias", 0, "dep"),
                              ("c1.weight", 1, "in"), ("head.weight", 1, "in")}
    assert g_res.size == 8 and g_res.exact
    assert members(g_mid) == {("c1.weight", 0, "out"), ("c1.bias", 0, "dep"),
                              ("c2.weight", 1, "in")}
    (coupling,) = [n for n in g_res.nodes if n not in ("stem", "relu", "c1", "c2", "head")]
    assert coupling in g_res.merged_by
    plan = fxprune.Plan.from_indices(a, {g_res.id: [0, 3, 7], g_mid.id: [5]})
    small = check_pruned(before, x, plan).small
    assert small.stem.out_channels == small.c2.out_channels == small.head.in_channels == 3
    assert small.c1.in_channels == 3 and small.c1.out_channels == 1


def test_residual_with_model_input_pins():
    """y = conv(x) + x: the conv's outputs meet the model input, which is never pruned."""
    class R(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)
            self.head = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.head(self.c(x) + x)

    assert fxprune.analyze(R(), torch.randn(1, 3, 4, 4)).groups == ()


# ----------------------------------------------------------------------------------
class SE(nn.Module):
    """x * sigmoid(fc2(relu(fc1(pool(x))))): the gate broadcasts over H, W only."""

    def __init__(self, linear: bool = True) -> None:
        super().__init__()
        self.linear = linear
        self.c = nn.Conv2d(3, 8, 1)
        mk = nn.Linear if linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.fc1, self.fc2 = mk(8, 4), mk(4, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.c(x)
        if self.linear:
            w = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
            return self.out(y * w[:, :, None, None])
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.out(y * w)


@pytest.mark.parametrize("linear", [True, False])
def test_se_broadcast_multiply_couples_gate_with_channels(check_pruned, linear):
    before = SE(linear).eval()
    x = torch.randn(2, 3, 5, 5)
    a = fxprune.analyze(before, x)
    g_x, g_se = a.groups
    assert members(g_x) == {("c.weight", 0, "out"), ("c.bias", 0, "dep"),
                            ("fc2.weight", 0, "out"), ("fc2.bias", 0, "dep"),
                            ("fc1.weight", 1, "in"), ("out.weight", 1, "in")}
    assert "mul" in g_x.merged_by
    assert members(g_se) == {("fc1.weight", 0, "out"), ("fc1.bias", 0, "dep"),
                             ("fc2.weight", 1, "in")}
    plan = fxprune.Plan.from_indices(a, {g_x.id: [1, 2, 6], g_se.id: [0, 3]})
    small = check_pruned(before, x, plan).small
    assert small.fc2.weight.shape[:2] == (3, 2)
    assert torch.equal(small.fc2.weight, before.fc2.weight[[1, 2, 6]][:, [0, 3]])


def test_broadcast_from_size_one_pins_the_size_one_side(check_pruned):
    """a(x) * g(x) with g producing 1 channel: g's single channel broadcasts and is pinned,
    a's channels are free (the broadcast side does not constrain them)."""
    class B1(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.g = nn.Conv2d(3, 1, 1)
            self.b = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.b(self.a(x) * torch.sigmoid(self.g(x)))

    before = B1().eval()
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert members(g) == {("a.weight", 0, "out"), ("a.bias", 0, "dep"), ("b.weight", 1, "in")}
    assert not any(m.fqn.startswith("g.") for m in g.members)
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 5]}))


def test_parameter_broadcast_from_size_one_on_channels_pins():
    """A (1, C, 1, 1) scale is per-channel and follows; a (1, 1, 1, 1) one does not."""
    class S(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.scale = nn.Parameter(torch.rand(1, 6, 1, 1))
            self.gain = nn.Parameter(torch.rand(1, 1, 1, 1))
            self.b = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.b(self.a(x) * self.scale * self.gain)

    a = fxprune.analyze(S(), torch.randn(1, 3, 4, 4))
    (g,) = a.groups
    assert ("scale", 1, "dep") in members(g)
    assert all(m.fqn != "gain" for m in g.members)


# ----------------------------------------------------------------------------------
UNARY = [
    ("module", nn.ReLU()), ("module", nn.GELU()), ("module", nn.SiLU()),
    ("module", nn.Hardswish()), ("module", nn.LeakyReLU(0.1)), ("module", nn.Dropout(0.5)),
    ("module", nn.Identity()), ("module", nn.Tanh()), ("module", nn.ReLU(inplace=True)),
    ("fn", F.relu), ("fn", torch.relu), ("fn", torch.sigmoid), ("fn", F.silu),
    ("fn", F.hardtanh), ("fn", torch.exp), ("fn", torch.abs), ("fn", torch.neg),
    ("fn", lambda t: t.relu()), ("fn", lambda t: t.relu_()), ("fn", lambda t: t.clamp(-1, 1)),
    ("fn", lambda t: t.contiguous()), ("fn", lambda t: t.to(t.device)), ("fn", lambda t: t.type_as(t)),
    ("fn", lambda t: t.to(torch.float32)),
    ("fn", lambda t: F.dropout(t, 0.3, training=False)), ("fn", lambda t: t * 2.0 + 1.0),
    ("fn", lambda t: 1.0 - t), ("fn", lambda t: t / 3.0),
]


@pytest.mark.parametrize("kind,op", UNARY, ids=[str(i) for i in range(len(UNARY))])
def test_unary_ops_are_pass_through(check_pruned, kind, op):
    """Every spelling of a unary op (module, F., torch., method, in-place, scalar arithmetic)
    hits the same family rule: the group spans it, no barrier."""
    class U(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.op = op if kind == "module" else None
            self.b = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(self.op(y) if self.op is not None else op(y))

    before = U().eval()
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(before, x)
    assert a.barriers == ()
    (g,) = a.groups
    assert members(g) == {("a.weight", 0, "out"), ("a.bias", 0, "dep"), ("b.weight", 1, "in")}
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1, 2, 4]}))


def test_where_couples_both_branches(check_pruned):
    class W(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(3, 6, 1)
            self.c = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            p, q = self.a(x), self.b(x)
            return self.c(torch.where(p > q, p, q))

    before = W().eval()
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert {("a.weight", 0, "out"), ("b.weight", 0, "out"), ("c.weight", 1, "in")} <= members(g)
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 1, 2]}))


@pytest.mark.parametrize("per_channel", [True, False])
def test_prelu(check_pruned, per_channel):
    before = nn.Sequential(nn.Conv2d(3, 6, 1), nn.PReLU(6 if per_channel else 1),
                           nn.Conv2d(6, 2, 1)).eval()
    with torch.no_grad():
        before[1].weight.uniform_(-1, 1)
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert (("1.weight", 0, "dep") in members(g)) == per_channel
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [2, 3]})).small
    assert small.get_submodule("1").weight.shape == ((2,) if per_channel else (1,))
