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


class PerChannelStd(nn.Module):
    """``y / (y.std over space + eps)``: a per-channel divisor (exact, pass-through)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(y / (y.std((2, 3), keepdim=True) + 1e-5))


def test_verify_of_a_model_dividing_by_a_per_channel_statistic():
    """trial19: the mask zeroed the divisor too, so removed channels were 0/0 = nan and
    the next conv spread it (0 * nan = nan) into every kept output."""
    torch.manual_seed(0)
    model, x = PerChannelStd().eval(), torch.randn(1, 3, 8, 8)
    analysis = fxprune.analyze(model, (x,))
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="l1")
    report = fxprune.verify(model, fxprune.compile(model, plan), plan, (x,))
    assert report.ok and report.nodes_checked > 0 and not report.nonfinite
    masked = insert_masks(analysis, plan.kept_labels(analysis))
    with torch.no_grad():
        assert torch.isfinite(masked(x)).all()


def test_nan_at_kept_units_is_reported_not_hidden():
    """A nan the model computes at kept units (here: from the input) that reaches the
    output fails verify, named as the reference's own nan, not as a slicing bug (at the
    inner nodes the pruned model has the same nan: those agree)."""
    torch.manual_seed(0)
    model, x = PerChannelStd().eval(), torch.randn(1, 3, 8, 8)
    analysis = fxprune.analyze(model, (x,))
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="l1")
    small = fxprune.compile(model, plan)
    bad = x.clone()
    bad[0, 0, 3, 3] = float("nan")
    report = fxprune.verify(model, small, plan, (bad,), raise_on_failure=False)
    assert not report.ok and report.nonfinite == "output"
    with pytest.raises(fxprune.VerificationError, match="nan/inf at kept units of 'output'") as e:
        fxprune.verify(model, small, plan, (bad,))
    assert "fxprune bug" not in str(e.value)


def test_node_error_tells_a_nonfinite_reference_from_a_nonfinite_result():
    from fxprune.api import _node_error

    labels, kept = {1: np.arange(3)}, np.array([True, False, True])
    ref, got = torch.ones(2, 3), torch.ones(2, 2)
    assert _node_error(labels, kept, [ref.clone()], got) == 0.0
    ref[0, 1] = float("nan")  # a removed unit: not compared
    assert _node_error(labels, kept, [ref.clone()], got) == 0.0
    assert _node_error(labels, kept, [torch.ones(2, 3)], got.index_fill(1, torch.tensor([0]),
                                                                  float("inf"))) == float("inf")
    ref[1, 2] = float("inf")  # a kept unit of the reference itself
    rel = _node_error(labels, kept, [ref.clone()], got)
    assert rel != rel  # nan: the pruned value differs there
    # the same inf / nan at the same kept places (the model's own, e.g. T5's log(0) that a
    # where() then drops): they agree, the rest is compared
    same = got.clone()
    same[1, 1] = float("inf")
    assert _node_error(labels, kept, [ref.clone()], same) == 0.0
    ref[0, 0], same[0, 0] = float("nan"), float("nan")
    assert _node_error(labels, kept, [ref.clone()], same) == 0.0
    same[1, 0] = 2.0
    assert _node_error(labels, kept, [ref], same) == pytest.approx(1.0)


def test_removed_weight_slices_are_zero_even_when_not_finite():
    from passes.mask import zero_slices

    w = torch.ones(3, 2)
    w[1, 0], w[1, 1] = float("inf"), float("nan")
    zero_slices(w, [(0, np.array([True, False, True]))])
    assert torch.equal(w, torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))
