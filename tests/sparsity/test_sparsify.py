"""fxprune.sparsify: exact zeros, realised fractions, N:M, criteria, plan, proof."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fxprune
from fxprune.core.errors import ImportanceError, VerificationError
from fxprune.planning.importance import CRITERIA, Importance
from fxprune.sparsity import SparsityPlan, select_weights, sparsity_table, weight_criteria
from fxprune.sparsity.masks import check_nm, unstructured_masks

from _sparse_models import cnn_data, cnn_inputs, small_cnn
from conftest import assert_untouched, snapshot

CE = F.cross_entropy


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "fisher", "obd", "wanda", "random"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_criterion_gives_exact_zeros_and_proof(criterion, pattern):
    model, x = small_cnn(), cnn_inputs()
    before = snapshot(model)
    sparse, plan = fxprune.sparsify(model, x, pattern=pattern, criterion=criterion,
                                    data=cnn_data(), loss_fn=CE, batches=2, probes=1)
    assert_untouched(model, before)
    assert sparse is not model
    report = fxprune.verify_sparsity(model, sparse, plan, x)
    assert report.ok and abs(report.sparsity - 0.5) < 1e-12
    assert set(plan.masks) == {"conv1.weight", "conv2.weight", "fc.weight"}  # head excluded
    for row in report.layers:
        w = dict(sparse.named_parameters())[row.fqn]
        assert int((w == 0).sum()) == row.numel // 2
        assert not torch.signbit(w[w == 0]).any()  # +0.0, not -0.0


def test_default_kinds_and_configuration():
    gm = fxprune.analyze(small_cnn(), cnn_inputs()).gm
    assert set(select_weights(gm)) == {"conv1.weight", "conv2.weight", "fc.weight"}
    assert set(select_weights(gm, kinds=("linear", "head"))) == {"fc.weight", "head.weight"}
    assert set(select_weights(gm, kinds=("norm",))) == {"bn.weight"}
    assert set(select_weights(gm, ignore=["conv*"], include=["head.*"])) == {"fc.weight",
                                                                           "head.weight"}


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 13), layers=st.integers(1, 3),
       sparsity=st.floats(0.0, 0.999), scope=st.sampled_from(["layer", "row", "global"]))
def test_realised_fraction_within_one_element_per_scope(rows, cols, layers, sparsity, scope):
    g = torch.Generator().manual_seed(rows * 100 + cols)
    scores = {f"w{i}": torch.randn(rows + i, cols, generator=g).double() for i in range(layers)}
    masks = unstructured_masks(scores, sparsity, scope)
    if scope == "global":
        n = sum(s.numel() for s in scores.values())
        zeroed = sum(int((~m).sum()) for m in masks.values())
        assert abs(zeroed - sparsity * n) <= 0.5 + 1e-9
        # the zeroed weights are the lowest scores overall
        kept = torch.cat([s[m] for s, m in zip(scores.values(), masks.values())])
        gone = torch.cat([s[~m] for s, m in zip(scores.values(), masks.values())])
        assert not len(kept) or not len(gone) or gone.max() <= kept.min()
    for k, s in scores.items():
        m = masks[k]
        units = [m] if scope == "layer" else list(m) if scope == "row" else []
        for u in units:
            assert abs(int((~u).sum()) - sparsity * u.numel()) <= 0.5 + 1e-9


def test_nm_pattern_along_reduction_dim():
    model, x = small_cnn(), cnn_inputs()
    sparse, plan = fxprune.sparsify(model, x, pattern="1:4")
    params = dict(sparse.named_parameters())
    for fqn in plan.masks:
        w = params[fqn]
        conv = w.dim() == 4
        assert check_nm(w, 1, 4, conv, fqn) == 0
        assert check_nm(w, 0, 4, conv, fqn) > 0  # the check can fail
        # runs along input channels: every 4 consecutive input channels keep one weight
        nz = (w != 0).movedim(1, -1)
        nz = nz.reshape(*nz.shape[:-1], -1, 4).sum(-1)
        assert (nz == 1).all()
    assert abs(plan.sparsity - 0.75) < 1e-12


def test_wanda_scores_are_weight_times_input_column_norm():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    xs = [torch.randn(5, 8) for _ in range(3)]
    data = [(x, None) for x in xs]
    sparse, plan = fxprune.sparsify(lin, xs[0], 0.5, criterion="wanda", data=data,
                                    batches=3, kinds=("linear",), scope="row")
    norms = torch.cat(xs).double().norm(dim=0)
    score = lin[0].weight.detach().double().abs() * norms
    want = torch.ones_like(score, dtype=torch.bool)
    for r in range(score.shape[0]):
        want[r, torch.argsort(score[r], stable=True)[:4]] = False
    assert torch.equal(plan.mask("0.weight"), want)
    assert not torch.equal(want, lin[0].weight.abs() >= lin[0].weight.abs().median(1,
                           keepdim=True).values)  # differs from magnitude on this draw


def test_taylor_weight_rule_is_abs_w_times_grad():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(7, 6), torch.randint(0, 2, (7,))
    _, plan = fxprune.sparsify(m, x, 0.4, criterion="taylor", data=[(x, y)], loss_fn=CE,
                               batches=1, kinds=("linear", "head"))
    ref = copy.deepcopy(m)
    CE(ref(x), y).backward()
    for fqn in ("0.weight", "2.weight"):
        p = dict(ref.named_parameters())[fqn]
        s = (p.detach() * p.grad).double().abs().reshape(-1)
        want = torch.ones_like(s, dtype=torch.bool)
        want[torch.argsort(s, stable=True)[:round(0.4 * s.numel())]] = False
        assert torch.equal(plan.mask(fqn).reshape(-1), want)


def test_one_registry_names_mean_one_thing():
    assert {"magnitude", "taylor", "fisher", "obd", "wanda"} <= set(weight_criteria())
    assert CRITERIA["taylor"].weight_fn is not None and CRITERIA["taylor"].needs_data
    assert CRITERIA["fpgm"].weight_fn is None
    analysis = fxprune.analyze(small_cnn(), cnn_inputs())
    with pytest.raises(ImportanceError, match="scores single weights"):
        Importance("wanda", data=cnn_data(), loss_fn=CE).scores(analysis)
    with pytest.raises(ImportanceError, match="scores channels"):
        fxprune.sparsify(small_cnn(), cnn_inputs(), criterion="fpgm")


def test_plan_json_round_trip_and_fingerprint():
    model, x = small_cnn(), cnn_inputs()
    sparse, plan = fxprune.sparsify(model, x, 0.7, scope="global")
    again = SparsityPlan.from_json(plan.to_json())
    assert again == plan
    bits = sum(len(m.bits) for m in plan.masks.values())
    assert bits == sum((m.numel + 7) // 8 for m in plan.masks.values())
    rebuilt = fxprune.apply_sparsity(model, again, x)
    for (n, a), (_, b) in zip(sparse.named_parameters(), rebuilt.named_parameters()):
        assert torch.equal(a, b), n
    other = nn.Sequential(nn.Flatten(), nn.Linear(144, 3))
    with pytest.raises(fxprune.PlanError, match="sparsity plan was made for graph"):
        fxprune.apply_sparsity(other, plan, x)


def test_verify_catches_a_leak_and_a_changed_weight():
    model, x = small_cnn(), cnn_inputs()
    sparse, plan = fxprune.sparsify(model, x, pattern="2:4")
    leaky = copy.deepcopy(sparse)
    with torch.no_grad():
        w = leaky.fc.weight
        w[~plan.mask("fc.weight")] = 1.0
    with pytest.raises(VerificationError, match="fc.weight"):
        fxprune.verify_sparsity(model, leaky, plan, x)
    rows = {r.fqn: r for r in sparsity_table(leaky, plan)}
    assert rows["fc.weight"].masked_nonzero > 0 and rows["fc.weight"].nm_violations > 0
    changed = copy.deepcopy(sparse)
    with torch.no_grad():
        changed.conv1.bias += 1.0
    report = fxprune.verify_sparsity(model, changed, plan, x, raise_on_failure=False)
    assert not report.ok and report.max_abs_error > 0
    assert "2:4 violations" in fxprune.verify_sparsity(model, sparse, plan, x).table()


def test_export_frontend_finds_the_same_weights_and_masks():
    model, x = small_cnn(), cnn_inputs()
    gm = fxprune.trace(model, (x,), frontend="export")
    assert set(select_weights(gm)) == set(select_weights(fxprune.analyze(model, x).gm))
    data = [(xb, None) for xb, _ in cnn_data(n=2)]  # the export is specialised to batch 2
    _, via_fx = fxprune.sparsify(model, x, criterion="wanda", data=data)
    sparse, via_export = fxprune.sparsify(gm, x, criterion="wanda", data=data)
    assert via_fx.masks == via_export.masks
    assert fxprune.verify_sparsity(gm, sparse, via_export, x).ok


def test_unit_and_weight_views_of_the_registry():
    assert not CRITERIA["wanda"].scores_units and not CRITERIA["magnitude"].scores_units
    assert CRITERIA["taylor"].scores_units and CRITERIA["l1"].scores_units
