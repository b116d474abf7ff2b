"""Attention rules: nn.MultiheadAttention, scaled_dot_product_attention, Swin window attention."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.core.nn import PrunedMultiheadAttention


class Block(nn.Module):
    """Pre-norm transformer block around nn.MultiheadAttention."""

    def __init__(self, dim: int = 16, heads: int = 4, batch_first: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = h + a
        h = h + self.mlp(h)
        return self.head(h)


def _prune(model, x, policy, seed=0, ratio=0.5):
    a = fxprune.analyze(model, (x,), split_policy=policy)
    plan = fxprune.Plan.from_ratio(a, ratio, criterion="random", seed=seed)
    small = fxprune.compile(model, plan)
    report = fxprune.verify(model, small, plan, (x,))
    return a, plan, small, report


@pytest.mark.parametrize("policy, per_unit", [("inner", 3 * 4), ("outer", 3 * 4)])
def test_mha_head_group_granularity(policy, per_unit):
    torch.manual_seed(0)
    a = fxprune.analyze(Block().eval(), (torch.randn(2, 5, 8),), split_policy=policy)
    heads = a.group("attn.in_proj_weight[0]")
    # inner: 4 head_dim units, each 3 (q,k,v) x 4 heads rows; outer: 4 heads x (3 x 4) rows
    assert heads.size == 4 and heads.granularity == per_unit
    roles = {(m.fqn, m.dim): m.role for m in heads.members}
    assert roles[("attn.in_proj_weight", 0)] == "out"
    assert roles[("attn.out_proj.weight", 1)] == "in"
    assert ("attn.in_proj_bias", 0) in roles
    residual = a.group("inp.weight[0]")
    fqns = {(m.fqn, m.dim) for m in residual.members}
    assert {("attn.in_proj_weight", 1), ("attn.out_proj.weight", 0), ("head.weight", 1)} <= fqns


@pytest.mark.parametrize("policy", ["inner", "outer"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_pruned_is_exact_and_replaced(policy, batch_first):
    torch.manual_seed(1)
    model = Block(batch_first=batch_first).eval()
    x = torch.randn(2, 5, 8) if batch_first else torch.randn(5, 2, 8)
    _, plan, small, report = _prune(model, x, policy, seed=2)
    assert report.ok and report.nodes_checked > 5
    attn = small.get_submodule("attn")
    assert isinstance(attn, PrunedMultiheadAttention)
    if policy == "inner":
        assert attn.num_heads == 4 and attn.head_dim == 2
    else:
        assert attn.num_heads == 2 and attn.head_dim == 4
    assert attn.scale == pytest.approx(1 / math.sqrt(4))  # original scale kept
    assert small(x).shape == model(x).shape


def test_pruned_mha_matches_torch_when_nothing_is_removed():
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(12, 3, batch_first=True).eval()
    ours = PrunedMultiheadAttention(mha, num_heads=3, head_dim=4, scale=0.5).eval()
    q, k = torch.randn(2, 5, 12), torch.randn(2, 7, 12)
    mask = torch.rand(5, 7) > 0.7
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, -2:] = True
    want, want_w = mha(q, k, k, attn_mask=mask, key_padding_mask=pad)
    got, got_w = ours(q, k, k, attn_mask=mask, key_padding_mask=pad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def test_mha_variant_without_rule_support_is_a_barrier():
    class KV(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)

        def forward(self, x):
            h = self.inp(x)
            return self.attn(h, h, h)[0].sum(-1)

    a = fxprune.analyze(KV().eval(), (torch.randn(1, 3, 8),))
    assert not any(m.fqn == "inp.weight" for g in a.groups for m in g.members)


class SDPA(nn.Module):
    def __init__(self, heads: int = 2, dim: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        k = self.k(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, c))


def test_sdpa_couples_q_with_k_and_v_with_output_and_keeps_scale():
    torch.manual_seed(4)
    model, x = SDPA().eval(), torch.randn(2, 5, 8)
    a, plan, small, report = _prune(model, x, "inner", seed=5)
    assert report.ok
    qk = a.group("q.weight[0]")
    assert {m.fqn for m in qk.members} >= {"q.weight", "k.weight", "q.bias", "k.bias"}
    vo = a.group("v.weight[0]")
    assert {(m.fqn, m.dim) for m in vo.members} >= {("v.weight", 0), ("o.weight", 1)}
    sdpa = next(n for n in small.graph.nodes if "scaled_dot_product" in str(n.target))
    if small.q.weight.shape[0] < 8:
        assert sdpa.kwargs["scale"] == pytest.approx(1 / math.sqrt(4))


def test_sdpa_heads_policy_prunes_whole_heads():
    torch.manual_seed(6)
    model, x = SDPA(heads=4, dim=16).eval(), torch.randn(1, 3, 16)
    a = fxprune.analyze(model, (x,), split_policy="outer")
    heads = a.group("q.weight[0]")  # a head couples q, k and v rows (one head index)
    assert heads.size == 4 and heads.granularity == 4
    assert {m.fqn for m in heads.members} >= {"q.weight", "k.weight", "v.weight", "o.weight"}
    plan = fxprune.Plan.from_indices(a, {"q.weight[0]": [0, 2]})
    small = fxprune.compile(model, plan)
    assert small.q.weight.shape == (8, 16) and small.v.weight.shape == (8, 16)
    assert small.o.weight.shape == (16, 8)
    torch.testing.assert_close(small.v.weight, model.v.weight[[0, 1, 2, 3, 8, 9, 10, 11]])
    assert fxprune.verify(model, small, plan, (x,)).ok
    views = [n for n in small.graph.nodes if n.target == "view"]
    assert all(n.args[3] == 2 for n in views)  # literal head count rewritten


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
@pytest.mark.parametrize("policy", ["inner", "outer"])
def test_torchvision_swin_attention(name, policy):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(7)
    model = tv.models.get_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    a, plan, small, report = _prune(model, x, policy, seed=8, ratio=0.4)
    assert report.ok
    heads = next(g for g in a.groups if any(
        m.fqn == "features.1.0.attn.qkv.weight" and m.dim == 0 for m in g.members))
    assert heads.exact and heads.size == (32 if policy == "inner" else 3)
    if policy == "outer":  # per-head tables follow the heads
        per_head = {"features.1.0.attn.relative_position_bias_table", "features.1.0.attn.logit_scale",
                    "features.1.0.attn.cpb_mlp.2.weight"}
        assert per_head & {m.fqn for m in heads.members}
    calls = [n for n in small.graph.nodes if getattr(n.target, "__name__", "") == "window_attention"]
    assert calls and all("head_dim" in n.kwargs for n in calls)


# ----------------------------------------------------------------------------------
# attention_scale="recompute": 1/sqrt(kept head_dim) where fxprune writes the scale
class ScaledSDPA(SDPA):
    """SDPA with an explicit scale: 1/sqrt(head_dim) (as Hugging Face passes its
    ``scaling``) or the model's own temperature, which is never touched."""

    def __init__(self, scale: float) -> None:
        super().__init__(heads=2, dim=8)
        self.scale = scale

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (lin(x).view(b, n, 2, 4).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.o(y.transpose(1, 2).reshape(b, n, c))


def _head_dim_plan(model, x):
    a = fxprune.analyze(model, (x,), split_policy="inner")
    return a, fxprune.Plan.from_indices(a, {"q.weight[0]": [0, 3]})  # head_dim 4 -> 2


def _sdpa_scale(small):
    node = next(n for n in small.graph.nodes if "scaled_dot_product" in str(n.target))
    return node.kwargs.get("scale")


@pytest.mark.parametrize("make, original, recomputed", [
    (lambda: SDPA(), 1 / math.sqrt(4), 1 / math.sqrt(2)),             # default scale
    (lambda: ScaledSDPA(0.5), 1 / math.sqrt(4), 1 / math.sqrt(2)),      # = 1/sqrt(4)
    (lambda: ScaledSDPA(0.3), 0.3, 0.3)])                               # the model's own
def test_sdpa_scale_original_or_recomputed(make, original, recomputed):
    torch.manual_seed(7)
    model, x = make().eval(), torch.randn(2, 5, 8)
    a, plan = _head_dim_plan(model, x)
    same = fxprune.compile(model, plan)
    new = fxprune.compile(model, plan, attention_scale="recompute")
    assert _sdpa_scale(same) == pytest.approx(original)
    assert _sdpa_scale(new) == pytest.approx(recomputed)
    report = fxprune.verify(model, new, plan, (x,))  # slicing checked at original scale
    assert report.ok and report.output_shapes_equal
    with torch.no_grad():
        differs = not torch.allclose(same(x), new(x))
    assert differs == (original != recomputed)


def test_mha_scale_recomputed_on_request():
    torch.manual_seed(1)
    model, x = Block().eval(), torch.randn(2, 5, 8)
    a = fxprune.analyze(model, (x,), split_policy="inner")
    plan = fxprune.Plan.from_ratio(a, 0.5, criterion="random", seed=2)
    small = fxprune.compile(model, plan, attention_scale="recompute")
    attn = small.get_submodule("attn")
    assert attn.head_dim == 2 and attn.scale == pytest.approx(1 / math.sqrt(2))
    assert fxprune.verify(model, small, plan, (x,)).ok


def test_attention_scale_value_is_checked():
    model, x = SDPA().eval(), torch.randn(2, 5, 8)
    a, plan = _head_dim_plan(model, x)
    with pytest.raises(ValueError, match="attention_scale"):
        fxprune.compile(model, plan, attention_scale="auto")


def test_mha_recomputed_scale_reaches_the_module_output():
    """output="module" re-runs the module fixups on the user's class: they read the
    rewrite's options (the recomputed scale), so the module equals the graph."""
    torch.manual_seed(1)
    model, x = Block().eval(), torch.randn(2, 5, 8)
    a = fxprune.analyze(model, (x,), split_policy="inner")
    plan = fxprune.Plan.from_ratio(a, 0.5, criterion="random", seed=2)
    graph = fxprune.compile(model, plan, attention_scale="recompute")
    module = fxprune.compile(model, plan, attention_scale="recompute", output="module")
    assert type(module) is Block
    assert module.attn.scale == pytest.approx(1 / math.sqrt(2))
    with torch.no_grad():
        torch.testing.assert_close(module(x), graph(x), rtol=1e-6, atol=1e-7)


def test_rewrite_options_are_explicit_not_ambient():
    """Fixups read the options of their own rewrite (no context variable): a compile
    with "recompute" leaves the next default compile at the original scale."""
    from passes.rules.registry import RewriteOptions

    assert RewriteOptions().softmax_scale(4, 2) == pytest.approx(0.5)
    assert RewriteOptions("recompute").softmax_scale(4, 2) == pytest.approx(2 ** -0.5)
    with pytest.raises(ValueError, match="attention_scale"):
        RewriteOptions("auto")
    torch.manual_seed(7)
    model, x = SDPA().eval(), torch.randn(2, 5, 8)
    _, plan = _head_dim_plan(model, x)
    fxprune.compile(model, plan, attention_scale="recompute")
    assert _sdpa_scale(fxprune.compile(model, plan)) == pytest.approx(0.5)
