"""Count ties (torchvision Swin's ``shifted_window_attention``, timm CaiT / DaViT...): a
reshape size computed from the block input's width (``C // num_heads``, ``reshape(B, N,
C)``) ties the attention's inner width to the residual stream's. The analysis records
``count_ties``; default plans make the attention follow the stream, so
compile(output="module") follows the forward; a plan that breaks the tie is refused
naming the line (fxprune/core/count_ties.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.core.count_ties import broken_count_ties
from fxprune.core.errors import LiteralSizeError


def window_attention(x, qkv_weight, proj_weight, num_heads: int):
    """torchvision's shifted_window_attention, without the windows: C from the input."""
    B, N, C = x.shape
    qkv = F.linear(x, qkv_weight)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)).softmax(-1)
    x = (attn @ v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    return F.linear(x, proj_weight)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return window_attention(x, self.qkv.weight, self.proj.weight, self.num_heads)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.fc2(F.gelu(self.fc1(x)))


class TinySwin(nn.Module):
    def __init__(self, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.Sequential(_Block(dim, heads), _Block(dim, heads))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    model = TinySwin().eval()
    return model, fxprune.analyze(model, (torch.randn(2, 6, 8),))


def test_the_tie_is_recorded_with_its_line_groups_and_factor(swin):
    _, analysis = swin
    ties = analysis.count_ties
    assert len(ties) == 4  # per block: C // num_heads and reshape(B, N, C)
    stream = analysis.group("embed.weight").name
    assert {t.leader for t in ties} == {stream}
    assert {t.follower for t in ties} == {analysis.group("blocks.0.attn.qkv").name,
                                          analysis.group("blocks.1.attn.qkv").name}
    assert sorted((t.num, t.den) for t in ties) == [(1, 1), (1, 1), (1, 3), (1, 3)]
    assert not any(t.why for t in ties)
    assert all(("C // num_heads" if t.den == 3 else "reshape(x.size(0), x.size(1), C)")
               in t.source for t in ties)
    assert "count ties" in analysis.table()


@pytest.mark.filterwarnings("ignore:macs target", "ignore:params target")
@pytest.mark.parametrize("make", [
    lambda a: fxprune.Plan.from_ratio(a, 0.4, criterion="random", seed=1),
    lambda a: fxprune.Plan.from_ratio(a, 0.3, round_to=2),
    lambda a: fxprune.plan(a, "l1", ratio=0.3),
    lambda a: fxprune.plan(a, "l1", target_macs=0.6),
    lambda a: fxprune.plan(a, "l1", target_params=0.4, scope="global"),
    lambda a: fxprune.plan(a, "l1", ratio=0.4, steps=2),
    lambda a: fxprune.plan(a, "l1", ratio=0.3, uniform=True),
], ids=["from_ratio", "from_ratio_round_to", "local", "macs", "global_params", "steps",
     "uniform"])
def test_default_plans_keep_the_tie_and_the_module_follows(swin, make):
    model, analysis = swin
    plan = make(analysis)
    stream, attn = analysis.group("embed.weight").name, analysis.group("blocks.0.attn.qkv").name
    assert stream in plan.keep and attn in plan.keep  # both pruned, not held whole
    assert len(plan.keep[stream]) == 3 * len(plan.keep[attn])  # C' // 3 == kept per head
    assert not broken_count_ties(analysis, plan.kept_labels(analysis))
    assert stream in plan.meta["count_ties"] and not plan.meta["count_ties_whole"]
    graph = fxprune.compile(model, plan)
    small = fxprune.compile(model, plan, output="module")  # proven equal in float64 inside
    assert type(small) is TinySwin
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        want = graph.double()(x)
        got = small.double()(x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_a_plan_breaking_the_tie_is_refused_naming_the_line(swin):
    model, analysis = swin
    plan = fxprune.plan(analysis, "l1", ratio=0.3, split_ties=False)  # the opt-out
    assert plan.meta["count_ties"] == "off"
    fxprune.compile(model, plan)  # the GraphModule takes any plan
    with pytest.raises(LiteralSizeError, match=r"C // num_heads") as err:
        fxprune.compile(model, plan, output="module")
    assert "split_ties=True" in str(err.value)


@pytest.mark.parametrize("make", [fxprune.plan, fxprune.Plan.from_ratio])
def test_a_leader_left_whole_holds_its_followers_whole_and_says_so(swin, make):
    _, analysis = swin
    plan = make(analysis, ratio=0.3, ignore=["embed"])
    stream, attn = analysis.group("embed.weight").name, analysis.group("blocks.0.attn.qkv").name
    assert stream not in plan.keep and attn not in plan.keep
    assert f"it follows {stream}" in plan.meta["count_ties_whole"][attn]
    assert "blocks.0.fc1.weight[0]" in plan.keep  # the rest is still pruned


class _SdpaAttention(nn.Module):
    """timm's Attention as Nest has it: fused qkv, a scale attribute, no head_dim one."""

    def __init__(self, dim: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.num_heads, self.fused_attn = heads, fused
        self.scale = (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TinyNest(nn.Module):
    def __init__(self, fused: bool, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(8, dim), nn.LayerNorm(dim)
        self.attn, self.head = _SdpaAttention(dim, heads, fused), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x)
        return self.head((x + self.attn(self.norm(x))).mean(1))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("scale", ["original", "recompute"])
def test_sdpa_attention_follows_with_either_scale(fused, scale):
    """The fused qkv's rows read as (q/k/v, heads, head_dim) (not one block of 3 x
    head_dim per head), so the scale attribute follows where the graph rescales (SDPA)
    and stays where the graph multiplies by it as a literal (the explicit path)."""
    torch.manual_seed(0)
    model = TinyNest(fused).eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 6, 8),))
    assert analysis.count_ties
    plan = fxprune.plan(analysis, "l1", ratio=0.3)
    small = fxprune.compile(model, plan, output="module", attention_scale=scale)
    head_dim = small.attn.qkv.weight.shape[0] // 9
    assert head_dim < 8 and small.attn.num_heads == 3
    recomputed = scale == "recompute" and fused
    assert small.attn.scale == pytest.approx((head_dim if recomputed else 8) ** -0.5)


class _ClassAttention(nn.Module):
    """CaiT / XCiT ClassAttn: C read off a stream that is never pruned."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.q, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 5)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads)
        return self.proj(q.flatten(2)).mean(1)


def test_a_width_sized_from_a_never_pruned_width_stays_whole():
    torch.manual_seed(0)
    model = _ClassAttention(8, 2).eval()  # x is the model input: its width is pinned
    analysis = fxprune.analyze(model, (torch.randn(2, 6, 8),))
    q = analysis.group("q").name
    assert [t.follower for t in analysis.count_ties] == [q]
    assert "never pruned" in analysis.count_ties[0].why
    plan = fxprune.Plan.from_ratio(analysis, 0.5)
    assert q not in plan.keep and q in plan.meta["count_ties_whole"]
    fxprune.compile(model, plan, output="module")
    forced = fxprune.Plan.from_ratio(analysis, 0.5, split_ties=False)
    assert q in forced.keep
    with pytest.raises(LiteralSizeError, match="C // self.num_heads"):
        fxprune.compile(model, forced, output="module")


def test_torchvision_swin_follows_with_a_recomputed_scale_and_says_why_not_otherwise():
    """shifted_window_attention (a leaf with a rule) declares its tie; v1 computes its
    softmax scale from the kept width, so the original scale cannot be kept."""
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    torch.manual_seed(0)
    model = swin.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[1, 1],
                                 num_heads=[3, 6], window_size=[2, 2], num_classes=5).eval()
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 16, 16),))
    assert len(analysis.count_ties) == 2 and not any(t.why for t in analysis.count_ties)
    plan = fxprune.plan(analysis, "l1", ratio=0.3)
    assert len(plan.meta["count_ties"]) == 2 and not plan.meta["count_ties_whole"]
    small = fxprune.compile(model, plan, output="module", attention_scale="recompute")
    assert small.features[1][0].attn.qkv.weight.shape[0] < 72
    with pytest.raises(LiteralSizeError, match='attention_scale="recompute"'):
        fxprune.compile(model, plan, output="module")


def test_cost_normalised_scores_of_a_leader_count_what_its_followers_save(swin):
    """normalize="macs": a stream unit's saving includes the attention units that follow
    it (1/3 unit of each block's attention per stream unit here)."""
    from fxprune.core.count_ties import count_links
    from fxprune.planning.cost import compute_cost
    from fxprune.planning.planner import _followed_scores

    _, analysis = swin
    imp, cost = fxprune.Importance("l1", normalize="macs"), compute_cost(analysis)
    scores = imp.scores(analysis, cost=cost)
    links, _ = count_links(analysis)
    stream = analysis.group("embed.weight").name
    own = cost.unit_cost(stream, "macs")
    extra = sum(cost.unit_cost(f"blocks.{i}.attn.qkv.weight[0]", "macs").mean() / 3
                for i in range(2))
    got = _followed_scores(analysis, scores, links, imp, cost)
    np.testing.assert_allclose(got[stream], scores[stream] * own / (own + extra))
    assert all((got[n] == scores[n]).all() for n in scores if n != stream)
    plan = fxprune.plan(analysis, imp, target_macs=0.5, scope="global", cost=cost)
    assert not broken_count_ties(analysis, plan.kept_labels(analysis))
