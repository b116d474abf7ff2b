"""Inputs that do not fit the model: typed errors that name the node, the model intact."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 6, 1)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


GOOD = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("x,node", [
    (torch.randn(2, 4, 4, 4), "conv"),       # wrong channel count
    (torch.randn(2, 3, 5, 5), "fc"),         # wrong spatial size for the flatten -> fc
    (torch.randn(2, 3), "conv"),             # wrong rank
    (torch.randn(2, 3, 4, 4, dtype=torch.float64), "conv"),  # dtype the weights lack
])
@pytest.mark.parametrize("train", [False, True])
def test_mismatching_input_raises_and_leaves_the_model(helpers, x, node, train):
    model = Net().train(train)
    before = helpers.snapshot(model)
    with pytest.raises(fxprune.ShapePropagationError) as info:
        fxprune.analyze(model, x)
    assert f"node '{node}'" in str(info.value)
    assert "example inputs" in str(info.value)
    helpers.assert_untouched(model, before)
    fxprune.analyze(model, GOOD)   # the model still analyses with good inputs
    helpers.assert_untouched(model, before)


def test_mismatching_input_on_a_meta_model():
    with pytest.raises(fxprune.ShapePropagationError, match="node 'conv'"):
        fxprune.analyze(Net().to("meta"), torch.randn(2, 4, 4, 4))


def test_missing_input_names_the_placeholder():
    with pytest.raises(fxprune.ShapePropagationError, match="node 'y'"):
        fxprune.analyze(Two(), (GOOD,))


def test_inputs_that_do_not_broadcast():
    with pytest.raises(fxprune.ShapePropagationError, match="node 'add'"):
        fxprune.analyze(Two(), (GOOD, torch.randn(2, 3, 5, 5)))


def test_extra_input_is_refused():
    with pytest.raises(fxprune.ShapePropagationError):
        fxprune.analyze(Two(), (GOOD, GOOD, GOOD))


def test_analysis_failure_does_not_leave_graph_state_on_the_model(helpers):
    """After a failed analysis the user's modules carry no fx or fxprune state."""
    model = Net()
    with pytest.raises(fxprune.ShapePropagationError):
        fxprune.analyze(model, torch.randn(2, 4, 4, 4))
    assert not hasattr(model, "graph") and not hasattr(model, "_fxprune_mask_0")
    assert all(not k.startswith("_fxprune") for k in model.state_dict())


def test_verify_with_mismatching_inputs_raises_a_typed_error():
    model = Net().eval()
    a = fxprune.analyze(model, GOOD)
    plan = fxprune.Plan.from_ratio(a, 0.5)
    small = fxprune.compile(model, plan)
    with pytest.raises(fxprune.FxpruneError):
        fxprune.verify(model, small, plan, torch.randn(2, 4, 4, 4))
