"""Backend-aware rounding (fxprune.cost.rounding): the gain rule, group multiples, plans."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.cost.rounding import (OP_KINDS, RoundingTable, auto_round_to, measure_rounding,
                                   weight_kind)


def _timer(aligned: int, penalty: float):
    """ms of a layer of width c: MACs times a size trend, ``penalty`` more when c is no
    multiple of ``aligned`` (a scalar tail)."""
    macs = {"conv": 9, "conv1x1": 1, "depthwise": 9, "linear": 1}

    def timer(kind: str, c: int) -> float:
        work = macs[kind] * c * (c if kind != "depthwise" else 1)
        return work * c ** -0.3 * (1.0 if c % aligned == 0 else 1.0 + penalty)
    return timer


@pytest.mark.parametrize("aligned", [8, 16])
def test_the_measured_multiple_is_the_aligned_one(aligned):
    table = measure_rounding(timer=_timer(aligned, 0.2))
    assert table.multiples == {k: aligned for k in OP_KINDS}
    assert table.gains["conv"][aligned] == pytest.approx(0.2, rel=1e-3)  # trend fit: ~1e-4
    assert table.gains["conv"][aligned // 2] < 0.15  # half its multiples are slow
    # a larger multiple buys nothing more: the smaller, finer one is kept
    assert table.gains["conv"][32] <= 0.2


def test_no_measurable_gain_keeps_one_and_the_size_trend_is_not_a_gain():
    table = measure_rounding(timer=_timer(1, 0.0))  # faster per MAC when wider, no tail
    assert table.multiples == {k: 1 for k in OP_KINDS}
    assert max(abs(g) for gains in table.gains.values() for g in gains.values()) < 1e-9
    assert RoundingTable.from_json(table.to_json()) == table


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown op kind"):
        measure_rounding(["conv3d"], timer=_timer(8, 0.1))
    with pytest.raises(ValueError, match="span"):
        measure_rounding(counts=range(8, 16), timer=_timer(8, 0.1))
    with pytest.raises(fxprune.PlanError, match="auto"):
        fxprune.plan(fxprune.analyze(nn.Sequential(nn.Linear(4, 4)), torch.randn(1, 4)),
                     ratio=0.5, round_to="8")


def test_weight_kinds():
    assert weight_kind((64, 32)) == "linear"
    assert weight_kind((64, 1, 3, 3)) == "depthwise"
    assert weight_kind((64, 32, 1, 1)) == "conv1x1"
    assert weight_kind((64, 32, 3, 3)) == weight_kind((64, 32, 5)) == "conv"
    assert weight_kind((64,)) is None


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 48, 3, padding=1)
        self.dw = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.pw = nn.Conv2d(48, 12, 1)
        self.fc = nn.Linear(12, 40)
        self.head = nn.Linear(40, 5)

    def forward(self, x):
        x = self.pw(torch.relu(self.dw(torch.relu(self.conv(x)))))
        return self.head(torch.relu(self.fc(x.mean((2, 3)))))


def test_auto_rounds_each_group_to_its_kinds_multiple():
    analysis = fxprune.analyze(Net(), torch.randn(1, 3, 8, 8))
    table = RoundingTable("eager", 1, {"conv": 4, "conv1x1": 2, "depthwise": 16, "linear": 8})
    multiples = auto_round_to(analysis, table)
    by_producer = {next(m.fqn for m in analysis.group(n).members if m.role == "out"): k
                   for n, k in multiples.items()}
    assert by_producer["conv.weight"] == 16   # conv -> depthwise: the stricter multiple
    assert by_producer["pw.weight"] == 4      # 12 units: 8 would leave nothing to cut
    assert by_producer["fc.weight"] == 8
    plan = fxprune.plan(analysis, "l1", ratio=0.5, round_to="auto", rounding=table)
    kept = {n: len(k) for n, k in plan.keep.items()}
    for name, m in multiples.items():
        if name in kept:
            assert kept[name] % m == 0, (name, kept[name], m)
    assert plan.meta["round_to"] == "auto" and plan.meta["round_to_groups"]
    small = fxprune.compile(analysis, plan)
    assert fxprune.verify(analysis, small, plan, torch.randn(1, 3, 8, 8)).ok


def _macs_latency(analysis):
    """A deterministic ``LatencyTable``: every node's ms is its MACs (or its activation
    size) times a constant, sampled dense and at one unit per group."""
    from fxprune.planning.cost import compute_cost, uniform_kept
    from fxprune.planning.cost.latency import _build_table

    cost = compute_cost(analysis)
    samples = []
    for kept in (uniform_kept(analysis, 0.0), None):
        costs = cost.node_costs(kept)
        samples.append((costs, {n: 1e-6 * c.macs + 1e-7 * c.memory + 1e-3
                                for n, c in costs.items()}))
    return _build_table(f"{analysis.fingerprint}|macs", "cpu", cost, samples)


def test_latency_targets_round_by_default(monkeypatch):
    import fxprune.planning.cost.rounding as rounding

    calls = []

    def fake(*args, **kwargs):
        calls.append(kwargs)
        return RoundingTable("eager", 1, {k: 8 for k in OP_KINDS})
    monkeypatch.setattr(rounding, "measure_rounding", fake)
    analysis = fxprune.analyze(Net(), torch.randn(1, 3, 8, 8))
    plan = fxprune.plan(analysis, "l1", ratio=0.5)
    assert not calls and plan.meta["round_to"] == 1
    # a latency table proportional to MACs: a measured one can make 0.8 unreachable at
    # round_to 8 on a noisy machine (CI, stop 17)
    plan = fxprune.plan(analysis, "l1", target_latency=0.8, scope="global",
                        latency=_macs_latency(analysis))
    assert len(calls) == 1 and plan.meta["round_to"] == "auto"
    for name, k in plan.keep.items():
        size = analysis.group(name).size
        if size >= 16 and len(k) < size:
            assert len(k) % 8 == 0


def test_eager_measurement_runs_and_is_cached():
    torch.manual_seed(0)
    a = measure_rounding(["linear"], counts=range(32, 65), repeats=2)
    assert set(a.multiples) == {"linear"} and a.multiples["linear"] in (1, 2, 4, 8, 16, 32)
    assert all(t > 0 for t in a.times_ms["linear"].values())
    assert measure_rounding(["linear"], counts=range(32, 65), repeats=2) is a
    with pytest.raises(ValueError, match="compile"):
        from fxprune.bench import measure_rounding as on_backend
        on_backend("compile")
