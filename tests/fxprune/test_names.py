"""Issue 8 item 8: criterion and ignore= names fail closed."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.cli import build_parser
from fxprune.errors import ImportanceError, PlanError
from fxprune.importance import CRITERIA


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                      nn.Conv2d(8, 4, 1))
    return m, fxprune.analyze(m, (torch.randn(1, 3, 4, 4),))


@pytest.mark.parametrize("name", ["taylor", "obd", "fisher"])
def test_data_driven_name_without_data_raises(setup, name):
    _, an = setup
    with pytest.raises(ImportanceError, match="data-driven"):
        fxprune.Plan.from_ratio(an, 0.5, criterion=name)


@pytest.mark.parametrize("entry", ["Plan.from_ratio", "Plan.from_counts", "plan"])
def test_unknown_criterion_raises(setup, entry):
    _, an = setup
    with pytest.raises(ImportanceError, match="unknown criterion 'nope'"):
        if entry == "Plan.from_ratio":
            fxprune.Plan.from_ratio(an, 0.5, criterion="nope")
        elif entry == "Plan.from_counts":
            fxprune.Plan.from_counts(an, {"0.weight": 4}, criterion="nope")
        else:
            fxprune.plan(an, "nope", ratio=0.5)


@pytest.mark.parametrize("name", ["fpgm", "lamp"])
def test_registry_criterion_is_used_and_recorded(setup, name):
    _, an = setup
    p = fxprune.Plan.from_ratio(an, 0.5, criterion=name)
    want = fxprune.importance_scores(an, name)
    for g in an.groups:
        if g.name in p.keep:  # the plan keeps the top-scored units of the registry's scores
            top = sorted(sorted(range(g.size), key=lambda i: -want[g.name][i])[:len(p.keep[g.name])])
            assert list(p.keep[g.name]) == top
    assert p.meta["criterion"] == name


def test_cli_criterion_choices_come_from_registry():
    parser = build_parser()
    prune = next(a for a in parser._subparsers._group_actions[0].choices["prune"]._actions
                 if a.dest == "criterion")
    assert set(prune.choices) == {n for n, s in CRITERIA.items() if not s.needs_data}
    assert "fpgm" in prune.choices and "taylor" not in prune.choices


@pytest.mark.parametrize("planner", ["from_ratio", "plan"])
def test_ignore_accepts_modules_and_names(setup, planner):
    m, an = setup
    make = (lambda ig: fxprune.Plan.from_ratio(an, 0.5, ignore=ig)) if planner == "from_ratio" \
        else (lambda ig: fxprune.plan(an, ratio=0.5, ignore=ig))
    full = make(())
    assert "0.weight[0]" in full.keep
    by_module, by_name = make([m[0]]), make(["0"])
    assert "0.weight[0]" not in by_module.keep and "2.weight[0]" in by_module.keep
    assert dict(by_module.keep) == dict(by_name.keep)


@pytest.mark.parametrize("planner", ["from_ratio", "plan"])
def test_ignore_name_matching_nothing_raises(setup, planner):
    _, an = setup
    with pytest.raises(PlanError, match="matches no module"):
        if planner == "from_ratio":
            fxprune.Plan.from_ratio(an, 0.5, ignore=["conv1"])
        else:
            fxprune.plan(an, ratio=0.5, ignore=["conv1"])


def test_ignore_foreign_module_raises(setup):
    _, an = setup
    with pytest.raises(PlanError, match="not part of the analysed model"):
        fxprune.Plan.from_ratio(an, 0.5, ignore=[nn.Conv2d(3, 8, 1)])
