"""fxprune/planning/cost/: MACs agree with FlopCounterMode before and after pruning, parameters
and activation memory are exact, per-unit savings are what removing one unit saves."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.planning.cost import compute_cost, measure_latency, node_flops, uniform_kept
from passes.shape_prop import tensor_shapes


class Chain(nn.Module):
    """conv1 3->4 (3x3, pad 1) -> relu -> conv2 4->5 (1x1): hand-countable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


class Mixed(nn.Module):
    """Grouped and depthwise convs, a residual add, flatten into a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 6)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = y + self.grouped(y)
        y = self.pw(F.relu(self.dw(y)))
        return self.fc(F.adaptive_avg_pool2d(y, 4).flatten(1))


class Attention(nn.Module):
    """Linear q/k/v with heads into SDPA, an einsum, a matmul and nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)
        self.proj = nn.Linear(8, 16)
        self.mix = nn.Linear(16, 12)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 4).transpose(1, 2)
        k = self.k(x).view(b, n, 4, 4).transpose(1, 2)
        v = self.v(x).view(b, n, 4, 2).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 8)
        h = self.proj(o)
        m = self.mix(h)
        gram = torch.einsum("bnc,bmc->bnm", m, m)
        h = h + torch.matmul(gram.softmax(-1), h)
        a, _ = self.mha(h, h, h)
        return self.head((h + a).mean(1))


def _models():
    import torchvision

    return [
        ("chain", Chain(), torch.randn(2, 3, 8, 8)),
        ("mixed", Mixed(), torch.randn(2, 3, 8, 8)),
        ("attention", Attention(), torch.randn(2, 5, 16)),
        ("resnet18", torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 64, 64)),
        ("mobilenet_v2", torchvision.models.mobilenet_v2(num_classes=10), torch.randn(1, 3, 64, 64)),
        ("swin_t", torchvision.models.swin_t(num_classes=10), torch.randn(1, 3, 64, 64)),
    ]


MODELS = _models()


def _flops_of(model: nn.Module, x: torch.Tensor) -> int:
    """FlopCounterMode's count, off inference fast paths (fused MHA hides its matmuls)."""
    model = copy.deepcopy(model).eval()
    with FlopCounterMode(display=False) as counter, torch.enable_grad():
        model(x.clone().requires_grad_(True))
    return counter.get_total_flops()


def _random_kept(analysis, rng: np.random.Generator, p: float = 0.4) -> fxprune.Plan:
    keep = {}
    for g in analysis.groups:
        idx = np.flatnonzero(rng.random(g.size) > p)
        keep[g.name] = idx if len(idx) else [int(rng.integers(g.size))]
    return fxprune.Plan.from_indices(analysis, keep)


@pytest.mark.parametrize("name,model,x", MODELS, ids=[m[0] for m in MODELS])
def test_dense_totals_match_flop_counter_and_parameters(name, model, x):
    analysis = fxprune.analyze(model, (x,))
    cost = compute_cost(analysis)
    assert cost.dense.flops == _flops_of(model, x)
    assert cost.dense.params == sum(p.numel() for p in model.parameters())
    assert cost.dense.macs > 0 and cost.dense.memory > 0


@pytest.mark.parametrize("name,model,x", MODELS, ids=[m[0] for m in MODELS])
def test_pruned_costs_match_the_compiled_model_node_by_node(name, model, x, rng):
    """Random removal sets: predicted per-node MACs == FlopCounterMode on the compiled
    graph; params == its parameter count; memory == its activations' element count."""
    analysis = fxprune.analyze(model, (x,))
    cost = compute_cost(analysis)
    plan = _random_kept(analysis, rng)
    small = fxprune.compile(model, plan)
    predicted = cost.node_costs(plan.kept_labels(analysis))
    measured = node_flops(small, (x,))
    for node, flops in measured.items():
        want = predicted.get(node)
        assert (want.flops if want else 0) == pytest.approx(flops, rel=1e-9, abs=1e-6), node
    total = cost.evaluate_plan(plan)
    assert total.flops == pytest.approx(_flops_of(small, x), rel=1e-9)
    assert total.params == sum(p.numel() for p in small.parameters())
    memory = sum(math.prod(s) for n in small.graph.nodes
                 if n.op in ("call_module", "call_function", "call_method")
                 for s in _tensor_shapes(tensor_shapes(n)))
    assert total.memory == memory


def _tensor_shapes(shape):
    if shape is None:
        return []
    if all(isinstance(s, int) for s in shape):
        return [shape]
    return [t for s in shape for t in _tensor_shapes(s)]


def test_chain_costs_by_hand():
    """conv1: 4*3*9*64 = 6912 MACs, conv2: 5*4*64 = 1280. One unit of conv1's group
    saves a quarter of both convs (2048 MACs), its weight row, bias and conv2's column
    (27 + 1 + 5 = 33 params) and one channel of conv1's and relu's outputs (2*64)."""
    model, x = Chain(), torch.randn(1, 3, 8, 8)
    analysis = fxprune.analyze(model, (x,))
    cost = compute_cost(analysis)
    assert cost.dense.macs == 6912 + 1280
    assert cost.dense.params == 4 * 27 + 4 + 5 * 4 + 5
    assert cost.dense.memory == 64 * (4 + 4 + 5)
    group = analysis.group("conv1.weight[0]")
    np.testing.assert_allclose(cost.unit_cost(group, "macs"), [2048] * 4)
    np.testing.assert_allclose(cost.unit_cost(group, "params"), [33] * 4)
    np.testing.assert_allclose(cost.unit_cost(group, "memory"), [128] * 4)
    nodes = cost.node_costs()
    assert nodes["conv1"].macs == 6912 and nodes["conv2"].macs == 1280
    assert nodes["conv1"].params == 112 and nodes["relu"].macs == 0


@pytest.mark.parametrize("name,model,x", MODELS[:3], ids=[m[0] for m in MODELS[:3]])
def test_unit_savings_are_exact_single_removals(name, model, x):
    """unit[kind][u] == dense - cost(u alone removed), for every unit of small models."""
    analysis = fxprune.analyze(model, (x,))
    cost = compute_cost(analysis)
    for label in range(analysis.num_units):
        kept = np.ones(analysis.num_units, dtype=bool)
        kept[label] = False
        after = cost.evaluate(kept)
        for kind in ("macs", "params", "memory"):
            assert cost.unit[kind][label] == pytest.approx(cost.dense[kind] - after[kind],
                                                           rel=1e-9, abs=1e-9), (label, kind)


def test_grouped_and_attention_units_save_the_consumers_side():
    """A grouped conv's input unit spans one column per group; an attention q/k unit
    spans one row per head in q and in k, and its MACs are SDPA's q.k^T share."""
    model, x = Attention(), torch.randn(2, 5, 16)
    analysis = fxprune.analyze(model, (x,))
    cost = compute_cost(analysis)
    qk = next(g for g in analysis.groups if any(m.fqn == "q.weight" for m in g.members)
              and any(m.fqn == "k.weight" for m in g.members))
    # unit = one head_dim index across 4 heads: rows of q and k (16 inputs + bias each)
    np.testing.assert_allclose(cost.unit_cost(qk, "params"), [2 * 4 * 17] * qk.size)
    # q, k projections: 10 tokens x 16 x 4 rows each; SDPA q.k^T: B*H*L*S = 2*4*5*5 per index
    np.testing.assert_allclose(cost.unit_cost(qk, "macs"), [2 * 10 * 16 * 4 + 2 * 4 * 5 * 5] * qk.size)

    grouped_model, gx = Mixed(), torch.randn(1, 3, 8, 8)
    ga = fxprune.analyze(grouped_model, (gx,))
    gcost = compute_cost(ga)
    g = next(g for g in ga.groups if any(m.fqn == "grouped.weight" and m.role == "out"
                                         for m in g.members))
    assert g.size == 4  # 8 channels in 2 conv groups: position j of each group is one unit
    small = fxprune.compile(ga, fxprune.Plan.from_indices(ga, {g.name: [1, 2, 3]}))
    dense = sum(p.numel() for p in grouped_model.parameters())
    assert gcost.unit_cost(g, "params")[0] == dense - sum(p.numel() for p in small.parameters())
    assert gcost.unit_cost(g, "macs")[0] == pytest.approx(
        (_flops_of(grouped_model, gx) - _flops_of(small, gx)) / 2)


def test_floor_and_uniform_kept():
    model, x = Chain(), torch.randn(1, 3, 8, 8)
    analysis = fxprune.analyze(model, (x,))
    cost = compute_cost(analysis)
    # conv1 keeps one channel: 1*3*9*64 + 5*1*64 MACs
    assert cost.floor().macs == 27 * 64 + 5 * 64
    kept = uniform_kept(analysis, 0.5)
    assert kept.sum() == 2
    assert cost.evaluate(kept).macs == 2 * 27 * 64 + 5 * 2 * 64
    assert "conv1" in cost.table()


def test_latency_table_is_measured_cached_and_predicts(tmp_path):
    model, x = Mixed(), torch.randn(2, 3, 8, 8)
    analysis = fxprune.analyze(model, (x,))
    cost = compute_cost(analysis)
    path = tmp_path / "lut.json"
    table = measure_latency(cost, fractions=(0.5, 1.0), repeats=1, cache_path=str(path))
    assert measure_latency(cost, fractions=(0.5, 1.0), repeats=1) is table  # in-memory cache
    assert table.predict(cost) == pytest.approx(table.dense_ms)
    half = table.predict(cost, uniform_kept(analysis, 0.5))
    assert 0 < half <= table.dense_ms
    assert set(table.kinds) <= {"macs", "memory", "const"} and "macs" in table.kinds
    stored = json.loads(path.read_text())
    assert stored["key"] == table.key and len(stored["nodes"]) == len(table.nodes)
    for xs, ts in zip(table.sizes, table.times_ms):
        assert list(ts) == sorted(ts)  # monotone in size


def test_latency_on_meta_is_a_typed_plan_error_with_the_remedy():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    analysis = fxprune.analyze(model, torch.randn(2, 8, device="meta"))
    with pytest.raises(fxprune.PlanError, match="meta device.*latency=table"):
        fxprune.plan(analysis, "random", target_latency=0.5)
