"""Masks survive optimizer steps; cubic schedule; gradual pruning; finalize."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import fxprune
from fxprune.sparsity import current_plan

from _sparse_models import cnn_data, cnn_inputs, small_cnn
from conftest import assert_untouched, snapshot


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.05),
], ids=["sgd_momentum_wd", "adamw"])
def test_optimizer_steps_keep_zeros(make_opt):
    model, x = small_cnn(), cnn_inputs()
    sparse, plan = fxprune.sparsify(model, x, 0.6)
    before = snapshot(sparse)
    train = fxprune.attach_masks(sparse, plan).train()
    assert_untouched(sparse, before)
    opt = make_opt(train.parameters())
    for xb, yb in cnn_data(batches=4):
        F.cross_entropy(train(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    final = fxprune.finalize(train)
    assert parametrize.is_parametrized(train.fc)  # finalize left the training copy alone
    assert not any(parametrize.is_parametrized(m) for m in final.modules())
    params = dict(final.named_parameters())
    moved = 0
    for fqn in plan.masks:
        w, keep = params[fqn], plan.mask(fqn)
        assert isinstance(w, torch.nn.Parameter)
        assert (w[~keep] == 0).all(), fqn
        moved += int((w[keep] != dict(sparse.named_parameters())[fqn][keep]).sum())
    assert moved > 0  # training did change the kept weights
    rows = fxprune.sparsity.sparsity_table(final, plan)
    assert all(r.masked_nonzero == 0 for r in rows)
    assert current_plan(train, plan.fingerprint).masks == plan.masks
    state = final.state_dict()
    assert set(state) == set(model.state_dict())


def test_cubic_schedule_zhu_gupta():
    s = [fxprune.cubic_sparsity(t, 0.8, begin=10, end=20) for t in range(0, 25)]
    assert s[:11] == [0.0] * 11 and s[20:] == [0.8] * 5
    assert all(a < b for a, b in zip(s[10:20], s[11:21]))
    assert s[15] == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert fxprune.cubic_sparsity(12, 0.9, begin=10, end=20, initial=0.5) == pytest.approx(
        0.9 + (0.5 - 0.9) * 0.8 ** 3)


def test_gradual_pruning_reaches_target_and_never_revives():
    model, x = small_cnn(), cnn_inputs()
    before = snapshot(model)
    pruner = fxprune.GradualPruner(model, x, 0.9, begin=0, end=12, frequency=3)
    opt = torch.optim.SGD(pruner.model.parameters(), lr=0.05, momentum=0.9)
    data = cnn_data(batches=13)
    prev = None
    for t, (xb, yb) in enumerate(data):
        F.cross_entropy(pruner.model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        if pruner.step(t):
            now = {k: pruner.plan.mask(k) for k in pruner.plan.masks}
            if prev is not None:
                assert all((now[k] <= prev[k]).all() for k in now)  # zeroed stays zeroed
            prev = now
    assert_untouched(model, before)
    assert pruner.sparsity == 0.9
    for packed in pruner.plan.masks.values():
        assert abs(packed.numel * packed.sparsity - 0.9 * packed.numel) <= 0.5 + 1e-9
    final = fxprune.finalize(pruner.model)
    assert all(r.masked_nonzero == 0 for r in fxprune.sparsity.sparsity_table(final,
                                                                               pruner.plan))
