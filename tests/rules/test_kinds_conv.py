"""Issue 8 kinds, conv family: size arguments that follow a pruned size in every calling
form (item 2) and grouped / depthwise transposed convs (item 13)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


def _remove_one(analysis):
    """Remove unit 1 of every group (a random-order removal, not magnitude)."""
    return fxprune.Plan.from_indices(analysis, {g.id: [1] for g in analysis.groups
                                                if g.size > 1}, remove=True)


class FunctionalDepthwise(nn.Module):
    """The reported case: a functional depthwise conv whose group count is an argument."""

    def __init__(self, form: str, multiplier: int = 1, dims: int = 1) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d)[dims - 1]
        self.form, self.dims = form, dims
        self.a = conv(2, 4, 1)
        self.dw = nn.Parameter(torch.randn(4 * multiplier, 1, *([3] * dims)))
        self.b = conv(4 * multiplier, 2, 1)

    def forward(self, x):
        f = (F.conv1d, F.conv2d)[self.dims - 1]
        h = self.a(x)
        if self.form == "keyword":
            h = f(h, self.dw, padding=1, groups=4)
        elif self.form == "positional":
            h = f(h, self.dw, None, 1, 1, 1, 4)
        else:  # keywords only, input= included
            h = f(input=h, weight=self.dw, padding=1, groups=4)
        return self.b(h)


@pytest.mark.parametrize("form", ["keyword", "positional", "keywords_only"])
@pytest.mark.parametrize("multiplier,dims", [(1, 1), (2, 1), (1, 2)])
def test_functional_depthwise_groups_follow_kept_channels(check_pruned, form, multiplier,
                                                          dims):
    model = FunctionalDepthwise(form, multiplier, dims).eval()
    x = torch.randn(2, 2, *([7] * dims))
    analysis = fxprune.analyze(model, (x,))
    assert [g.size for g in analysis.groups] == [4]
    small = check_pruned(model, x, _remove_one(analysis)).small
    assert small.dw.shape[0] == 3 * multiplier
    assert "groups = 3" in small.code or ", 3)" in small.code


def test_functional_depthwise_through_export(check_pruned):
    model = FunctionalDepthwise("keyword").eval()
    x = torch.randn(2, 2, 7)
    analysis = fxprune.analyze(model, (x,), frontend="export")
    assert [g.size for g in analysis.groups] == [4]
    check_pruned(model, x, _remove_one(analysis))


class FunctionalGrouped(nn.Module):
    """A grouped (not depthwise) functional conv keeps its group count."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.randn(8, 4, 3, 3))
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(F.conv2d(self.a(x), self.w, padding=1, groups=2))


def test_functional_grouped_conv_keeps_groups(check_pruned):
    model = FunctionalGrouped().eval()
    x = torch.randn(2, 3, 6, 6)
    analysis = fxprune.analyze(model, (x,))
    small = check_pruned(model, x, _remove_one(analysis)).small
    assert "groups = 2" in small.code


# ----------------------------------------------------------------------------------
# item 13: grouped / depthwise transposed convs
# ----------------------------------------------------------------------------------
def _transposed(groups: int, out: int, bias: bool) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, out, 2, stride=2,
                                                                groups=groups, bias=bias),
                         nn.ReLU(), nn.Conv2d(out, 2, 1)).eval()


@pytest.mark.parametrize("groups,out", [(2, 4), (4, 4), (4, 8), (2, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_transposed_conv_keep_all_and_prune(check_pruned, groups, out, bias):
    model = _transposed(groups, out, bias)
    x = torch.randn(2, 3, 4, 4)
    analysis = fxprune.analyze(model, (x,))
    small = fxprune.compile(model, fxprune.Plan.keep_all(analysis))
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)
    assert analysis.groups, "the convs around the transposed conv stay prunable"
    small = check_pruned(model, x, _remove_one(analysis)).small
    t = small.get_submodule("1")
    assert t.in_channels == t.weight.shape[0]
    assert t.out_channels == t.weight.shape[1] * t.groups


def test_depthwise_transposed_conv_loses_whole_groups(check_pruned):
    model = _transposed(4, 8, True)
    x = torch.randn(2, 3, 4, 4)
    analysis = fxprune.analyze(model, (x,))
    (group,) = [g for g in analysis.groups if any(m.fqn == "1.weight" for m in g.members)]
    assert group.size == 4  # one unit per group: input channel g with its 2 outputs
    small = check_pruned(model, x, fxprune.Plan.from_indices(
        analysis, {group.id: [0, 2]}, remove=True)).small
    t = small.get_submodule("1")
    assert (t.groups, t.in_channels, t.out_channels) == (2, 2, 4)


class FunctionalTransposed(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.w = nn.Parameter(torch.randn(4, 8 // groups, 2, 2))
        self.bias = nn.Parameter(torch.randn(8))
        self.groups = groups
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(F.conv_transpose2d(self.a(x), self.w, self.bias, stride=2,
                                         groups=self.groups))


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_functional_transposed_conv(check_pruned, groups, frontend):
    model = FunctionalTransposed(groups).eval()
    x = torch.randn(2, 3, 4, 4)
    analysis = fxprune.analyze(model, (x,), frontend=frontend)
    assert any(m.fqn == "w" for g in analysis.groups for m in g.members)
    check_pruned(model, x, _remove_one(analysis))
