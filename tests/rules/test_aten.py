"""ATen-level rules: what the torch.export front-end produces (passes/rules/aten.py and the
ATen overloads that canonicalise onto torch-level rules)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


def export_analysis(model, inputs, policy="inner"):
    gm = fxprune.trace(model.eval(), inputs, frontend="export")
    return gm, fxprune.analyze(gm, inputs, split_policy=policy)


def targets(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


class SliceMid(nn.Module):
    """Only features 2..9 of ``a`` are read: a slice with literal bounds on a channel dim."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))[..., 2:10])


def test_slice_takes_a_run_of_units_and_its_bounds_follow(check_pruned):
    x = torch.randn(2, 5, 6)
    gm, analysis = export_analysis(SliceMid(), (x,))
    assert "aten.slice.Tensor" in targets(gm)
    g = analysis.group("a.weight[0]")
    b_cols = next(m for m in g.members if m.fqn == "b.weight")
    assert b_cols.units.tolist() == list(range(2, 10))
    plan = fxprune.Plan.from_indices(analysis, {g.name: [0, 3, 4, 7, 9, 11]})
    small = check_pruned(gm, (x,), plan).small
    bounds = [n.args[2:4] for n in small.graph.nodes if "slice" in str(n.target)]
    assert bounds == [(1, 5)]  # kept 0, 3, 4, 7, 9, 11: 3, 4, 7, 9 lie in [2, 10)


class Select(nn.Module):
    def __init__(self, dead: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.dead = dead

    def forward(self, x):
        h = self.a(x)
        if self.dead:
            h[:, :, -1]  # noqa: B018 - read for its shape only (BART does this)
        return self.b(h[:, 0])  # class token


@pytest.mark.parametrize("dead", [False, True])
def test_select_on_tokens_keeps_channels(dead, check_pruned):
    x = torch.randn(2, 5, 4)
    gm, analysis = export_analysis(Select(dead), (x,))
    assert "aten.select.int" in targets(gm)
    g = analysis.group("a.weight[0]")
    assert g.size == 8 and g.exact
    check_pruned(gm, (x,), fxprune.Plan.from_ratio(analysis, 0.5, criterion="random"))


class SelectChannel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)

    def forward(self, x):
        h = self.a(x)
        return h * h[..., 3:4] + h[..., 5].unsqueeze(-1)


def test_select_of_a_channel_pins_it():
    _, analysis = export_analysis(SelectChannel(), (torch.randn(2, 4),))
    assert not analysis.groups
    assert any("integer index into a channel dim" in r
               for r in analysis.pin_reasons[("a.weight", 0)])


class GQA(nn.Module):
    """SDPA with ``enable_gqa=True``: query head h reads key/value head h // 2."""

    def __init__(self, dim: int = 16, heads: int = 4, kv_heads: int = 2, hd: int = 4) -> None:
        super().__init__()
        self.hd = hd
        self.q, self.k = nn.Linear(dim, heads * hd), nn.Linear(dim, kv_heads * hd)
        self.v, self.o = nn.Linear(dim, kv_heads * hd), nn.Linear(heads * hd, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(a.transpose(1, 2).reshape(b, n, -1))


def test_enable_gqa_couples_each_kv_head_with_its_query_heads(check_pruned):
    x = torch.randn(2, 5, 16)
    gm, analysis = export_analysis(GQA(), (x,), policy="outer")
    g = analysis.group("q.weight[0]")
    q = next(m for m in g.members if m.fqn == "q.weight")
    k = next(m for m in g.members if m.fqn == "k.weight")
    assert g.size == 2 and q.units.tolist() == [0] * 8 + [1] * 8 and k.units.tolist() == \
        [0] * 4 + [1] * 4
    small = check_pruned(gm, (x,), fxprune.Plan.from_indices(analysis, {g.name: [1]})).small
    assert small.get_parameter("q.weight").shape[0] == 8
    assert small.get_parameter("k.weight").shape[0] == 4


def test_enable_gqa_head_dim_prunes_like_plain_attention(check_pruned):
    x = torch.randn(2, 5, 16)
    gm, analysis = export_analysis(GQA(), (x,), policy="inner")
    g = analysis.group("q.weight[0]")
    assert g.size == 4 and {m.fqn for m in g.members} == {"q.weight", "q.bias", "k.weight",
                                                          "k.bias"}
    small = check_pruned(gm, (x,), fxprune.Plan.from_indices(analysis, {g.name: [0, 3]})).small
    scales = [n.kwargs.get("scale") for n in small.graph.nodes if "scaled_dot" in str(n.target)]
    assert scales == [pytest.approx(1 / math.sqrt(4))]  # the original head_dim's scale


class HeadBias(nn.Module):
    """A per-head additive bias as SDPA's mask (T5's relative position bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.bias = nn.Parameter(torch.randn(1, 4, 5, 5))
        self.o = nn.Linear(8, 8)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 2).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.o(a.transpose(1, 2).reshape(b, n, 8))


def test_attention_mask_heads_follow_the_query_heads(check_pruned):
    x = torch.randn(2, 5, 8)
    gm, analysis = export_analysis(HeadBias(), (x,), policy="outer")
    g = analysis.group("qkv.weight[0]")
    bias = next(m for m in g.members if m.fqn == "bias")
    assert bias.dim == 1 and bias.units.tolist() == [0, 1, 2, 3]
    small = check_pruned(gm, (x,), fxprune.Plan.from_indices(analysis, {g.name: [0, 2]})).small
    assert small.get_parameter("bias").shape == (1, 2, 5, 5)


class Conv1DLike(nn.Module):
    """HF's Conv1D: ``addmm(bias, x.view(-1, in), W)`` with W stored (in, out)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(6, 10)), nn.Parameter(torch.randn(10))
        self.w2, self.b2 = nn.Parameter(torch.randn(10, 3)), nn.Parameter(torch.randn(3))

    def forward(self, x):
        b, n, c = x.shape
        h = torch.addmm(self.b1, x.view(-1, c), self.w1).view(b, n, 10)
        return torch.addmm(self.b2, torch.tanh(h).view(-1, 10), self.w2).view(b, n, 3)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_addmm_with_an_in_out_weight_is_a_stop_op(frontend, check_pruned):
    x = torch.randn(2, 5, 6)
    gm = fxprune.trace(Conv1DLike(), (x,), frontend=frontend)
    analysis = fxprune.analyze(gm, (x,))
    g = analysis.group("w1[1]")
    assert {(m.fqn, m.dim, m.role) for m in g.members} == {("w1", 1, "out"), ("b1", 0, "dep"),
                                                           ("w2", 0, "in")}
    check_pruned(gm, (x,), fxprune.Plan.from_ratio(analysis, 0.5, criterion="random"))


class FusedKernel(nn.Module):
    """A decomposed graph calls the fused CPU kernel, which returns (out, logsumexp)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(8, 8) for _ in range(3))
        self.o = nn.Linear(8, 8)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, 2, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
        return self.o(out.transpose(1, 2).reshape(b, n, 8))


def test_fused_sdpa_kernels_couple_like_sdpa(check_pruned):
    x = torch.randn(2, 5, 8)
    gm = fxprune.trace(FusedKernel(), (x,), frontend="fx")
    analysis = fxprune.analyze(gm, (x,), split_policy="inner")
    qk = analysis.group("q.weight[0]")  # one head_dim for q, k and v in a fused kernel
    assert {m.fqn for m in qk.members} >= {"q.weight", "k.weight", "v.weight"} and qk.size == 4
    plan = fxprune.Plan.from_indices(analysis, {qk.name: [1, 2]})
    small = check_pruned(gm, (x,), plan).small
    kernel = next(n for n in small.graph.nodes if "flash_attention" in str(n.target))
    assert kernel.kwargs["scale"] == pytest.approx(0.5)  # 1/sqrt(4), the original


class Casts(nn.Module):
    """What HF's RMSNorm exports to: dtype casts (with dtype asserts), mean over channels,
    a no_grad region, elementwise torch.min of two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.weight = nn.Parameter(torch.rand(8) + 0.5)
        self.register_buffer("cap", torch.full((8,), 2.0))

    def forward(self, x):
        h = self.a(x).to(torch.float32)
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        with torch.no_grad():
            cap = self.cap * 1.5
        return self.b(torch.min(h, cap).to(torch.float32))


def test_casts_asserts_and_grad_regions_are_transparent(check_pruned):
    x = torch.randn(2, 4)
    model = Casts()
    gm, analysis = export_analysis(model, (x,))
    assert "aten._assert_tensor_metadata.default" in targets(gm)
    assert not any("wrap_with_set_grad_enabled" in t for t in targets(gm))
    assert analysis.barriers == ()
    g = analysis.group("a.weight[0]")
    assert {m.fqn for m in g.members} == {"a.weight", "a.bias", "weight", "cap", "b.weight"}
    assert not g.exact and any("mean over a channel dim" in r for r in g.inexact_because)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert torch.is_grad_enabled()
    check_pruned(gm, (x,), fxprune.Plan.from_ratio(analysis, 0.5, criterion="random"))


def test_verify_runs_float32_casts_in_float64():
    """A ``to(float32)`` in the graph would round the float64 comparison run."""
    class Roundtrip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 64), nn.Linear(64, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)).to(torch.float32) * 1e3)

    x = torch.randn(3, 4)
    gm, analysis = export_analysis(Roundtrip(), (x,))
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="random")
    report = fxprune.verify(gm, fxprune.compile(gm, plan), plan, (x,))
    assert report.ok and report.max_node_rel_error < 1e-12


class Normalized(nn.Module):
    """F.normalize exports to linalg_vector_norm(x, 2.0, [-1], True): the dim comes third."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)  # (B, 6, 8): normalised over the channels
        return self.b(F.normalize(h, dim=-1).transpose(1, 2)).transpose(1, 2)


def test_vector_norm_reads_its_dim_after_the_order():
    gm, analysis = export_analysis(Normalized(), (torch.randn(2, 6, 4),))
    assert any("linalg_vector_norm" in t for t in targets(gm))
    assert any("reduction over a channel dim" in r for r in analysis.pin_reasons[("a.weight", 0)])
