"""Normalisation rules (passes/rules/norm.py): per-channel norms are pass-through with
dependents; LayerNorm / GroupNorm / RMSNorm are channel mixers (exact=False)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def members(group):
    return {(m.fqn, m.dim, m.role) for m in group.members}


def randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                t.uniform_(0.5, 1.5) if "var" in name or name.endswith("weight") \
                    else t.uniform_(-1, 1)


def test_batchnorm2d_dependents_and_num_features(check_pruned):
    before = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1)).eval()
    randomize(before[1])
    x = torch.randn(2, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert {(f"1.{n}", 0, "dep") for n in BN_TENSORS} <= members(g)
    assert ("1.num_batches_tracked", 0, "dep") not in members(g)  # a scalar, never sliced
    assert g.exact
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 2, 3]})).small
    bn = small.get_submodule("1")
    assert bn.num_features == 3
    for n in BN_TENSORS:
        assert torch.equal(getattr(bn, n), getattr(before[1], n)[[0, 2, 3]])


def test_batchnorm1d_after_linear(check_pruned):
    before = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()
    randomize(before[1])
    x = torch.randn(4, 5)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert g.size == 8 and {("1.weight", 0, "dep"), ("1.running_var", 0, "dep")} <= members(g)
    small = check_pruned(before, x, fxprune.Plan.from_ratio(a, 0.5)).small
    assert small.get_submodule("1").num_features == 4


def test_batchnorm_in_train_mode_model_is_left_in_train_mode(check_pruned):
    """A model in train mode: analysis and verify run in eval, the model's flags and its
    running statistics stay exactly as they were (checked by check_pruned)."""
    before = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1)).train()
    x = torch.randn(2, 3, 4, 4)
    a = fxprune.analyze(before, x)
    check_pruned(before, x, fxprune.Plan.from_ratio(a, 0.5))
    assert before.training and before[1].training
    assert int(before[1].num_batches_tracked) == 0


def test_instance_norm_affine_dependents(check_pruned):
    before = nn.Sequential(nn.Conv2d(3, 6, 1), nn.InstanceNorm2d(6, affine=True),
                           nn.Conv2d(6, 2, 1)).eval()
    randomize(before[1])
    x = torch.randn(2, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert {("1.weight", 0, "dep"), ("1.bias", 0, "dep")} <= members(g)
    assert g.exact  # statistics are per channel
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1, 4]})).small
    assert small.get_submodule("1").num_features == 2


def test_instance_norm_without_tensors_num_features_follows(check_pruned):
    before = nn.Sequential(nn.Conv2d(3, 6, 1), nn.InstanceNorm2d(6), nn.Conv2d(6, 2, 1)).eval()
    x = torch.randn(2, 3, 4, 4)
    a = fxprune.analyze(before, x)
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {0: [1, 4]})).small
    assert small.get_submodule("1").num_features == 2


# ----------------------------------------------------------------------------------
class LN(nn.Module):
    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.ln = nn.LayerNorm(6, elementwise_affine=affine)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        return self.b(self.ln(self.a(x)))


def test_layer_norm_flags_group_inexact(check_pruned):
    before = LN()
    randomize(before.ln)
    x = torch.randn(2, 5, 8)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert not g.exact
    assert any("ln" in why for why in g.inexact_because)
    assert {("ln.weight", 0, "dep"), ("ln.bias", 0, "dep"), ("b.weight", 1, "in")} <= members(g)
    plan = fxprune.Plan.from_indices(a, {g.id: [0, 1, 5]})
    pruned = check_pruned(before, x, plan)
    assert pruned.small.ln.normalized_shape == (3,)
    (check,) = [c for c in pruned.report.groups if c.group == g.name]
    assert (check.check, check.removed, check.size) == ("shape", 3, 6)


def test_layer_norm_pruning_is_really_inexact():
    """Why exact=False: masking channels does not change LayerNorm's mean/var over the
    masked tensor the way slicing does, so sliced and masked outputs differ."""
    torch.manual_seed(1)
    before = LN()
    x = torch.randn(2, 5, 8)
    a = fxprune.analyze(before, x)
    plan = fxprune.Plan.from_indices(a, {0: [0, 1, 5]})
    small = fxprune.compile(before, plan)
    from passes.mask import insert_masks

    masked = insert_masks(a, plan.kept_labels(a))
    with torch.no_grad():
        assert not torch.allclose(small(x), masked(x), atol=1e-4)


def test_layer_norm_without_affine_is_pinned():
    """normalized_shape could not follow without a weight to slice: fail closed."""
    assert fxprune.analyze(LN(affine=False), torch.randn(2, 5, 8)).groups == ()


def test_functional_layer_norm_literal_is_rewritten(check_pruned):
    class FLN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 6)
            self.w = nn.Parameter(torch.rand(6) + 0.5)
            self.bias = nn.Parameter(torch.randn(6))
            self.b = nn.Linear(6, 2)

        def forward(self, x):
            return self.b(F.layer_norm(self.a(x), (6,), self.w, self.bias))

    before = FLN()
    x = torch.randn(3, 8)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert not g.exact and {("w", 0, "dep"), ("bias", 0, "dep")} <= members(g)
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [2, 3]})).small
    (node,) = [n for n in small.graph.nodes if n.target is F.layer_norm]
    assert list(node.args[1]) == [2]


def test_rms_norm_is_inexact(check_pruned):
    before = nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert not g.exact and ("1.weight", 0, "dep") in members(g)
    small = check_pruned(before, x, fxprune.Plan.from_ratio(a, 0.5)).small
    assert small.get_submodule("1").normalized_shape == (3,)


def test_group_norm_couples_positions_across_groups(check_pruned):
    """GroupNorm(2, 8): every group must keep the same count, so channel j of group 0 and
    channel j of group 1 form one unit (granularity 2); statistics mix: exact=False."""
    before = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(2, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert (g.size, g.granularity, g.exact) == (4, 2, False)
    (w,) = [m for m in g.members if m.fqn == "1.weight"]
    assert w.units.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 3]})).small
    gn = small.get_submodule("1")
    assert (gn.num_groups, gn.num_channels) == (2, 4)
    assert torch.equal(gn.weight, before[1].weight[[0, 3, 4, 7]])
