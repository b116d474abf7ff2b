"""Bad input raises typed errors that name the remedy, and changes nothing."""
import pytest
import torch
import torch.nn.functional as F

from fxprune.distill import Pruner, fit
from fxprune.core.errors import (BudgetError, CheckpointMismatchError, DistillError, FxpruneError,
                            GateTamperError)

from tests.distill._distill_models import ResNetlet, batches

X = batches(1)[0][0]


def _pruner(model=None, **kw):
    kw.setdefault("target_macs", 0.5)
    return Pruner(model or ResNetlet(), (X,), interval=kw.pop("interval", 2),
                  steps=kw.pop("steps", 4), **kw)


@pytest.mark.parametrize("interval", [0, -1, 1.5])
def test_interval(interval):
    with pytest.raises(DistillError, match="interval must be an integer >= 1"):
        _pruner(interval=interval)


def test_budget_already_met_or_unreachable():
    with pytest.raises(BudgetError, match="already met"):
        _pruner(target_macs=1.0)
    with pytest.raises(BudgetError, match="cannot be reached"):
        _pruner(target_macs=1e-6)
    with pytest.raises(DistillError, match="exactly one budget"):
        _pruner(target_macs=None)


def test_teacher_outputs_must_match():
    with pytest.raises(DistillError, match="do not match") as info:
        _pruner(teacher=ResNetlet(classes=5))
    assert isinstance(info.value, FxpruneError)
    _pruner(teacher=ResNetlet(width=16))  # a larger teacher of the same family is fine


def test_gate_changed_outside_the_pruner():
    p = _pruner()
    with torch.no_grad():
        p.student.mask[0] = 0.0
    with pytest.raises(GateTamperError, match="outside the pruner"):
        p.step()


def test_curvature_criterion_without_closure():
    p = _pruner(criterion="cpd", interval=1, steps=1)
    x, y = batches(1)[0]
    F.cross_entropy(p.student(x), y).backward()
    with pytest.raises(DistillError, match="closure"):
        p.step()


def test_checkpoint_of_another_model_or_plan():
    p = _pruner()
    mask = p.mask.clone()
    other_model = _pruner(ResNetlet(width=4)).state_dict()
    with pytest.raises(CheckpointMismatchError, match="another model"):
        p.load_state_dict(other_model)
    other_plan = _pruner(target_macs=0.3).state_dict()
    with pytest.raises(CheckpointMismatchError, match="budget"):
        p.load_state_dict(other_plan)
    with pytest.raises(CheckpointMismatchError, match="format"):
        p.load_state_dict({"mask": mask})
    assert torch.equal(p.mask, mask)


def test_fit_arguments():
    p = _pruner()
    opt = torch.optim.SGD(p.student.parameters(), lr=0.1)
    with pytest.raises(DistillError, match="loss must be"):
        fit(p, batches(1), opt, steps=1, loss="nope")
    with pytest.raises(DistillError, match="no batch"):
        fit(p, [], opt, steps=1)
    with pytest.raises(DistillError, match="pair"):
        fit(p, [X], opt, steps=1)
