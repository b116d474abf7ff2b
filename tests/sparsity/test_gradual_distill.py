"""Gradual (unstructured, cubic) pruning inside the distillation loop: ``fit`` drives a
``GradualPruner`` with the dense model as teacher."""
from __future__ import annotations

import torch
import torch.nn as nn

import fxprune
from fxprune.distill import fit

from _sparse_models import cnn_data, cnn_inputs, small_cnn
from conftest import assert_untouched, snapshot


def test_fit_reaches_the_sparsity_with_a_frozen_teacher():
    torch.manual_seed(0)
    model, x = small_cnn(), cnn_inputs()
    before = snapshot(model)
    pruner = fxprune.GradualPruner(model, x, 0.8, begin=0, end=8, frequency=2)
    teacher_before = snapshot(pruner.teacher)
    assert pruner.student is pruner.model and pruner.budget_reached() == 0.0
    opt = torch.optim.SGD(pruner.student.parameters(), lr=0.05, momentum=0.9)
    log = fit(pruner, cnn_data(batches=4), opt, steps=12, loss="kd", alpha=0.7,
              temperature=4.0, progress=False)
    assert_untouched(model, before)
    assert_untouched(pruner.teacher, teacher_before)  # frozen: no step moved it
    assert not pruner.teacher.training
    assert not any(p.requires_grad for p in pruner.teacher.parameters())
    removals = [e for e in log if e["kind"] == "removal"]
    assert [e["step"] for e in removals] == [3, 5, 7, 9]  # t = 2, 4, 6, 8 (t = 0: sparsity 0)
    assert [round(e["sparsity"], 6) for e in removals] == sorted(
        round(e["sparsity"], 6) for e in removals)
    assert pruner.sparsity == 0.8 and removals[-1]["budget_reached"] == 1.0
    final = fxprune.finalize(pruner.student)
    table = fxprune.sparsity.sparsity_table(final, pruner.plan)
    assert all(r.masked_nonzero == 0 for r in table)
    # the trained weights moved (the loop trained) while the masked ones stayed at 0
    assert any(not torch.equal(a, b) for a, b in zip(final.parameters(), model.parameters()))


def test_a_given_teacher_is_copied_and_used():
    torch.manual_seed(1)
    model, x = small_cnn(), cnn_inputs()
    bigger = small_cnn()
    before = snapshot(bigger)
    pruner = fxprune.GradualPruner(model, x, 0.5, begin=0, end=2, teacher=bigger)
    assert pruner.teacher is not bigger
    with torch.no_grad():
        torch.testing.assert_close(pruner.teacher(x), bigger.eval()(x))
    seen = []

    def loss(s, t, y):
        seen.append(t)
        return nn.functional.mse_loss(s, t)

    fit(pruner, cnn_data(batches=2), torch.optim.SGD(pruner.student.parameters(), lr=0.01),
        steps=3, loss=loss, progress=False)
    assert_untouched(bigger, before)
    with torch.no_grad():
        torch.testing.assert_close(seen[0], pruner.teacher(cnn_data(batches=2)[0][0]))
