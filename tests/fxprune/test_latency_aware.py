"""Latency-aware ranking: ``Importance(normalize="latency")`` (score per predicted ms)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.planning.cost import compute_cost, uniform_kept
from fxprune.planning.cost.latency import _build_table
from fxprune.planning.importance import Importance


class Two(nn.Module):
    """Two branches of equal MACs per unit; only the latency table tells them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.head(y.mean((2, 3)))


def _table(analysis, slow: str, factor: float):
    """ms proportional to MACs, ``factor`` times more for node ``slow``."""
    cost = compute_cost(analysis)
    samples = []
    for kept in (uniform_kept(analysis, 0.0), uniform_kept(analysis, 0.5), None):
        costs = cost.node_costs(kept)
        samples.append((costs, {n: 1e-6 * c.macs * (factor if n == slow else 1.0) + 1e-4
                                for n, c in costs.items()}))
    return cost, _build_table(f"{analysis.fingerprint}|test", "cpu", cost, samples)


@pytest.mark.parametrize("slow", ["a", "b"])
def test_the_slow_branch_loses_more_at_equal_macs(slow):
    torch.manual_seed(0)
    analysis = fxprune.analyze(Two().eval(), torch.randn(1, 3, 8, 8))
    cost, table = _table(analysis, slow, 5.0)
    by_macs = Importance("l1", layer_norm="mean", normalize="macs")
    by_ms = Importance("l1", layer_norm="mean", normalize="latency", latency=table)
    target = dict(target_macs=0.6, scope="global", cost=cost, tolerance=0.05)
    (group,) = analysis.groups  # the concat joins both branches' channels: one group
    piece = {m.fqn.split(".")[0]: set(m.units[m.units >= 0].tolist())
             for m in group.members if m.role == "out"}
    kept = {}
    for name, imp in (("macs", by_macs), ("latency", by_ms)):
        plan = fxprune.plan(analysis, imp, **target)
        units = set(plan.keep[group.name])
        kept[name] = {branch: len(units & mine) for branch, mine in piece.items()}
        assert plan.meta["macs"] <= 0.6 * plan.meta["dense_macs"]
    fast = "b" if slow == "a" else "a"
    assert kept["latency"][slow] < kept["latency"][fast]
    assert kept["latency"][slow] < kept["macs"][slow]
    # the scores: ratio of the two branches' per-unit savings is the factor
    scores = by_ms.scores(analysis, cost=cost)
    raw = Importance("l1", layer_norm="mean", normalize=None).scores(analysis, cost=cost)
    ratio = raw[group.name] / scores[group.name]
    saving = {branch: float(np.median(ratio[sorted(mine)])) for branch, mine in piece.items()}
    assert saving[slow] / saving[fast] == pytest.approx(5.0, rel=0.05)


def test_latency_normalize_measures_a_table_when_none_is_given():
    analysis = fxprune.analyze(Two().eval(), torch.randn(1, 3, 8, 8))
    scores = Importance("l1", normalize="latency").scores(analysis)
    assert set(scores) == {g.name for g in analysis.groups}
    assert all(np.all(s > 0) for s in scores.values())


def test_a_latency_table_of_another_graph_or_input_is_refused():
    """Another model's table reads its own node names' curves ("conv1", "add"... exist in
    both): refused by graph fingerprint and input shapes, as is a table that is not one."""
    torch.manual_seed(0)
    mine = fxprune.analyze(Two().eval(), torch.randn(1, 3, 8, 8))
    other = fxprune.analyze(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)),
                            torch.randn(1, 3, 8, 8))
    _, table = _table(other, "0", 1.0)
    larger = fxprune.analyze(Two().eval(), torch.randn(1, 3, 12, 12))
    for bad, why in ((table, "another graph"), ({"a": 1.0}, "not dict")):
        with pytest.raises(fxprune.ImportanceError, match=why):
            Importance("l1", normalize="latency", latency=bad).scores(mine)
        with pytest.raises(fxprune.PlanError, match=why):
            fxprune.plan(mine, "l1", target_latency=0.8, latency=bad)
    from fxprune.planning.cost import measure_latency
    measured = measure_latency(compute_cost(mine), fractions=(0.5,), repeats=1)
    assert Importance("l1", normalize="latency", latency=measured).scores(mine)
    with pytest.raises(fxprune.ImportanceError, match=r"shapes \[\(1, 3, 8, 8\)\]"):
        Importance("l1", normalize="latency", latency=measured).scores(larger)


def test_a_latency_table_without_latency_normalize_is_refused():
    from fxprune.core.errors import ImportanceError

    analysis = fxprune.analyze(Two().eval(), torch.randn(1, 3, 8, 8))
    _, table = _table(analysis, "a", 2.0)
    with pytest.raises(ImportanceError, match="normalize='latency' only"):
        Importance("l1", latency=table)


def test_latency_weight_moves_between_per_mac_and_per_ms():
    torch.manual_seed(0)
    analysis = fxprune.analyze(Two().eval(), torch.randn(1, 3, 8, 8))
    cost, table = _table(analysis, "a", 5.0)
    (group,) = analysis.groups
    piece = {m.fqn.split(".")[0]: sorted(set(m.units[m.units >= 0].tolist()))
             for m in group.members if m.role == "out"}
    raw = Importance("l1", layer_norm="mean", normalize=None).scores(analysis, cost=cost)
    per_mac = Importance("l1", layer_norm="mean", normalize="macs").scores(analysis, cost=cost)

    def saving_ratio(w):  # slow branch's divisor over the fast one's
        s = Importance("l1", layer_norm="mean", normalize="latency", latency=table,
                       latency_weight=w).scores(analysis, cost=cost)
        d = raw[group.name] / s[group.name]
        if w == 0:  # ms * (ms / MACs) ** -1 == MACs: the per-MAC ranking exactly
            np.testing.assert_allclose(s[group.name], per_mac[group.name], rtol=1e-9)
        return float(np.median(d[piece["a"]]) / np.median(d[piece["b"]]))

    assert saving_ratio(0) == pytest.approx(1.0, rel=1e-6)  # equal MACs per unit
    assert saving_ratio(1) == pytest.approx(5.0, rel=0.05)
    assert saving_ratio(3) == pytest.approx(5.0 ** 3, rel=0.15)


def test_latency_weight_is_checked():
    for bad in (-1, True, float("inf"), "2"):
        with pytest.raises(fxprune.core.errors.ImportanceError, match="latency_weight must be"):
            Importance("l1", normalize="latency", latency_weight=bad)
    Importance("l1", normalize="latency", latency_weight=np.int64(0))  # numpy numbers too
    with pytest.raises(fxprune.core.errors.ImportanceError, match="normalize='latency' only"):
        Importance("l1", normalize="macs", latency_weight=2)
