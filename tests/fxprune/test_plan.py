"""Plans (fxprune/core/plan.py): construction, validation, JSON, fingerprints, criteria."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.core.plan import magnitude_scores


class Net(nn.Module):
    def __init__(self, c1: int = 8, c2: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.head = nn.Conv2d(c2, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


X = torch.randn(2, 3, 6, 6)


@pytest.fixture
def analysis():
    return fxprune.analyze(Net().eval(), X)


def test_groups_of_the_fixture_model(analysis):
    assert [(g.name, g.size) for g in analysis.groups] == [("conv1.weight[0]", 8),
                                                           ("conv2.weight[0]", 6)]


# ----------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------
def test_json_round_trip(analysis, check_pruned):
    plan = fxprune.Plan.from_indices(analysis, {"conv1.weight[0]": [7, 0, 3], 1: [5]})
    text = plan.to_json()
    data = json.loads(text)
    assert data["fingerprint"] == analysis.fingerprint
    assert data["groups"] == {"conv1.weight[0]": {"size": 8, "keep": [0, 3, 7]},
                              "conv2.weight[0]": {"size": 6, "keep": [5]}}
    loaded = fxprune.Plan.from_json(text)
    assert loaded == plan  # fingerprint, keep, sizes, meta (the analysis is not compared)
    assert loaded.analysis is None
    assert loaded.to_json() == text
    model = analysis.gm
    a = check_pruned(model, X, plan).small
    b = fxprune.compile(model, loaded, example_inputs=X)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_json_plan_applies_to_another_instance_of_the_same_architecture(check_pruned):
    """The fingerprint hashes structure and shapes, not values."""
    m1, m2 = Net().eval(), Net().eval()
    plan = fxprune.Plan.from_ratio(fxprune.analyze(m1, X), 0.5)
    loaded = fxprune.Plan.from_json(plan.to_json())
    a2 = fxprune.analyze(m2, X)
    assert a2.fingerprint == plan.fingerprint
    small = check_pruned(m2, X, loaded, analysis=a2).small
    keep = torch.tensor(loaded.keep["conv1.weight[0]"])
    assert torch.equal(small.conv1.weight, m2.conv1.weight[keep])


def test_json_plan_without_inputs_is_refused_by_compile(analysis):
    loaded = fxprune.Plan.from_json(fxprune.Plan.from_ratio(analysis, 0.5).to_json())
    with pytest.raises(fxprune.PlanError, match="example_inputs"):
        fxprune.compile(Net().eval(), loaded)


def test_json_unknown_version_is_refused(analysis):
    data = json.loads(fxprune.Plan.keep_all(analysis).to_json())
    data["version"] = 99
    with pytest.raises(fxprune.PlanError, match="version"):
        fxprune.Plan.from_json(json.dumps(data))


# ----------------------------------------------------------------------------------
# Binding to one graph
# ----------------------------------------------------------------------------------
def test_plan_for_another_graph_is_refused(analysis):
    plan = fxprune.Plan.from_ratio(analysis, 0.5)
    other = fxprune.analyze(Net(c1=6).eval(), X)
    assert other.fingerprint != analysis.fingerprint
    with pytest.raises(fxprune.PlanError, match="re-create the plan"):
        fxprune.compile(other, plan)
    with pytest.raises(fxprune.PlanError):
        plan.kept_labels(other)
    with pytest.raises(fxprune.PlanError):
        fxprune.compile(Net(c1=6).eval(), fxprune.Plan.from_json(plan.to_json()),
                        example_inputs=X)


def test_group_size_mismatch_is_refused(analysis):
    data = json.loads(fxprune.Plan.from_ratio(analysis, 0.5).to_json())
    data["groups"]["conv1.weight[0]"]["size"] = 9
    with pytest.raises(fxprune.PlanError, match="8 units, plan expects 9"):
        fxprune.Plan.from_json(json.dumps(data)).kept_labels(analysis)


# ----------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------
def test_removing_every_unit_is_refused(analysis):
    with pytest.raises(fxprune.PlanError, match="every unit"):
        fxprune.Plan.from_indices(analysis, {0: []})
    with pytest.raises(fxprune.PlanError, match="every unit"):
        fxprune.Plan.from_indices(analysis, {0: range(8)}, remove=True)
    data = json.loads(fxprune.Plan.from_ratio(analysis, 0.5).to_json())
    data["groups"]["conv1.weight[0]"]["keep"] = []
    with pytest.raises(fxprune.PlanError, match="every unit"):
        fxprune.Plan.from_json(json.dumps(data)).kept_labels(analysis)


@pytest.mark.parametrize("bad", [[-1], [8], [0, 100]])
def test_unit_indices_out_of_range_are_refused(analysis, bad):
    with pytest.raises(fxprune.PlanError, match=r"\[0, 8\)"):
        fxprune.Plan.from_indices(analysis, {0: bad})


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_ratio_outside_unit_interval_is_refused(analysis, ratio):
    with pytest.raises(fxprune.PlanError, match="ratio"):
        fxprune.Plan.from_ratio(analysis, ratio)


def test_round_to_below_one_is_refused(analysis):
    with pytest.raises(fxprune.PlanError, match="round_to"):
        fxprune.Plan.from_ratio(analysis, 0.5, round_to=0)


def test_unknown_group_is_an_error(analysis):
    with pytest.raises(KeyError, match="nope"):
        fxprune.Plan.from_indices(analysis, {"nope": [0]})


def test_ratio_zero_removes_nothing(analysis):
    plan = fxprune.Plan.from_ratio(analysis, 0.0)
    assert plan.keep == {} and plan.removed() == {}
    assert plan.kept_labels(analysis).all()


def test_duplicate_and_unsorted_indices_are_normalised(analysis):
    plan = fxprune.Plan.from_indices(analysis, {0: [5, 1, 5, 0]})
    assert plan.keep["conv1.weight[0]"] == (0, 1, 5)
    assert plan.removed() == {"conv1.weight[0]": 5}


def test_kept_labels_match_the_plan(analysis):
    plan = fxprune.Plan.from_indices(analysis, {0: [1, 2], 1: [0, 1, 2, 3]})
    kept = plan.kept_labels(analysis)
    assert kept.shape == (analysis.num_units,) == (14,)
    assert kept.sum() == 2 + 4
    for g in analysis.groups:
        mine = np.flatnonzero(analysis.group_of == g.id)
        local = analysis.local_of[mine]
        assert set(local[kept[mine]].tolist()) == set(plan.keep[g.name])


# ----------------------------------------------------------------------------------
# from_ratio: counts, round_to, ignore, exact_only
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,round_to,want", [
    (0.5, 1, (4, 3)),     # 8 * 0.5 = 4; 6 * 0.5 = 3
    (0.3, 1, (6, 4)),     # round(5.6) = 6; round(4.2) = 4
    (0.3, 4, (4, 4)),     # round(5.6 / 4) * 4 = 4; round(4.2 / 4) * 4 = 4
    (0.5, 4, (4, 4)),     # 4 / 4 = 1 -> 4; 3 / 4 -> round(0.75) = 1 -> 4
    (0.9, 4, (4, 4)),     # never below round_to: max(4, 0) = 4
    (0.1, 4, (8, 4)),     # round(7.2 / 4) * 4 = 8 (whole group); round(5.4 / 4) * 4 = 4
])
def test_from_ratio_counts_and_round_to(analysis, ratio, round_to, want):
    plan = fxprune.Plan.from_ratio(analysis, ratio, round_to=round_to)
    got = tuple(len(plan.keep.get(g.name, range(g.size))) for g in analysis.groups)
    assert got == want
    for g in analysis.groups:
        n = len(plan.keep.get(g.name, range(g.size)))
        assert n == g.size or n % round_to == 0


def test_ignore_keeps_groups_touching_the_prefix_whole(analysis):
    # conv2 consumes group 0 (its columns) and produces group 1 (its rows)
    plan = fxprune.Plan.from_ratio(analysis, 0.5, ignore=["conv2"])
    assert plan.keep == {}
    plan = fxprune.Plan.from_ratio(analysis, 0.5, ignore=["bn1"])
    assert set(plan.keep) == {"conv2.weight[0]"}
    plan = fxprune.Plan.from_ratio(analysis, 0.5, ignore=["head.weight"])
    assert set(plan.keep) == {"conv1.weight[0]"}
    # a prefix matches whole names only: "conv" is neither "conv1" nor "conv2", so it
    # matches nothing, which is an error (issue 8: a typo must not protect nothing)
    with pytest.raises(fxprune.PlanError, match="matches no module"):
        fxprune.Plan.from_ratio(analysis, 0.5, ignore=["conv"])


def test_exact_only_skips_inexact_groups():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 6), nn.ReLU(),
                          nn.Linear(6, 2))
    a = fxprune.analyze(model, torch.randn(2, 4))
    assert [g.exact for g in a.groups] == [False, True]
    assert set(fxprune.Plan.from_ratio(a, 0.5).keep) == {"0.weight[0]", "2.weight[0]"}
    assert set(fxprune.Plan.from_ratio(a, 0.5, exact_only=True).keep) == {"2.weight[0]"}


# ----------------------------------------------------------------------------------
# Criteria
# ----------------------------------------------------------------------------------
class Tiny(nn.Module):
    """conv1 rows and conv2 columns hand-set so that l1 and l2 disagree."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 1, bias=False)
        self.conv2 = nn.Conv2d(3, 1, 1, bias=False)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.5, -0.5]])
                                    .view(3, 2, 1, 1))
            self.conv2.weight.copy_(torch.tensor([1.5, 0.0, -0.5]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def test_l1_and_l2_scores_are_hand_computed():
    a = fxprune.analyze(Tiny(), torch.randn(1, 2, 3, 3))
    (g,) = a.groups
    # unit u: sum of |w| (or w^2) over conv1 row u and conv2 column u
    # l1: [1+1+1.5, 3+0+0, 0.5+0.5+0.5] = [3.5, 3, 1.5]
    # l2 = sqrt(sum w^2): sqrt([1+1+2.25, 9+0+0, 0.25+0.25+0.25]) = sqrt([4.25, 9, 0.75])
    np.testing.assert_allclose(magnitude_scores(a, g, p=1), [3.5, 3.0, 1.5])
    np.testing.assert_allclose(magnitude_scores(a, g, p=2), np.sqrt([4.25, 9.0, 0.75]))
    # ratio 0.6 keeps round(3 * 0.4) = 1 unit: the best one differs between criteria
    assert fxprune.Plan.from_ratio(a, 0.6, criterion="l1").keep == {g.name: (0,)}
    assert fxprune.Plan.from_ratio(a, 0.6, criterion="l2").keep == {g.name: (1,)}
    # keeping 2 drops the weakest unit (2) under both
    assert fxprune.Plan.from_ratio(a, 0.3, criterion="l1").keep == {g.name: (0, 1)}
    assert fxprune.Plan.from_ratio(a, 0.3, criterion="l2").keep == {g.name: (0, 1)}


def test_l2_is_the_standard_norm_and_unknown_names_raise():
    from fxprune.core.errors import ImportanceError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    a = fxprune.analyze(model, torch.randn(2, 3))
    (g,) = a.groups
    w0, w2 = model[0].weight.detach(), model[2].weight.detach()
    want = torch.sqrt((w0 ** 2).sum(1) + (w2 ** 2).sum(0)).numpy()  # ||unit's weights||_2
    np.testing.assert_allclose(magnitude_scores(a, g, p=2), want, rtol=1e-5)
    with pytest.raises(ImportanceError, match="unknown criterion 'L2'"):
        fxprune.Plan.from_ratio(a, 0.5, criterion="L2")


def test_callable_criterion_and_random_seed(analysis):
    by_index = fxprune.Plan.from_ratio(analysis, 0.5,
                                       criterion=lambda a, g: -np.arange(g.size))
    assert by_index.keep == {"conv1.weight[0]": (0, 1, 2, 3), "conv2.weight[0]": (0, 1, 2)}
    r1 = fxprune.Plan.from_ratio(analysis, 0.5, criterion="random", seed=3)
    r2 = fxprune.Plan.from_ratio(analysis, 0.5, criterion="random", seed=3)
    assert r1.keep == r2.keep
    assert [len(k) for k in r1.keep.values()] == [4, 3]


def test_meta_model_scores_are_zero_and_ties_keep_lowest_indices():
    a = fxprune.analyze(Net().to("meta"), X)
    g = a.groups[0]
    assert not magnitude_scores(a, g).any()
    plan = fxprune.Plan.from_ratio(a, 0.5)
    assert plan.keep["conv1.weight[0]"] == (0, 1, 2, 3)  # stable sort of equal scores


@pytest.mark.parametrize("p", [1, 2])
def test_shared_score_cache_matches_per_group_norms(monkeypatch, p):
    """One plan's cache sums a weight's dims 0 and 1 in blocks of rows (a 1-row block
    here): the same scores as each group's own sums, whatever the block size."""
    import fxprune.core.plan as plan_mod

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(5 * 2 * 2, 7), nn.ReLU(), nn.Linear(7, 2))
    a = fxprune.analyze(model, torch.randn(1, 3, 6, 6))
    monkeypatch.setattr(plan_mod, "_CHUNK", 1)
    cache: dict = {}
    shared = [magnitude_scores(a, g, p=p, cache=cache) for g in a.groups]
    assert len(cache) >= 6  # dims 0 and 1 of the three weights between free groups
    for g, got in zip(a.groups, shared):
        np.testing.assert_allclose(got, magnitude_scores(a, g, p=p), rtol=1e-6)
    w = model[2].weight.detach()
    conv2_out = next(g for g in a.groups if any(m.fqn == "2.weight" and m.dim == 0
                                                for m in g.members))
    want = (w.abs() ** p).sum((1, 2, 3)) + (model[5].weight.detach().abs() ** p) \
        .reshape(7, 5, 4).sum((0, 2)) + model[2].bias.detach().abs() ** p
    want = want.sqrt() if p == 2 else want
    np.testing.assert_allclose(shared[a.groups.index(conv2_out)], want.numpy(), rtol=1e-5)


def test_wrong_argument_types_are_plan_errors_naming_the_remedy(analysis):
    """A model where the analysis goes, a dict where the plan goes, a string ratio: typed
    errors (they were AttributeError 'no attribute gm' / 'analysis', TypeError '<=')."""
    model = Net().eval()
    for make in (lambda: fxprune.plan(model, "l1", ratio=0.3),
                 lambda: fxprune.Plan.from_ratio(model, 0.3),
                 lambda: fxprune.Plan.from_indices(model, {0: [0]})):
        with pytest.raises(fxprune.PlanError, match=r"GroupAnalysis of fxprune.analyze.*not Net"):
            make()
    with pytest.raises(fxprune.PlanError, match="ratio must lie in"):
        fxprune.Plan.from_ratio(analysis, "0.3")
    plan = fxprune.Plan.from_ratio(analysis, 0.5)
    with pytest.raises(fxprune.PlanError, match="compile takes a fxprune.Plan, not dict"):
        fxprune.compile(model, {"conv1.weight[0]": [0, 1]})
    assert plan.keep


def test_from_ratio_round_to_auto_points_to_the_planner():
    """(trial19) it raised TypeError comparing 'auto' < 1."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 8, 8),))
    with pytest.raises(fxprune.PlanError, match=r"fxprune.plan\(analysis"):
        fxprune.Plan.from_ratio(analysis, 0.5, round_to="auto")
    with pytest.raises(fxprune.PlanError, match="an int >= 1"):
        fxprune.Plan.from_ratio(analysis, 0.5, round_to=2.5)
