"""The torch.export front-end yields the same groups as torch.fx for the same architecture.

Small torch models written the way transformer libraries write them (fused or separate
q/k/v ``nn.Linear`` + ``scaled_dot_product_attention``, a hand-written RMSNorm, rotary
embeddings computed under ``no_grad``, GQA's repeat_kv, a SwiGLU MLP, tied embeddings)
are captured by both front-ends: the groups (sizes, granularity, exactness and every
member slice with its role) must be identical, and both prunings must pass slice == mask.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


class VitBlock(nn.Module):
    """Pre-norm ViT: class token, position embedding, fused qkv, SDPA, GELU MLP."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.patch = nn.Linear(12, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 24), nn.GELU(), nn.Linear(24, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        b, n, _ = x.shape  # sizes from config, as HF writes them: (*input_shape, -1, head_dim)
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, -1, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, -1))
        x = x + self.mlp(self.norm2(x))
        return self.head(x[:, 0])


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class LlamaBlock(nn.Module):
    """Decoder layer the way HF writes it: GQA (repeat_kv), rotary, SwiGLU, tied head."""

    def __init__(self, vocab: int = 20, dim: int = 16, heads: int = 4, kv_heads: int = 2,
                 head_dim: int = 4, hidden: int = 24) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.embed = nn.Embedding(vocab, dim)
        self.norm1, self.norm2, self.norm = RMSNorm(dim), RMSNorm(dim), RMSNorm(dim)
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, dim, bias=False)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, head_dim, 2) / head_dim))

    def rotary(self, n: int):
        with torch.no_grad():
            # the buffer is used as is: fx would fold self.inv_freq[None, :] into a constant
            freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq
            emb = torch.cat([freqs, freqs], -1)
            return emb.cos(), emb.sin()

    def rotate_half(self, x):
        half = self.head_dim // 2  # static: fx would see x.shape[-1] // 2 as a computed bound
        return torch.cat([-x[..., half:], x[..., :half]], -1)

    def repeat_kv(self, x):
        b, h, n, d = x.shape
        rep = self.heads // self.kv_heads
        return x[:, :, None, :, :].expand(b, h, rep, n, d).reshape(b, h * rep, n, d)

    def forward(self, ids):
        x = self.embed(ids)
        b, n, _ = x.shape
        cos, sin = self.rotary(n)
        h = self.norm1(x)
        q = self.q(h).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, n, -1, self.head_dim).transpose(1, 2)
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, self.repeat_kv(k), self.repeat_kv(v),
                                           is_causal=True, scale=self.head_dim ** -0.5)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, -1))
        h = self.norm2(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.lm_head(self.norm(x))


MODELS = {
    "vit": (VitBlock, lambda: (torch.randn(2, 4, 12),)),
    "llama": (LlamaBlock, lambda: (torch.randint(0, 20, (2, 6)),)),
}


def signature(analysis) -> list:
    """Everything a group is, minus graph-specific node names."""
    return sorted((g.name, g.size, g.granularity, g.exact,
                   tuple(sorted((m.fqn, m.dim, m.role, tuple(m.units.tolist()))
                                for m in g.members)))
                  for g in analysis.groups)


@pytest.mark.parametrize("policy", ["inner", "outer"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fx_and_export_yield_the_same_groups(name, policy, check_pruned):
    cls, make_inputs = MODELS[name]
    model = cls().eval()
    inputs = make_inputs()
    by_frontend = {}
    for frontend in ("fx", "export"):
        gm = fxprune.trace(model, inputs, frontend=frontend)
        assert gm.meta["fxprune"]["frontend"] == frontend
        analysis = fxprune.analyze(gm, inputs, split_policy=policy)
        by_frontend[frontend] = analysis
        plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="random", seed=1)
        assert plan.keep, "nothing to prune"
        check_pruned(gm, inputs, plan)
    fx, export = (signature(by_frontend[f]) for f in ("fx", "export"))
    assert fx == export


def test_llama_block_structures_are_found_by_export():
    """GQA heads (outer), rotary pairs with inv_freq (inner), SwiGLU, tied hidden size."""
    model = LlamaBlock().eval()
    ids = torch.randint(0, 20, (2, 6))
    outer = fxprune.analyze(model, (ids,), frontend="export", split_policy="outer")
    heads = outer.group("q.weight[0]")
    assert heads.size == 2 and {m.fqn for m in heads.members} == {"q.weight", "k.weight",
                                                                   "v.weight", "o.weight"}
    inner = fxprune.analyze(model, (ids,), frontend="export", split_policy="inner")
    pairs = inner.group("q.weight[0]")
    assert pairs.size == 2 and "inv_freq" in {m.fqn for m in pairs.members}
    mlp = inner.group("gate.weight[0]")
    assert {m.fqn for m in mlp.members} == {"gate.weight", "up.weight", "down.weight"}
    hidden = [g for g in inner.groups if any(m.fqn == "embed.weight" for m in g.members)]
    assert len(hidden) == 1 and not hidden[0].exact  # RMSNorm statistics span it


def test_analyze_falls_back_to_export_when_fx_cannot_trace():
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            if x.shape[0] > 1:  # control flow on a size: fx cannot trace it, export can
                x = x * 2.0
            return self.b(torch.relu(self.a(x)))

    x = torch.randn(2, 4)
    analysis = fxprune.analyze(Dynamic(), (x,))
    assert analysis.gm.meta["fxprune"]["frontend"] == "export"
    assert analysis.group("a.weight[0]").size == 8
