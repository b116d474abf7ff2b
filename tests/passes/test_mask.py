"""The oracle (passes/mask.py): masks zero removed channels after every node, share no
slicing code, and the oracle is sensitive (a wrong slice is caught by verify)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from passes.mask import insert_masks


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


X = torch.randn(2, 3, 5, 5)


class Recorder(torch.fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        self.seen[n.name] = out
        return out


def record(gm, x):
    r = Recorder(gm)
    r.seen = {}
    with torch.no_grad():
        r.run(x)
    return r.seen


@pytest.fixture
def setup():
    model = Net().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.bias.uniform_(-1, 1)
    a = fxprune.analyze(model, X)
    return model, a


def test_keep_all_inserts_no_mask(setup):
    model, a = setup
    masked = insert_masks(a, np.ones(a.num_units, dtype=bool))
    assert not any(n.target is torch.where for n in masked.graph.nodes)
    with torch.no_grad():
        assert torch.equal(masked(X), model(X))


def test_removed_channels_are_zero_after_every_node(setup, helpers):
    model, a = setup
    before = helpers.snapshot(model)
    plan = fxprune.Plan.from_indices(a, {0: [0, 2, 3]})   # removes channels 1, 4, 5
    masked = insert_masks(a, plan.kept_labels(a))
    helpers.assert_untouched(model, before)
    muls = [n for n in masked.graph.nodes if n.target is torch.where]
    # conv1, bn and relu carry the space: one mask after each
    assert sorted(n.args[1].name for n in muls) == ["bn", "conv1", "relu"]
    seen = record(masked, X)
    for n in muls:
        out = seen[n.name]
        assert (out[:, [1, 4, 5]] == 0).all()
        assert torch.equal(out[:, [0, 2, 3]], seen[n.args[1].name][:, [0, 2, 3]])
    # removed parameter slices are zeroed too, kept ones untouched
    assert (masked.conv2.weight[:, [1, 4, 5]] == 0).all()
    assert torch.equal(masked.conv2.weight[:, [0, 2, 3]], model.conv2.weight[:, [0, 2, 3]])


def test_masked_equals_sliced_numerically(setup):
    model, a = setup
    plan = fxprune.Plan.from_indices(a, {0: [5, 1]})
    small = fxprune.compile(model, plan)
    masked = insert_masks(a, plan.kept_labels(a))
    with torch.no_grad():
        torch.testing.assert_close(small(X), masked(X), rtol=1e-5, atol=1e-6)


def test_oracle_catches_a_wrong_slice(setup):
    """Keep the plan's shapes but take the wrong rows: verify must fail."""
    model, a = setup
    plan = fxprune.Plan.from_indices(a, {0: [0, 2, 3]})
    small = fxprune.compile(model, plan)
    with torch.no_grad():
        small.conv1.weight.copy_(model.conv1.weight[[0, 2, 4]])
    with pytest.raises(fxprune.VerificationError, match="slice != mask"):
        fxprune.verify(model, small, plan, X)
    report = fxprune.verify(model, small, plan, X, raise_on_failure=False)
    assert not report.ok and report.max_abs_error > report.tolerance


def test_oracle_catches_a_wrong_consumer_column(setup):
    model, a = setup
    plan = fxprune.Plan.from_indices(a, {0: [0, 2, 3]})
    small = fxprune.compile(model, plan)
    with torch.no_grad():
        small.conv2.weight.copy_(model.conv2.weight[:, [0, 3, 2]])
    assert not fxprune.verify(model, small, plan, X, raise_on_failure=False).ok
