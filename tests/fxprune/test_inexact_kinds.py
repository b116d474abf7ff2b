"""Issue 8 item 9: the kind of inexact group; softmax-normalised units stay whole by default."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


class DFL(nn.Module):
    """Distribution focal loss integral (YOLOv8): softmax over ``c1`` bins, then a fixed
    conv with weights 0..c1-1 (the expectation)."""

    def __init__(self, c1: int = 8, log: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1, self.log = c1, log

    def forward(self, x):
        b, _, a = x.shape
        y = x.view(b, 4, self.c1, a).transpose(2, 1)
        y = F.log_softmax(y, dim=1).exp() if self.log else y.softmax(1)
        return self.conv(y).view(b, 4, a)


class Head(nn.Module):
    def __init__(self, log: bool = False) -> None:
        super().__init__()
        self.stem, self.box, self.dfl = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 32, 1), DFL(8, log)

    def forward(self, x):
        return self.dfl(self.box(torch.relu(self.stem(x))).flatten(2))


class LNMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


X = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("log", [False, True])
def test_dfl_bins_are_softmax_inexact_and_left_whole(log):
    an = fxprune.analyze(Head(log), (X,))
    box = an.group("box.weight[0]")
    assert not box.exact and box.inexact_kinds == ("softmax",) and box.inexact_kind == "softmax"
    assert "no (softmax)" in an.table()
    assert "box.weight[0]" not in fxprune.Plan.from_ratio(an, 0.5).keep
    assert "box.weight[0]" not in fxprune.plan(an, ratio=0.5).keep
    assert "stem.weight[0]" in fxprune.Plan.from_ratio(an, 0.5).keep  # the rest prunes


def test_softmax_group_prunes_on_opt_in():
    an = fxprune.analyze(Head(), (X,))
    for p in (fxprune.Plan.from_ratio(an, 0.5, include_softmax=True),
              fxprune.plan(an, ratio=0.5, include_softmax=True)):
        assert len(p.keep["box.weight[0]"]) == 4
        small = fxprune.compile(an, p)
        assert fxprune.verify(an, small, p, (X,)).ok


def test_statistics_groups_stay_prunable():
    an = fxprune.analyze(LNMlp(), (torch.randn(2, 6),))
    g = an.group("fc1.weight[0]")
    assert not g.exact and g.inexact_kinds == ("statistics",)
    assert "fc1.weight[0]" in fxprune.Plan.from_ratio(an, 0.5).keep
    assert "fc1.weight[0]" in fxprune.plan(an, ratio=0.5).keep


def test_exact_groups_have_no_kind():
    an = fxprune.analyze(Head(), (X,))
    g = an.group("stem.weight[0]")
    assert g.exact and g.inexact_kinds == () and g.inexact_kind == ""
