"""Issue 8 item 11: weights computed in forward. Per-filter standardisation (timm
StdConv2d family) is prunable; a computed weight of unknown structure is pinned, saying why."""
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune

timm = pytest.importorskip("timm")
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame  # noqa: E402

X = torch.randn(2, 3, 6, 6)


def _net(conv):
    return nn.Sequential(conv(3, 8, 1), nn.ReLU(), conv(8, 8, 3), nn.ReLU(),
                         nn.Conv2d(8, 4, 1)).eval()


@pytest.mark.parametrize("conv", [StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame])
def test_standardized_convs_prune_their_filters(conv):
    torch.manual_seed(0)
    model = _net(conv)
    an = fxprune.analyze(model, (X,))
    first, second = an.group("0.weight[0]"), an.group("2.weight[0]")
    # the filters of conv 2 feed a plain conv: exact; conv 0's feed conv 2's standardisation
    assert second.exact and not first.exact and first.inexact_kinds == ("statistics",)
    if conv in (ScaledStdConv2d, ScaledStdConv2dSame):
        assert ("2.gain", 0) in {(m.fqn, m.dim) for m in second.members}
    plan = fxprune.Plan.from_indices(an, {"0.weight[0]": [0, 2, 5], "2.weight[0]": [1, 3, 4, 7]})
    small = fxprune.compile(model, plan)
    report = fxprune.verify(model, small, plan, (X,))
    assert report.ok and report.params_after < report.params_before
    assert small.get_submodule("2").out_channels == 4
    assert small(X).shape == model(X).shape


class MixedFilters(nn.Module):
    """A weight computed in forward by ops fxprune knows, but not known as a conv weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 1, 1))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.conv2d(x, torch.tanh(self.w) * 2.0))


def test_computed_weight_of_unknown_structure_is_pinned_with_reason():
    an = fxprune.analyze(MixedFilters(), (X,))
    assert not any(m.fqn == "w" for g in an.groups for m in g.members)
    pins = {(p.fqn, p.dim): p for p in an.pins()}
    assert pins[("w", 0)].whole
    assert "computed in forward" in pins[("w", 0)].reason
    assert pins[("w", 0)].node == "conv2d" and "torch.tanh" in pins[("w", 0)].source


@pytest.mark.slow
def test_bit_resnetv2_prunes():
    torch.manual_seed(0)
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    an = fxprune.analyze(model, (x,))
    assert len(an.groups) >= 16
    plan = fxprune.Plan.from_ratio(an, 0.5)
    small = fxprune.compile(model, plan)
    report = fxprune.verify(model, small, plan, (x,))
    assert report.ok and report.params_after < 0.5 * report.params_before
