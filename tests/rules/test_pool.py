"""Spatial rules (passes/rules/pool.py): pooling, resizing and padding keep channels apart;
units on a pooled or padded dim are pinned."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


def members(group):
    return {(m.fqn, m.dim, m.role) for m in group.members}


SPATIAL = [
    nn.MaxPool2d(2), nn.AvgPool2d(2, ceil_mode=True), nn.AdaptiveAvgPool2d(1),
    nn.AdaptiveMaxPool2d((2, 3)), nn.LPPool2d(2, 2), nn.Upsample(scale_factor=2),
    nn.ZeroPad2d(1), nn.ReflectionPad2d((1, 0, 1, 0)),
    lambda y: F.max_pool2d(y, 3, stride=1, padding=1), lambda y: F.avg_pool2d(y, 2),
    lambda y: F.adaptive_avg_pool2d(y, 1), lambda y: F.interpolate(y, size=(5, 7)),
    lambda y: F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False),
    lambda y: F.pad(y, (1, 2, 0, 1)), lambda y: F.max_pool2d(y, 2, return_indices=True)[0],
]


@pytest.mark.parametrize("op", SPATIAL, ids=[str(i) for i in range(len(SPATIAL))])
def test_spatial_ops_are_pass_through(check_pruned, op):
    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.op = op if isinstance(op, nn.Module) else None
            self.b = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(self.op(y) if self.op is not None else op(y))

    before = P().eval()
    x = torch.randn(2, 3, 6, 6)
    a = fxprune.analyze(before, x)
    assert a.barriers == ()
    (g,) = a.groups
    assert members(g) == {("a.weight", 0, "out"), ("a.bias", 0, "dep"), ("b.weight", 1, "in")}
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 2, 3]}))


def test_two_pooled_branches_added(check_pruned):
    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            y = F.max_pool2d(self.a(x), 2)
            return self.b(F.avg_pool2d(y, 3) + F.adaptive_max_pool2d(y, 1))

    before = P().eval()
    x = torch.randn(1, 3, 6, 6)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [5]}))


def test_pool1d_over_the_channel_dim_pins():
    """Tokens B x N x C: avg_pool1d pools the last dim, which is the channel dim here."""
    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(3, 2)

        def forward(self, x):
            return self.b(F.avg_pool1d(self.a(x), 2))

    a = fxprune.analyze(P(), torch.randn(2, 5, 4))
    assert a.groups == ()


def test_pool1d_over_tokens_keeps_channels(check_pruned):
    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv1d(3, 6, 1)
            self.b = nn.Conv1d(6, 2, 1)

        def forward(self, x):
            return self.b(nn.functional.max_pool1d(self.a(x), 2))

    before = P().eval()
    x = torch.randn(2, 3, 8)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1, 2]}))


def test_padding_the_channel_dim_pins():
    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(F.pad(self.a(x), (0, 0, 0, 0, 1, 1)))

    assert fxprune.analyze(P(), torch.randn(1, 3, 4, 4)).groups == ()
