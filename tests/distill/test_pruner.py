"""Prune-while-training: train-mode semantics, scoring, removal, finish (slice == mask)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fxprune.distill import Pruner, cubic_schedule, fit, linear_schedule, mixed_kd_loss
from fxprune.planning.importance import CRITERIA

from tests.distill._distill_models import ResNetlet, batches


def _pruner(frontend="fx", **kw):
    torch.manual_seed(0)
    model = ResNetlet()
    x = batches(1)[0][0]
    kw.setdefault("target_macs", 0.5)
    kw.setdefault("interval", 2)
    kw.setdefault("steps", 4)
    return model, Pruner(model, (x,), frontend=frontend, **kw)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_train_mode_updates_running_stats_and_uses_dropout(frontend):
    model, p = _pruner(frontend)
    assert p.export == (frontend == "export")
    student = p.student.train()
    x = batches(1)[0][0]
    before = {n: b.clone() for n, b in student.gm.named_buffers() if "running_mean" in n}
    assert before
    y1, y2 = student(x), student(x)
    after = dict(student.gm.named_buffers())
    assert all(not torch.equal(before[n], after[n]) for n in before)  # running stats moved
    assert not torch.allclose(y1, y2)                                  # dropout is active
    student.eval()
    frozen = {n: b.clone() for n, b in student.gm.named_buffers() if "running_mean" in n}
    z1, z2 = student(x), student(x)
    assert torch.equal(z1, z2)                                         # eval: deterministic
    assert all(torch.equal(frozen[n], b) for n, b in student.gm.named_buffers() if n in frozen)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_loop_reaches_budget_and_compiles(frontend):
    model, p = _pruner(frontend, interval=2, steps=6)
    reference = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(p.student.parameters(), lr=0.05, momentum=0.9)
    log = fit(p, batches(3), opt, steps=8, progress=False)
    assert [e["removal"] for e in log if e["kind"] == "removal"] == [1, 2, 3]
    assert p.done and p.budget_reached() >= 1.0 - 0.02
    result = p.finish(batches(1, seed=5)[0][0])
    assert result.report.ok and result.student_max_err < 1e-4
    assert result.macs <= 0.5 * result.dense_macs * 1.01
    n_small = sum(t.numel() for t in result.model.parameters())
    assert n_small == result.params < result.dense_params
    for k, v in model.state_dict().items():                 # the user's model is untouched
        assert torch.equal(v, reference[k]), k
    assert all(not isinstance(v, torch.nn.Parameter) for v in [p.student.mask])
    assert all("gate" not in n for n, _ in p.student.named_parameters())


def test_masked_units_stay_zero_and_get_no_gradient():
    model, p = _pruner(interval=1, steps=1)
    x, y = batches(1)[0]
    opt = torch.optim.SGD(p.student.parameters(), lr=0.1, weight_decay=0.0)
    for _ in range(2):
        loss = F.cross_entropy(p.student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        p.step()
    removed = np.flatnonzero(~p.mask.numpy())
    assert len(removed) and torch.all(p.student.mask[removed] == 0)
    loss = F.cross_entropy(p.student(x), y)
    opt.zero_grad()
    loss.backward()
    # every removed unit's producer rows (conv out channels) get exactly zero gradient
    checked = 0
    for g in p.analysis.groups:
        local = p.analysis.local_of[removed[p.analysis.group_of[removed] == g.id]]
        for m in g.members:
            if m.role == "out" and m.fqn.endswith("weight") and len(local):
                grad = p.student.gm.get_parameter(m.fqn).grad
                rows = np.flatnonzero(np.isin(m.units, local))
                assert torch.all(grad[rows] == 0), m.fqn
                checked += 1
    assert checked


FAST = {"taylor_gate", "taylor", "fisher", "cpd", "obd", "bn_scale"}


@pytest.mark.parametrize("criterion", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow)
                                       for c in sorted(CRITERIA)])
def test_every_registered_criterion_runs_in_training(criterion):
    _, p = _pruner(criterion=criterion, interval=2, steps=2)
    opt = torch.optim.SGD(p.student.parameters(), lr=0.01)
    log = fit(p, batches(2), opt, steps=2, progress=False, loss="task")
    assert log and log[-1]["units_removed"] > 0
    assert p.finish().report.ok


def test_gate_scores_come_from_training_backwards():
    _, p = _pruner(criterion="taylor_gate")
    x, y = batches(1)[0]
    p.student.eval()  # deterministic: compare with a hand-taken gate gradient
    loss = F.cross_entropy(p.student(x), y)
    loss.backward()
    p.step()
    gates = p.student.mask.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(p.student.with_gates(
        gates, lambda m: F.cross_entropy(m(x), y)), gates)
    assert torch.allclose(p.rows[0], want.double(), atol=1e-7)


def test_hook_api_with_kd_loss():
    _, p = _pruner(criterion="fisher")
    opt = torch.optim.Adam(p.student.parameters(), lr=1e-3)
    for x, y in batches(4):
        s = p.student(x)
        with torch.no_grad():
            t = p.teacher(x)
        loss = mixed_kd_loss(F.cross_entropy(s, y), s, t, alpha=0.7, temperature=2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        p.step()
    assert p.done and p.finish().report.ok


def test_slimming_penalty_and_selection():
    _, p = _pruner(selection="slimming", l1=1e-2)
    pen = p.penalty()
    gammas = sum(p.student.gm.get_parameter(f).abs().sum() for f in p._norm_scales())
    assert pen.item() == pytest.approx(1e-2 * gammas.item(), rel=1e-6) and pen.requires_grad
    opt = torch.optim.SGD(p.student.parameters(), lr=0.05)
    fit(p, batches(2), opt, steps=4, progress=False, loss="task")
    assert p.criterion == "bn_scale" and p.done and p.finish().report.ok


def test_schedules():
    assert [linear_schedule(k, 4) for k in range(5)] == [0, 0.25, 0.5, 0.75, 1.0]
    assert cubic_schedule(1, 2) == pytest.approx(1 - 0.5 ** 3)
    assert cubic_schedule(2, 2) == 1.0
    _, p = _pruner(schedule="linear", interval=1, steps=3)
    opt = torch.optim.SGD(p.student.parameters(), lr=0.01)
    log = fit(p, batches(1), opt, steps=3, progress=False, loss="task")
    assert [round(e["fraction"], 6) for e in log] == [round(1 / 3, 6), round(2 / 3, 6), 1.0]
    costs = [e["macs"] for e in log]
    assert costs == sorted(costs, reverse=True)


def test_a_user_teacher_is_left_untouched():
    """The teacher is frozen on a copy: the user's teacher keeps its mode and gradients."""
    teacher = ResNetlet().train()
    model, pruner = _pruner(teacher=teacher)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert not pruner.teacher.training
    assert not any(p.requires_grad for p in pruner.teacher.parameters())
