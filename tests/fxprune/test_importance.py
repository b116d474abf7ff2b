"""fxprune/planning/importance.py: every criterion against values computed by hand on tiny models
(a BN chain, a grouped conv, a residual group, an attention q/k group, a linear
network whose gradients and curvature have closed forms)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.core.errors import ImportanceError, NonFiniteScoreError
from fxprune.planning.importance import CRITERIA, Importance, importance_scores


def _set(param: torch.Tensor, values) -> None:
    with torch.no_grad():
        param.copy_(torch.tensor(values, dtype=param.dtype).reshape(param.shape))


class BnChain(nn.Module):
    """conv1 2->3 (1x1) -> bn -> relu -> conv2 3->2: one group of 3 units, four members."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 1, bias=False)
        _set(self.conv1.weight, [[1, -2], [0.5, 0.5], [-3, 1]])
        _set(self.conv2.weight, [[1, 0, 2], [-1, 1, 0]])
        _set(self.bn.weight, [0.5, -2, 1])
        _set(self.bn.bias, [0.1, 0, -0.2])

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv1(x))))


@pytest.fixture
def bn_chain():
    model = BnChain()
    analysis = fxprune.analyze(model, (torch.randn(1, 2, 2, 2),))
    assert [g.name for g in analysis.groups] == ["conv1.weight[0]"]
    return model, analysis


# conv1 rows |.|: [3, 1, 4]; conv2 columns |.|: [2, 1, 2]; |gamma| [.5, 2, 1]; |beta| [.1, 0, .2]
def test_l1_sums_every_member_slice(bn_chain):
    _, a = bn_chain
    got = importance_scores(a, "l1")["conv1.weight[0]"]
    np.testing.assert_allclose(got, [3 + 2 + 0.5 + 0.1, 1 + 1 + 2 + 0, 4 + 2 + 1 + 0.2])


@pytest.mark.parametrize("reduction,want", [("mean", [5.6 / 4, 4.0 / 4, 7.2 / 4]),
                                            ("max", [3, 2, 4])])
def test_reductions(bn_chain, reduction, want):
    _, a = bn_chain
    np.testing.assert_allclose(importance_scores(a, "l1", reduction=reduction)["conv1.weight[0]"],
                               want)


def test_layer_norm_divides_each_member_first(bn_chain):
    _, a = bn_chain
    got = importance_scores(a, "l1", layer_norm="max")["conv1.weight[0]"]
    want = (np.array([3, 1, 4]) / 4 + np.array([2, 1, 2]) / 2 + np.array([0.5, 2, 1]) / 2
            + np.array([0.1, 0, 0.2]) / 0.2)
    np.testing.assert_allclose(got, want)


def test_l2_is_the_norm_of_all_member_slices(bn_chain):
    """One L2 everywhere: sqrt of the sum of squares over every slice of the unit."""
    _, a = bn_chain
    got = importance_scores(a, "l2")["conv1.weight[0]"]
    want = [math.sqrt(5 + 2 + 0.25 + 0.01), math.sqrt(0.5 + 1 + 4 + 0),
            math.sqrt(10 + 4 + 1 + 0.04)]
    np.testing.assert_allclose(got, want)
    g = a.group("conv1.weight[0]")
    for name, p in (("l1", 1), ("l2", 2)):
        np.testing.assert_allclose(importance_scores(a, name)[g.name],
                                   fxprune.magnitude_scores(a, g, p=p), rtol=1e-6)


def test_bn_scale_is_abs_gamma(bn_chain):
    _, a = bn_chain
    np.testing.assert_allclose(importance_scores(a, "bn_scale")["conv1.weight[0]"], [0.5, 2, 1])


def test_lamp_per_member_then_summed(bn_chain):
    """Squares: rows [5, .5, 10], columns [2, 1, 4], gamma [.25, 4, 1], beta [.01, 0, .04]."""
    _, a = bn_chain
    rows = [5 / 15, 0.5 / 15.5, 1]
    cols = [2 / 6, 1 / 7, 1]
    gamma = [0.25 / 5.25, 1, 1 / 5]
    beta = [0.01 / 0.05, 0, 1]
    got = importance_scores(a, "lamp")["conv1.weight[0]"]
    np.testing.assert_allclose(got, np.sum([rows, cols, gamma, beta], axis=0))


def test_fpgm_sums_distances_between_filters(bn_chain):
    _, a = bn_chain
    d01, d02, d12 = math.sqrt(6.5), 5.0, math.sqrt(12.5)
    got = importance_scores(a, "fpgm")["conv1.weight[0]"]
    np.testing.assert_allclose(got, [d01 + d02, d01 + d12, d02 + d12], rtol=1e-6)


def test_random_is_seeded_uniform(bn_chain):
    _, a = bn_chain
    one = importance_scores(a, "random", seed=3)["conv1.weight[0]"]
    np.testing.assert_array_equal(one, importance_scores(a, "random", seed=3)["conv1.weight[0]"])
    assert not np.array_equal(one, importance_scores(a, "random", seed=4)["conv1.weight[0]"])
    assert ((0 <= one) & (one < 1)).all()


def test_normalize_divides_by_the_unit_saving():
    """normalize='macs'|'params'|'memory' divides by what removing the unit saves."""
    from fxprune.planning.cost import compute_cost

    model = BnChain()
    a = fxprune.analyze(model, (torch.randn(1, 2, 4, 4),))
    cost = compute_cost(a)
    raw = importance_scores(a, "l1")["conv1.weight[0]"]
    for kind, per_unit in (("macs", 2 * 16 + 2 * 16), ("params", 2 + 2 + 2),
                           ("memory", 3 * 16)):
        np.testing.assert_allclose(cost.unit_cost("conv1.weight[0]", kind), [per_unit] * 3)
        got = Importance("l1", normalize=kind).scores(a, cost=cost)["conv1.weight[0]"]
        np.testing.assert_allclose(got, raw / per_unit, rtol=1e-12)


# ----------------------------------------------------------------------------------
# grouped conv, residual group, attention group
# ----------------------------------------------------------------------------------
class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(1, 4, 1, bias=False)
        self.c1 = nn.Conv2d(4, 4, 1, groups=2, bias=False)
        self.c2 = nn.Conv2d(4, 1, 1, bias=False)
        _set(self.c0.weight, [1, 2, 3, 4])
        _set(self.c1.weight, [[1, -1], [2, 0], [0, 3], [-1, 1]])

    def forward(self, x):
        return self.c2(self.c1(self.c0(x)))


def test_grouped_conv_unit_spans_one_channel_per_group():
    """Unit j of c0's group is channel j of every conv group: c0 rows j and j+2, and
    c1's weight column j (shared by both groups)."""
    a = fxprune.analyze(Grouped(), (torch.randn(1, 1, 2, 2),))
    name = "c0.weight[0]"
    assert a.group(name).size == 2
    np.testing.assert_allclose(importance_scores(a, "l1")[name],
                               [1 + 3 + (1 + 2 + 0 + 1), 2 + 4 + (1 + 0 + 3 + 1)])
    # FPGM on units made of two rows each: (1, 3) and (2, 4) are sqrt(2) apart
    np.testing.assert_allclose(importance_scores(a, "fpgm")[name], [math.sqrt(2)] * 2, rtol=1e-6)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(1, 2, 1, bias=False)
        self.c1 = nn.Conv2d(2, 2, 1, bias=False)
        self.c2 = nn.Conv2d(2, 1, 1, bias=False)
        _set(self.c0.weight, [1, -2])
        _set(self.c1.weight, [[1, 2], [3, -4]])
        _set(self.c2.weight, [5, 6])

    def forward(self, x):
        a = self.c0(x)
        return self.c2(a + self.c1(a))


def test_residual_group_counts_both_producers_and_all_consumers():
    a = fxprune.analyze(Residual(), (torch.randn(1, 1, 2, 2),))
    got = importance_scores(a, "l1")["c0.weight[0]"]
    # c0 row, c1 row (out), c1 column (in), c2 column (in)
    np.testing.assert_allclose(got, [1 + (1 + 2) + (1 + 3) + 5, 2 + (3 + 4) + (2 + 4) + 6])
    np.testing.assert_allclose(importance_scores(a, "l1", reduction="max")["c0.weight[0]"],
                               [5, 7])


class QK(nn.Module):
    """Two heads of head_dim 2 into SDPA: unit j = feature j of every head, in q and k."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(2, 4), nn.Linear(2, 4), nn.Linear(2, 2, bias=False)
        _set(self.q.weight, np.arange(8) - 3.0)
        _set(self.k.weight, np.arange(8) * 0.5)
        _set(self.q.bias, [1, -1, 2, -2])
        _set(self.k.bias, [0, 1, 0, 1])

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 2, 2).transpose(1, 2)
        k = self.k(x).view(b, n, 2, 2).transpose(1, 2)
        v = self.v(x).view(b, n, 2, 1).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 2)


def test_attention_qk_group_spans_rows_of_every_head():
    model = QK()
    a = fxprune.analyze(model, (torch.randn(1, 3, 2),))
    group = next(g for g in a.groups if any(m.fqn == "q.weight" for m in g.members))
    qw, kw = model.q.weight.detach().abs(), model.k.weight.detach().abs()
    qb, kb = model.q.bias.detach().abs(), model.k.bias.detach().abs()
    want = [float(sum(qw[h * 2 + j].sum() + kw[h * 2 + j].sum() + qb[h * 2 + j] + kb[h * 2 + j]
                      for h in range(2))) for j in range(2)]
    np.testing.assert_allclose(importance_scores(a, "l1")[group.name], want, rtol=1e-6)


# ----------------------------------------------------------------------------------
# data-driven criteria: closed forms on y = W2 (g * (W1 x)), L = 1/2 |y - t|^2
# ----------------------------------------------------------------------------------
class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 3, bias=False)
        self.fc2 = nn.Linear(3, 3, bias=False)
        _set(self.fc1.weight, [[1.0, 0.5, 0], [-0.5, 1, 0.2], [0.3, -0.2, 1]])
        _set(self.fc2.weight, [[2.0, 0, 0], [0, 1, 0], [0, 0, 3]])  # orthogonal columns

    def forward(self, x):
        return self.fc2(self.fc1(x))


def half_sse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).sum()


@pytest.fixture
def two_layer():
    torch.manual_seed(1)
    model = TwoLayer().double()
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
               for _ in range(2)]
    analysis = fxprune.analyze(model, (batches[0][0],))
    assert [g.name for g in analysis.groups] == ["fc1.weight[0]"]
    return model, analysis, batches


def _closed_form(model: TwoLayer, batches, gate=np.ones(3)):
    w1 = model.fc1.weight.detach().numpy()
    w2 = model.fc2.weight.detach().numpy()
    grads, curv, taylor = [], [], []
    for x, t in batches:
        x, t = x.numpy(), t.numpy()
        h = x @ w1.T
        r = (h * gate) @ w2.T - t
        grads.append(((r @ w2) * h).sum(0))                      # dL/dg_u
        curv.append((w2 ** 2).sum(0) * (h ** 2).sum(0))          # d2L/dg_u^2 (diagonal H)
        dw1 = (r @ w2).T @ x                                      # dL/dW1 (g = 1)
        dw2 = r.T @ h                                             # dL/dW2
        taylor.append(np.abs(w1 * dw1).sum(1) + np.abs(w2 * dw2).sum(0))
    return np.array(grads), np.array(curv), np.array(taylor)


def _imp(name: str, batches, **kw) -> Importance:
    return Importance(name, data=batches, loss_fn=half_sse, batches=len(batches), **kw)


def test_gate_criteria_match_closed_forms(two_layer):
    model, a, batches = two_layer
    grads, curv, taylor = _closed_form(model, batches)
    score = {n: _imp(n, batches, probes=3).scores(a)["fc1.weight[0]"]
             for n in ("taylor_gate", "fisher", "hessian", "cpd", "taylor")}
    np.testing.assert_allclose(score["taylor_gate"], np.abs(grads.mean(0)), rtol=1e-9)
    np.testing.assert_allclose(score["fisher"], (grads ** 2).mean(0), rtol=1e-9)
    second = np.abs(-grads.mean(0) + 0.5 * curv.mean(0))
    np.testing.assert_allclose(score["hessian"], second, rtol=1e-6)
    # CPD divides by the unit's activation memory: one column of fc1's 4x3 output
    np.testing.assert_allclose(score["cpd"], second / 4, rtol=1e-6)
    np.testing.assert_allclose(score["taylor"], taylor.mean(0), rtol=1e-9)


def test_obd_matches_the_exact_hessian_diagonal(two_layer):
    """OBD = 1/2 sum h_ww w^2; the Hutchinson estimate converges to the exact diagonal."""
    model, a, batches = two_layer
    batches = batches[:1]
    params = dict(model.named_parameters())
    names = list(params)
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    x, t = batches[0]

    def loss(v):
        w1, w2 = v[:9].reshape(3, 3), v[9:].reshape(3, 3)
        return half_sse(x @ w1.T @ w2.T, t)

    diag = torch.autograd.functional.hessian(loss, flat).diagonal()
    h1, h2 = diag[:9].reshape(3, 3).numpy(), diag[9:].reshape(3, 3).numpy()
    w1, w2 = (params[n].detach().numpy() for n in names)
    want = 0.5 * ((h1 * w1 ** 2).sum(1) + (h2 * w2 ** 2).sum(0))
    got = _imp("obd", batches, probes=400, eps=1e-4).scores(a)["fc1.weight[0]"]
    np.testing.assert_allclose(got, want, rtol=0.15)


def test_rescoring_with_removed_units_gates_them_off(two_layer):
    """With unit 0 removed (gate 0), the gate gradients are those of the pruned model."""
    model, a, batches = two_layer
    grads, _, _ = _closed_form(model, batches, gate=np.array([0.0, 1.0, 1.0]))
    kept = np.array([False, True, True])
    got = _imp("taylor_gate", batches).scores(a, kept=kept)["fc1.weight[0]"]
    np.testing.assert_allclose(got[1:], np.abs(grads.mean(0))[1:], rtol=1e-9)


def test_closure_form_and_plan_from_ratio(two_layer, helpers):
    model, a, batches = two_layer
    before = helpers.snapshot(model)

    def closure(m: nn.Module, i: int) -> torch.Tensor:
        x, t = batches[i]
        return half_sse(m(x), t)

    by_closure = Importance("taylor_gate", closure=closure, batches=2).scores(a)
    by_data = _imp("taylor_gate", batches).scores(a)
    np.testing.assert_allclose(by_closure["fc1.weight[0]"], by_data["fc1.weight[0]"])
    plan = fxprune.Plan.from_ratio(a, 0.34, criterion=_imp("fisher", batches))
    assert len(plan.keep["fc1.weight[0]"]) == 2
    # the user's module: same tensors, no gradients, no hooks
    helpers.assert_untouched(model, before)
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n, s in CRITERIA.items() if s.needs_data])
def test_data_driven_criteria_without_data_raise(name, bn_chain):
    _, a = bn_chain
    with pytest.raises(ImportanceError, match="data-driven"):
        Importance(name)
    with pytest.raises(ImportanceError, match="data-driven"):
        fxprune.plan(a, name, ratio=0.5)


def test_bad_settings_raise():
    with pytest.raises(ImportanceError, match="unknown criterion"):
        Importance("magic")
    with pytest.raises(ImportanceError, match="reduction"):
        Importance("l1", reduction="median")
    with pytest.raises(ImportanceError, match="normalize"):
        Importance("l1", normalize="energy")
    with pytest.raises(ImportanceError):
        Importance("l1", batches=0)


def test_non_finite_loss_and_gradients_raise(two_layer):
    _, a, batches = two_layer

    def nan_loss(out, target):
        return out.sum() * float("nan")

    def inf_gradient(out, target):
        return torch.sqrt((out * 0).sum())  # finite (0), gradient 0 * inf = nan

    with pytest.raises(NonFiniteScoreError, match="loss of batch 0"):
        Importance("taylor_gate", data=batches, loss_fn=nan_loss).scores(a)
    with pytest.raises(NonFiniteScoreError, match="fc1.weight"):
        Importance("fisher", data=batches, loss_fn=inf_gradient).scores(a)
    with pytest.raises(NonFiniteScoreError, match="fc1.weight"):
        Importance("taylor", data=batches, loss_fn=inf_gradient).scores(a)


def test_non_finite_or_misshapen_custom_scores_raise(bn_chain):
    _, a = bn_chain

    def nan_scores(analysis, group):
        return np.full(group.size, np.nan)

    def short(analysis, group):
        return np.ones(group.size - 1)

    with pytest.raises(NonFiniteScoreError, match=r"conv1\.weight\[0\]"):
        Importance(nan_scores).scores(a)
    with pytest.raises(ImportanceError, match="gave 2 scores"):
        Importance(short).scores(a)


def test_bn_scale_without_norm_layer_warns_and_keeps_the_group():
    a = fxprune.analyze(Residual(), (torch.randn(1, 1, 2, 2),))
    with pytest.warns(UserWarning, match=r"c0\.weight\[0\].*bn_scale"):
        scores = importance_scores(a, "bn_scale")
    assert np.isposinf(scores["c0.weight[0]"]).all()
