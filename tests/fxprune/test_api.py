"""The public pipeline (fxprune/api.py): analyze -> Plan -> compile -> verify, front-ends,
meta models, reports."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = F.relu(self.bn1(self.c1(x)))
        y = F.relu(y + self.bn2(self.c2(y)))
        y = F.relu(self.c3(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


X = torch.randn(2, 3, 8, 8)


def summary(a):
    return [(g.name, g.size, g.granularity, g.exact,
             sorted((m.fqn, m.dim, m.role, tuple(m.units.tolist())) for m in g.members))
            for g in a.groups]


def test_groups_of_the_small_cnn():
    a = fxprune.analyze(SmallCNN().eval(), X)
    # c1 and c2 outputs meet at the residual add: one group; c3 starts another
    assert [(g.name, g.size) for g in a.groups] == [("c1.weight[0]", 8), ("c3.weight[0]", 12)]
    res = a.groups[0]
    assert {(m.fqn, m.role) for m in res.members if m.dim in (0, 1)} >= {
        ("c1.weight", "out"), ("c2.weight", "out"), ("c2.weight", "in"), ("c3.weight", "in")}


def test_end_to_end_and_report(check_pruned):
    model = SmallCNN().eval()
    a = fxprune.analyze(model, X)
    plan = fxprune.Plan.from_ratio(a, 0.5)
    pruned = check_pruned(model, X, plan)
    report, small = pruned.report, pruned.small
    n = sum(p.numel() for p in model.parameters())
    assert report.params_before == n
    # 8 -> 4 and 12 -> 6 by hand: c1 3*4*9+4, bn1 4+4, c2 4*4*9+4, bn2 4+4,
    # c3 4*6*9+6, fc 6*5+5
    assert report.params_after == (108 + 4) + 8 + (144 + 4) + 8 + (216 + 6) + 35
    assert [(c.group, c.size, c.removed, c.check) for c in report.groups] == [
        ("c1.weight[0]", 8, 4, "exact"), ("c3.weight[0]", 12, 6, "exact")]
    text = report.table()
    assert text.startswith("slice == mask: OK")
    assert "c1.weight[0]" in text and "c3.weight[0]" in text
    assert small.c2.weight.shape == (4, 4, 3, 3) and small.fc.in_features == 6


def test_compile_accepts_the_analysis_or_another_instance(check_pruned):
    m1 = SmallCNN().eval()
    a = fxprune.analyze(m1, X)
    plan = fxprune.Plan.from_ratio(a, 0.5)
    s1 = fxprune.compile(m1, plan)
    s2 = fxprune.compile(a, plan)
    assert all(torch.equal(s1.state_dict()[k], v) for k, v in s2.state_dict().items())
    # another instance of the same architecture: re-analysed, and *its* weights are sliced
    m2 = SmallCNN().eval()
    s3 = fxprune.compile(m2, plan)
    keep = torch.tensor(plan.keep["c1.weight[0]"])
    assert torch.equal(s3.c1.weight, m2.c1.weight[keep])
    assert not torch.equal(s3.c1.weight, s1.c1.weight)


def test_compile_without_check_returns_the_same_module():
    model = SmallCNN().eval()
    a = fxprune.analyze(model, X)
    plan = fxprune.Plan.from_ratio(a, 0.25)
    fast = fxprune.compile(model, plan, check=False)
    full = fxprune.compile(model, plan)
    assert fast.code == full.code
    with torch.no_grad():
        assert torch.equal(fast(X), full(X))


def test_export_frontend_gives_the_same_groups_as_fx(check_pruned):
    model = SmallCNN().eval()
    fx = fxprune.analyze(model, X, frontend="fx")
    ex = fxprune.analyze(model, X, frontend="export")
    assert ex.gm.meta["fxprune"]["frontend"] == "export"
    assert [(g.name, g.size, g.exact) for g in ex.groups] == \
        [(g.name, g.size, g.exact) for g in fx.groups]
    plan = fxprune.Plan.from_indices(ex, {0: [0, 2, 4], 1: [1, 3, 5, 7]})
    small = check_pruned(model, X, plan).small
    assert small.get_parameter("c3.weight").shape == (4, 3, 3, 3)


def test_meta_model_gives_the_same_groups_and_fingerprint(check_pruned):
    real = SmallCNN().eval()
    meta = copy.deepcopy(real).to("meta")
    a_real, a_meta = fxprune.analyze(real, X), fxprune.analyze(meta, X)
    assert summary(a_meta) == summary(a_real)
    assert a_meta.fingerprint == a_real.fingerprint
    # a plan made on the meta model applies to the materialised one
    plan = fxprune.Plan.from_json(fxprune.Plan.from_indices(a_meta, {0: [1, 2]}).to_json())
    check_pruned(real, X, plan, analysis=a_real)
    small_meta = fxprune.compile(meta, fxprune.Plan.from_indices(a_meta, {0: [1, 2]}))
    assert small_meta.c1.weight.is_meta and small_meta.c1.weight.shape == (2, 3, 3, 3)


@pytest.mark.parametrize("train,frontend", [(True, "fx"), (False, "fx"), (False, "export")])
def test_analyze_leaves_the_model_untouched(helpers, train, frontend):
    model = SmallCNN().train(train)
    model.c1.weight.requires_grad_(False)
    before = helpers.snapshot(model)
    fxprune.analyze(model, X, frontend=frontend)
    helpers.assert_untouched(model, before)


def test_export_analysis_of_a_train_mode_model_leaves_buffers_untouched(helpers):
    model = SmallCNN().train()
    before = helpers.snapshot(model)
    fxprune.analyze(model, X, frontend="export")
    helpers.assert_untouched(model, before)


def test_multiple_inputs(check_pruned):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(4, 6, 1)
            self.c = nn.Conv2d(6, 2, 1)

        def forward(self, x, y):
            return self.c(torch.relu(self.a(x) + self.b(y)))

    model = Two().eval()
    inputs = (torch.randn(1, 3, 4, 4), torch.randn(1, 4, 4, 4))
    a = fxprune.analyze(model, inputs)
    (g,) = a.groups
    assert {m.fqn for m in g.members} == {"a.weight", "a.bias", "b.weight", "b.bias",
                                          "c.weight"}
    check_pruned(model, inputs, fxprune.Plan.from_indices(a, {g.id: [0, 5]}))


def test_verify_checks_inexact_groups_by_shape(check_pruned):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 6), nn.GELU(),
                          nn.Linear(6, 2))
    x = torch.randn(3, 4)
    a = fxprune.analyze(model, x)
    report = check_pruned(model, x, fxprune.Plan.from_ratio(a, 0.5)).report
    assert [c.check for c in report.groups] == ["shape", "exact"]
