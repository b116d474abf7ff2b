"""passes/gates.py: gates at 1 leave the function alone; gates at a kept mask compute
what the mask oracle computes; every consumption edge carries exactly one gate."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from passes.gates import insert_gates
from passes.mask import insert_masks


class Blocks(nn.Module):
    """A grouped conv in a residual, q/k/v heads into SDPA, and nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        y = y + self.grouped(y)
        t = y.flatten(2).transpose(1, 2)  # B, 16 tokens, 8
        b, n, _ = t.shape
        q = self.q(t).view(b, n, 2, 4).transpose(1, 2)
        k = self.k(t).view(b, n, 2, 4).transpose(1, 2)
        v = self.v(t).view(b, n, 2, 4).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 8)
        h = t + self.o(a)
        m, _ = self.mha(h, h, h)
        return self.fc((h + m).mean(1))


def _models():
    import torchvision

    return [("blocks", Blocks(), torch.randn(2, 3, 4, 4)),
            ("resnet18", torchvision.models.resnet18(num_classes=5), torch.randn(1, 3, 32, 32)),
            ("swin_t", torchvision.models.swin_t(num_classes=5), torch.randn(1, 3, 64, 64))]


@pytest.mark.parametrize("name,model,x", _models(), ids=["blocks", "resnet18", "swin_t"])
def test_gates_reproduce_the_model_and_the_mask_oracle(name, model, x, rng, helpers):
    model.eval()
    before = helpers.snapshot(model)
    analysis = fxprune.analyze(model, (x,))
    gated = insert_gates(analysis)
    run = gated.model().eval()
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x), rtol=0, atol=0)
    assert gated.gated_groups == {g.id for g in analysis.groups}  # every group has a gate
    for trial in range(3):
        kept = rng.random(analysis.num_units) > 0.4
        for g in analysis.groups:
            kept[np.flatnonzero(analysis.group_of == g.id)[0]] = True
        exact = np.array([analysis.groups[i].exact for i in analysis.group_of])
        kept |= ~exact  # the oracle is exact only for exact groups
        with torch.no_grad():
            gated.gates.copy_(torch.as_tensor(kept, dtype=gated.gates.dtype))
            want = insert_masks(analysis, kept).eval()(x)
            torch.testing.assert_close(run(x), want, rtol=1e-5, atol=1e-6)
    helpers.assert_untouched(model, before)


def test_one_gate_per_consumption_edge():
    """stem -> bn -> relu -> grouped: one site (relu -> grouped), none after stem or bn;
    a contraction (q.k in SDPA) gates its first operand only."""
    model = Blocks()
    analysis = fxprune.analyze(model, (torch.randn(2, 3, 4, 4),))
    gated = insert_gates(analysis)
    consumers = [(s.producer, s.consumer) for s in gated.sites]
    assert len(consumers) == len(set(consumers))
    assert [s.producer for s in gated.sites if s.consumer == "grouped"] == ["relu"]
    assert not [s for s in gated.sites if s.producer in ("stem", "bn")]
    sdpa = [s for s in gated.sites if "scaled_dot_product" in s.consumer]
    assert len(sdpa) >= 1 and all("transpose" in s.producer for s in sdpa)
    qk = next(g for g in analysis.groups
              if any(m.fqn == "q.weight" and m.role == "out" for m in g.members))
    assert sum(qk.id in s.groups for s in sdpa) == 1
    mha_heads = [g for g in analysis.groups if all(m.fqn.startswith("mha.") for m in g.members)]
    assert mha_heads and {fqn for fqn, _, _ in gated.param_gates} == {"mha.in_proj_weight",
                                                                     "mha.in_proj_bias"}


def test_a_zero_gate_removes_a_nonfinite_unit():
    """gate 0 computes the unit's removal: nothing, also where its value is nan or inf
    (x * 0 would be nan); a nan of a gated-on unit passes."""
    from passes.gates import apply_gate

    x = torch.ones(2, 3, 4)
    x[:, 1] = float("nan")
    x[:, 2, 0] = float("inf")
    gates = torch.tensor([1.0, 0.0])
    out = apply_gate(x, gates, torch.tensor([0, 1, 1]), 1)
    assert torch.equal(out[:, 1:], torch.zeros(2, 2, 4)) and torch.equal(out[:, 0], x[:, 0])
    out = apply_gate(x, torch.tensor([0.0, 1.0]), torch.tensor([0, 1, 2]), 1)  # 2: ungated
    assert torch.isnan(out[:, 1]).all() and torch.isinf(out[:, 2, 0]).all()
    assert torch.equal(out[:, 0], torch.zeros(2, 4))
