"""compile(output="module") of a model whose auxiliary head runs only in training: the
train-mode path is captured and merged into the analysis (the head's input channels are
coupled with the trunk's, its own kept whole), the module follows in eval and train mode
(slice == mask on the train path), and what cannot be analysed or followed is refused."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.capture import OtherModeWarning
from fxprune.core.errors import ModuleOutputError
from fxprune.core.graph_meta import get_meta
from fxprune.core.plan import Plan
from passes.find_groups import graph_fingerprint
from passes.slice_module import check_other_modes


class AuxHeadNet(nn.Module):
    """A trunk whose auxiliary head (conv + BN + linear) runs only in training, reading
    the trunk's channels after a residual add (GoogLeNet's aux1 / aux2)."""

    def __init__(self, pool: int = 2, literal: bool = False):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)
        self.aux = nn.Sequential(nn.AvgPool2d(pool), nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8),
                                 nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 16, 3))
        self.literal = literal

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + torch.relu(self.bn(self.conv(h)))
        out = self.head(h.mean((2, 3)))
        if self.training:
            if self.literal:  # a size the forward holds as a literal: cannot follow
                return out, self.aux(h.reshape(h.shape[0], 16, 8, 8))
            return out, self.aux(h)
        return out


def _analyze(model, x):
    with pytest.warns(OtherModeWarning, match="aux run only in train mode"):
        return fxprune.analyze(model, (x,))


def test_train_only_head_merged_and_followed():
    torch.manual_seed(0)
    m, x = AuxHeadNet().eval(), torch.randn(2, 3, 8, 8)
    a = _analyze(m, x)
    assert not m.training and all(not s.training for s in m.modules())  # untouched
    assert "train-mode path was analysed too: aux" in a.notes[0]
    assert get_meta(a.gm, "other_modes")["train"]["modules"] == ("aux",)
    assert "train-mode path was analysed too" in a.table()
    assert a.fingerprint != graph_fingerprint(a.gm)  # a plan without the merge is refused
    trunk = a.group("stem.weight[0]")
    train = a.other_modes[0].analysis.group(trunk.name)
    assert "aux.1.weight[1]" in {f"{m.fqn}[{m.dim}]" for m in train.members}
    pins = {(p.fqn, p.dim): p for p in a.pins()}  # the other mode's pins are listed too
    assert pins["aux.1.weight", 0].whole and "only in train mode" in pins["aux.1.weight", 0].reason
    plan = Plan.from_ratio(a, 0.3, criterion="random", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OtherModeWarning)  # the plan's analysis is reused
        gm = fxprune.compile(m, plan)
        small = fxprune.compile(m, plan, output="module")
    assert type(small) is AuxHeadNet and small.stem.out_channels < 16
    assert small.aux[1].in_channels == small.stem.out_channels == small.conv.out_channels
    x3 = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(copy.deepcopy(small).double().eval()(x3), gm.double()(x3))
    out, aux = small.train()(x)
    assert out.shape == (2, 4) and aux.shape == (2, 3)
    (out.sum() + aux.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in small.parameters())
    assert m.aux[1].in_channels == 16 and not m.training


def test_train_check_catches_a_wrong_head():
    """check_other_modes compares the train path with the masked model: a head weight
    that differs from the sliced one is found."""
    torch.manual_seed(0)
    m, x = AuxHeadNet().eval(), torch.randn(2, 3, 8, 8)
    a = _analyze(m, x)
    plan = Plan.from_indices(a, {"stem.weight[0]": range(2, 14)})
    small = fxprune.compile(m, plan, output="module")
    check_other_modes(small, a, plan.kept_labels(a))
    with torch.no_grad():
        small.aux[1].weight[0, 0] += 1.0
    with pytest.raises(ModuleOutputError, match=r"in train mode output 1 differs.*aux run only"
                       r" in train mode.*aux_logits=False"):
        check_other_modes(small, a, plan.kept_labels(a))


def test_head_holding_a_literal_size_refused():
    torch.manual_seed(0)
    m, x = AuxHeadNet(literal=True).eval(), torch.randn(2, 3, 8, 8)
    a = _analyze(m, x)
    plan = Plan.from_indices(a, {"stem.weight[0]": range(12)})
    with pytest.raises(ModuleOutputError, match=r"does not run in train mode.*ignore=\[\.\.\.\]"
                       r".*output=\"graph\""):
        fxprune.compile(m, plan, output="module")
    fxprune.compile(m, plan)  # the GraphModule (eval graph) takes the plan


def test_head_the_inputs_cannot_run_refused():
    """AvgPool2d(16) on an 8x8 map: the train path cannot be analysed on these inputs."""
    torch.manual_seed(0)
    m, x = AuxHeadNet(pool=16).eval(), torch.randn(2, 3, 8, 8)
    with pytest.warns(OtherModeWarning, match="train-mode path could not be analysed"):
        a = fxprune.analyze(m, (x,))
    assert not a.other_modes and not get_meta(a.gm, "other_modes")["train"]["analysed"]
    plan = Plan.from_indices(a, {"stem.weight[0]": range(12)})
    with pytest.raises(ModuleOutputError, match=r"never ran.*: aux;.*train-mode path could "
                       r"not be analysed.*aux_logits=False"):
        fxprune.compile(m, plan, output="module")
