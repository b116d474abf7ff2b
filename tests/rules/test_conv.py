"""Convolution rules (passes/rules/conv.py): stop ops, grouped and depthwise convs,
functional convs on get_attr weights, transposed convs. Before/Expected golden tests."""
from __future__ import annotations

import numpy as np
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


def randomize_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)


# ----------------------------------------------------------------------------------
class ConvBNReLUConv(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 4, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def test_conv_bn_relu_conv_groups():
    m = ConvBNReLUConv().eval()
    a = fxprune.analyze(m, torch.randn(1, 3, 8, 8))
    # conv2's output reaches the model output and the model input feeds conv1: one group.
    (g,) = a.groups
    assert (g.name, g.size, g.granularity, g.exact) == ("conv1.weight[0]", 8, 1, True)
    assert members(g) == {
        ("conv1.weight", 0, "out"), ("conv1.bias", 0, "dep"), ("bn.weight", 0, "dep"),
        ("bn.bias", 0, "dep"), ("bn.running_mean", 0, "dep"), ("bn.running_var", 0, "dep"),
        ("conv2.weight", 1, "in")}
    assert all(units(g, m_.fqn, m_.dim) == list(range(8)) for m_ in g.members)
    assert set(g.nodes) >= {"conv1", "bn", "relu"}
    assert "conv2" not in g.nodes  # conv2 consumes the space, its output is another one


def test_conv_bn_relu_conv_golden(check_pruned):
    """Before: Conv(3,8)-BN(8)-ReLU-Conv(8,4); remove channels 2 and 5 ->
    Expected: Conv(3,6)-BN(6)-ReLU-Conv(6,4) holding the kept slices."""
    before = ConvBNReLUConv().eval()
    randomize_bn(before.bn)
    x = torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(before, x)
    keep = [0, 1, 3, 4, 6, 7]
    plan = fxprune.Plan.from_indices(a, {"conv1.weight[0]": [2, 5]}, remove=True)
    assert plan.keep == {"conv1.weight[0]": tuple(keep)}
    small = check_pruned(before, x, plan).small

    expected = ConvBNReLUConv(6).eval()
    k = torch.tensor(keep)
    with torch.no_grad():
        expected.conv1.weight.copy_(before.conv1.weight[k])
        expected.conv1.bias.copy_(before.conv1.bias[k])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(expected.bn, name).copy_(getattr(before.bn, name)[k])
        expected.conv2.weight.copy_(before.conv2.weight[:, k])
        expected.conv2.bias.copy_(before.conv2.bias)
    assert dict(small.state_dict()).keys() == dict(expected.state_dict()).keys()
    for name, t in expected.state_dict().items():
        assert torch.equal(small.state_dict()[name], t), name
    assert (small.conv1.in_channels, small.conv1.out_channels) == (3, 6)
    assert small.bn.num_features == 6
    assert (small.conv2.in_channels, small.conv2.out_channels) == (6, 4)
    assert small.conv1.weight.shape == (6, 3, 3, 3) and small.conv2.weight.shape == (4, 6, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------
class Grouped(nn.Module):
    def __init__(self, groups: int, mid: int = 8) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, mid, 1)
        self.c2 = nn.Conv2d(mid, mid, 3, padding=1, groups=groups)
        self.c3 = nn.Conv2d(mid, 4, 1)

    def forward(self, x):
        return self.c3(self.c2(self.c1(x)))


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_couples_positions_inside_groups(groups):
    """Conv(8, 8, groups=g): in-channel j of every group shares weight column j, and the
    out-channel counts per group must stay equal: unit j covers channel j of every group."""
    a = fxprune.analyze(Grouped(groups).eval(), torch.randn(1, 4, 5, 5))
    per = 8 // groups
    strided = [j for _ in range(groups) for j in range(per)]  # [0..per-1] repeated
    g_in, g_out = a.groups
    assert (g_in.name, g_in.size, g_in.granularity) == ("c1.weight[0]", per, groups)
    assert members(g_in) == {("c1.weight", 0, "out"), ("c1.bias", 0, "dep"),
                             ("c2.weight", 1, "in")}
    assert units(g_in, "c1.weight", 0) == strided
    assert units(g_in, "c2.weight", 1) == list(range(per))
    assert (g_out.name, g_out.size, g_out.granularity) == ("c2.weight[0]", per, groups)
    assert members(g_out) == {("c2.weight", 0, "out"), ("c2.bias", 0, "dep"),
                              ("c3.weight", 1, "in")}
    assert units(g_out, "c3.weight", 1) == strided


def test_grouped_conv_golden(check_pruned):
    """Before: Conv(8, 8, groups=2) with weight (8, 4, 3, 3); remove unit 1 of both groups
    (channels 1 and 5 in and out) -> Expected: Conv(6, 6, groups=2), weight (6, 3, 3, 3)."""
    before = Grouped(2).eval()
    x = torch.randn(2, 4, 5, 5)
    a = fxprune.analyze(before, x)
    plan = fxprune.Plan.from_indices(a, {"c1.weight[0]": [1], "c2.weight[0]": [1]}, remove=True)
    small = check_pruned(before, x, plan).small
    assert (small.c2.in_channels, small.c2.out_channels, small.c2.groups) == (6, 6, 2)
    rows = torch.tensor([0, 2, 3, 4, 6, 7])
    cols = torch.tensor([0, 2, 3])
    assert torch.equal(small.c2.weight, before.c2.weight[rows][:, cols])
    assert torch.equal(small.c1.weight, before.c1.weight[rows])
    assert torch.equal(small.c3.weight, before.c3.weight[:, rows])


@pytest.mark.parametrize("remove", [[3], [0, 1, 2], [0, 2, 4, 6]])
def test_depthwise_conv_groups_follow(check_pruned, remove):
    """Depthwise (groups == channels) is pass-through: c1, c2 and c3 share one space and
    c2.groups becomes the kept count."""
    before = Grouped(8).eval()
    x = torch.randn(1, 4, 5, 5)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert (g.size, g.granularity) == (8, 1)
    assert members(g) == {("c1.weight", 0, "out"), ("c1.bias", 0, "dep"),
                          ("c2.weight", 0, "out"), ("c2.bias", 0, "dep"),
                          ("c3.weight", 1, "in")}
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: remove},
                                                               remove=True)).small
    n = 8 - len(remove)
    assert (small.c2.in_channels, small.c2.out_channels, small.c2.groups) == (n, n, n)
    assert small.c2.weight.shape == (n, 1, 3, 3)


def test_depthwise_with_channel_multiplier(check_pruned):
    """Conv(4, 8, groups=4): out-channels 2g and 2g+1 live and die with in-channel g."""
    class DW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.d = nn.Conv2d(4, 8, 3, groups=4, padding=1)
            self.b = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(self.d(self.a(x)))

    before = DW().eval()
    x = torch.randn(1, 3, 5, 5)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert g.size == 4
    assert units(g, "d.weight", 0) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert units(g, "b.weight", 1) == [0, 0, 1, 1, 2, 2, 3, 3]
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [2]},
                                                               remove=True)).small
    assert (small.d.in_channels, small.d.out_channels, small.d.groups) == (3, 6, 3)
    assert torch.equal(small.d.weight, before.d.weight[[0, 1, 2, 3, 6, 7]])


def test_single_input_channel_conv_is_not_mistaken_for_depthwise(check_pruned):
    """Conv(1, 4) has in_channels == groups == 1 and weight.shape[1] == 1, like a depthwise
    conv, but pruning its outputs must leave groups == 1 (regression: groups became 0)."""
    before = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 1, 4, 4)
    a = fxprune.analyze(before, x)
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {0: [1, 3]})).small
    first = small.get_submodule("0")
    assert (first.in_channels, first.out_channels, first.groups) == (1, 2, 1)


# ----------------------------------------------------------------------------------
class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.b1 = nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(4, 6, 1, 1))

    def forward(self, x):
        return F.conv2d(torch.relu(F.conv2d(x, self.w1, self.b1, padding=1)), self.w2)


def test_functional_conv_on_get_attr_weights(check_pruned):
    before = FunctionalConv()
    x = torch.randn(2, 3, 5, 5)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert (g.name, g.size, g.exact) == ("w1[0]", 6, True)
    assert members(g) == {("w1", 0, "out"), ("b1", 0, "dep"), ("w2", 1, "in")}
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 4]})).small
    assert torch.equal(small.w1, before.w1[[0, 4]])
    assert torch.equal(small.b1, before.b1[[0, 4]])
    assert torch.equal(small.w2, before.w2[:, [0, 4]])
    assert isinstance(small.w1, nn.Parameter)


def test_functional_grouped_conv_on_get_attr_weight(check_pruned):
    class FG(nn.Module):
        def __init__(self):
            super().__init__()
            self.w0 = nn.Parameter(torch.randn(8, 3, 1, 1))
            self.w = nn.Parameter(torch.randn(8, 4, 3, 3))
            self.w2 = nn.Parameter(torch.randn(2, 8, 1, 1))

        def forward(self, x):
            return F.conv2d(F.conv2d(F.conv2d(x, self.w0), self.w, groups=2, padding=1), self.w2)

    before = FG()
    x = torch.randn(1, 3, 5, 5)
    a = fxprune.analyze(before, x)
    assert [(g.name, g.size, g.granularity) for g in a.groups] == [("w0[0]", 4, 2),
                                                                     ("w[0]", 4, 2)]
    plan = fxprune.Plan.from_indices(a, {"w0[0]": [0, 3], "w[0]": [1, 2, 3]})
    small = check_pruned(before, x, plan).small
    assert small.w.shape == (6, 2, 3, 3)


def test_functional_conv_with_computed_weight_is_a_barrier():
    """A weight computed in the graph cannot be sliced as a parameter: nothing around it
    is pruned (fail closed), including the conv feeding it."""
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.w = nn.Parameter(torch.randn(4, 6, 1, 1))

        def forward(self, x):
            return F.conv2d(self.a(x), self.w * 2.0)

    a = fxprune.analyze(Computed(), torch.randn(1, 3, 4, 4))
    assert a.groups == ()


def test_conv_input_channels_of_model_input_are_not_pruned():
    a = fxprune.analyze(ConvBNReLUConv().eval(), torch.randn(1, 3, 8, 8))
    assert all(m.fqn != "conv1.weight" or m.dim != 1 for g in a.groups for m in g.members)
    assert all(m.fqn != "conv2.weight" or m.dim != 0 for g in a.groups for m in g.members)


# ----------------------------------------------------------------------------------
def test_conv_transpose_two_groups(check_pruned):
    class CT(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.t = nn.ConvTranspose2d(6, 5, 2, stride=2)
            self.b = nn.Conv2d(5, 2, 1)

        def forward(self, x):
            return self.b(self.t(self.a(x)))

    before = CT().eval()
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(before, x)
    g_a, g_t = a.groups
    # ConvTranspose weights are (in, out/groups, kH, kW): dim 0 consumes, dim 1 produces.
    assert members(g_a) == {("a.weight", 0, "out"), ("a.bias", 0, "dep"), ("t.weight", 0, "in")}
    assert members(g_t) == {("t.weight", 1, "out"), ("t.bias", 0, "dep"), ("b.weight", 1, "in")}
    plan = fxprune.Plan.from_indices(a, {g_a.id: [0, 5], g_t.id: [1]}, remove=True)
    small = check_pruned(before, x, plan).small
    assert (small.t.in_channels, small.t.out_channels) == (4, 4)
    assert small.t.weight.shape == (4, 4, 2, 2)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d(check_pruned, dims):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    before = nn.Sequential(conv(3, 6, 3), nn.ReLU(), conv(6, 5, 1), conv(5, 2, 1)).eval()
    x = torch.randn(2, 3, *([5] * dims))
    a = fxprune.analyze(before, x)
    assert [(g.name, g.size) for g in a.groups] == [("0.weight[0]", 6), ("2.weight[0]", 5)]
    plan = fxprune.Plan.from_indices(a, {"0.weight[0]": [1, 2], "2.weight[0]": [0, 4]},
                                     remove=True)
    small = check_pruned(before, x, plan).small
    assert (small.get_submodule("0").out_channels, small.get_submodule("2").in_channels,
            small.get_submodule("2").out_channels, small.get_submodule("3").in_channels) \
        == (4, 4, 3, 3)


def test_grouped_conv_random_removals_keep_per_group_counts_equal(check_pruned, rng):
    """Random removals in a grouped conv always leave equal per-group counts."""
    before = Grouped(4).eval()
    x = torch.randn(1, 4, 5, 5)
    a = fxprune.analyze(before, x)
    for _ in range(3):
        keep = {g.id: rng.choice(g.size, size=rng.integers(1, g.size + 1), replace=False)
                for g in a.groups}
        small = check_pruned(before, x, fxprune.Plan.from_indices(a, keep)).small
        assert small.c2.groups == 4
        assert small.c2.in_channels % 4 == 0 and small.c2.out_channels % 4 == 0
        assert small.c2.in_channels == 4 * len(np.unique(keep[0]))
