"""Issue 8 item 8: criterion and ignore= names fail closed."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.cli import build_parser
from fxprune.core.errors import ImportanceError, PlanError
from fxprune.planning.importance import CRITERIA


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


def test_cli_criterion_names_come_from_registry(capsys):
    """`fxprune prune --criterion` is checked against the registry after parsing, before
    any model is loaded (so `--help` imports no torch): every data-free name parses, a
    data-driven or unknown one exits 2 with the remedy."""
    from fxprune.cli import _check_early

    parser = build_parser()
    for name, spec in CRITERIA.items():
        args = parser.parse_args(["prune", "no.such:model", "--ratio", "0.5",
                                  "--criterion", name])
        if spec.needs_data:
            with pytest.raises(SystemExit) as exc:
                _check_early(parser, args)
            assert exc.value.code == 2
            assert "needs calibration data" in capsys.readouterr().err
        else:
            _check_early(parser, args)  # accepted
    args = parser.parse_args(["prune", "no.such:model", "--ratio", "0.5", "--criterion", "fgpm"])
    with pytest.raises(SystemExit):
        _check_early(parser, args)
    assert "did you mean fpgm" in capsys.readouterr().err


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
