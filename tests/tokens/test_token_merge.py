"""Token merging (ToMe) and pruning (EViT) as graph passes: passes/token_merge.py, fxprune/tokens.py.

The oracle is an eager reference written here with Python loops over tokens (no code
shared with the pass): a timm ViT run block by block, with ToMe's bipartite matching,
size-weighted merges and proportional attention, or EViT's top-k by class attention.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fxprune
from fxprune.core.errors import (AttentionNotFoundError, StaticShapeError, TokenReductionError,
                            TokenScheduleError)
from passes.shape_prop import propagate_shapes
from passes.token_merge import bipartite_merge, find_token_layers
from tests.conftest import assert_untouched, snapshot

timm = pytest.importorskip("timm")


def tiny_vit(reg_tokens: int = 0, global_pool: str = "token", depth: int = 3):
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=32, depth=depth, num_heads=2, num_classes=5,
        reg_tokens=reg_tokens, global_pool=global_pool).eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------
# the reference: loops over tokens
# ----------------------------------------------------------------------------------
def ref_merge(x, metric, size, r, p):
    """ToMe on one sample: x (N, C), metric (N, c), size (N,)."""
    rest = list(range(p, x.shape[0]))
    a, b = rest[0::2], rest[1::2]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    edges = []
    for i in a:
        sims = [float(unit[i] @ unit[j]) for j in b]
        best = max(range(len(b)), key=lambda t: sims[t])
        edges.append((sims[best], i, b[best]))
    edges.sort(key=lambda e: -e[0])
    merged = {i for _, i, _ in edges[:r]}
    into = {j: [j] for j in b}
    for _, i, j in edges[:r]:
        into[j].append(i)
    rows, sizes = [x[t] for t in range(p)], [size[t] for t in range(p)]
    for i in a:
        if i not in merged:
            rows.append(x[i])
            sizes.append(size[i])
    for j in b:
        s = sum(size[t] for t in into[j])
        rows.append(sum(x[t] * size[t] for t in into[j]) / s)
        sizes.append(s)
    return torch.stack(rows), torch.stack(sizes)


def ref_prune(x, cls_attn, size, keep, p):
    rest = list(range(p, x.shape[0]))
    order = sorted(rest, key=lambda t: -float(cls_attn[t]))
    kept, fused = sorted(order[:keep]), order[keep:]
    w = torch.stack([cls_attn[t] for t in fused])
    f = sum(x[t] * cls_attn[t] for t in fused) / w.sum()
    rows = [x[t] for t in range(p)] + [x[t] for t in kept] + [f]
    sizes = [size[t] for t in range(p)] + [size[t] for t in kept] + [sum(size[t] for t in fused)]
    return torch.stack(rows), torch.stack(sizes)


@torch.no_grad()
def ref_vit(m, x, op, amounts, metric="keys"):
    x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
    size = torch.ones(x.shape[:2])
    p = m.num_prefix_tokens
    for blk, amount in zip(m.blocks, amounts):
        att, x_in = blk.attn, x
        h = blk.norm1(x)
        bsz, n, c = h.shape
        q, k, v = att.qkv(h).reshape(bsz, n, 3, att.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = att.q_norm(q), att.k_norm(k)
        logits = q @ k.transpose(-1, -2) * att.scale + size.log()[:, None, None, :]
        probs = logits.softmax(-1)
        o = (probs @ v).transpose(1, 2).reshape(bsz, n, c)
        x = x + blk.ls1(att.proj(o))
        if op == "merge" and amount:
            score = k.mean(1) if metric == "keys" else x_in
            out = [ref_merge(x[i], score[i], size[i], amount, p) for i in range(bsz)]
        elif op == "prune" and amount < 1:
            keep = math.ceil(amount * (n - p) - 1e-9)
            out = [ref_prune(x[i], probs[i, :, 0].mean(0), size[i], keep, p)
                   for i in range(bsz)]
        else:
            out = None
        if out is not None:
            x, size = torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = m.norm(x)
    if m.global_pool == "avg":
        s = size[:, p:, None]
        return m.head(m.fc_norm((x[:, p:] * s).sum(1) / s.sum(1)))
    return m.forward_head(x)


# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("reg_tokens", [0, 1])
@pytest.mark.parametrize("r", [7, [12, 6, 0], [1, 2, 3]])
def test_merge_equals_reference(r, reg_tokens):
    m, x = tiny_vit(reg_tokens), images()
    before = snapshot(m)
    small = fxprune.merge_tokens(m, (x,), r=r)
    amounts = r if isinstance(r, list) else [r] * 3
    want = ref_vit(m, x, "merge", amounts)
    torch.testing.assert_close(small(x), want, rtol=1e-4, atol=1e-5)
    counts = [lay.tokens_out for lay in small.meta["fxprune"]["tokens"].layers]
    n = 64 + 1 + reg_tokens
    assert counts == [n - sum(amounts[:i + 1]) for i in range(3)]
    assert_untouched(m, before)


@pytest.mark.parametrize("keep", [0.5, [1.0, 0.7, 0.7]])
def test_prune_equals_reference(keep):
    m, x = tiny_vit(), images()
    small = fxprune.prune_tokens(m, (x,), keep_rate=keep)
    amounts = keep if isinstance(keep, list) else [keep] * 3
    torch.testing.assert_close(small(x), ref_vit(m, x, "prune", amounts), rtol=1e-4, atol=1e-5)


def test_hand_written_attention_falls_back_to_block_input():
    """timm without fused attention: q @ k^T, softmax, @ v. Keys are not taken apart:
    ToMe matches on the attention block's input, log(size) goes into the softmax."""
    m, x = tiny_vit(), images()
    for blk in m.blocks:
        blk.attn.fused_attn = False
    gm = fxprune.trace(m, (x,))
    propagate_shapes(gm, (x,))
    assert [s.kind for s in find_token_layers(gm)] == ["softmax"] * 3
    want = ref_vit(m, x, "merge", [6] * 3, metric="input")
    torch.testing.assert_close(fxprune.merge_tokens(m, (x,), r=6)(x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fxprune.prune_tokens(m, (x,), keep_rate=0.6)(x),
                               ref_vit(m, x, "prune", [0.6] * 3), rtol=1e-4, atol=1e-5)
    fused = tiny_vit()  # the same weights with SDPA, metric="input": the same result
    torch.testing.assert_close(fxprune.merge_tokens(fused, (x,), r=6, metric="input")(x), want,
                               rtol=1e-4, atol=1e-5)


def test_hf_vit_through_export():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    x = images()
    gm = fxprune.trace(transformers.ViTForImageClassification(cfg).eval(), (x,),
                       frontend="export")
    want = gm(x).logits
    assert torch.equal(fxprune.merge_tokens(gm, (x,), r=0)(x).logits, want)
    small = fxprune.merge_tokens(gm, (x,), r=3)
    assert small(x).logits.shape == want.shape
    assert [lay.tokens_out for lay in small.meta["fxprune"]["tokens"].layers] == [14, 11]
    assert fxprune.token_macs(gm, (x,), small).macs_after == _flop_counter_macs(small, (x,))


def test_mean_pooling_is_size_weighted():
    m, x = tiny_vit(global_pool="avg"), images()
    small = fxprune.merge_tokens(m, (x,), r=10)
    assert "weighted_token_mean" in small.code
    torch.testing.assert_close(small(x), ref_vit(m, x, "merge", [10] * 3), rtol=1e-4, atol=1e-5)


def test_identity_schedules_are_exact():
    m, x = tiny_vit(), images()
    want = m(x)
    for small in (fxprune.merge_tokens(m, (x,), r=0),
                  fxprune.prune_tokens(m, (x,), keep_rate=1.0)):
        assert torch.equal(small(x), want)
        assert all(lay.op == "none" for lay in small.meta["fxprune"]["tokens"].layers)


# ----------------------------------------------------------------------------------
def test_padding_never_merges_into_real_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 21, 8, generator=g)
    size = torch.ones(3, 21, 1)
    size[0, 15:] = 0
    size[1, 5:] = 0
    size[2, 1:] = 0  # only the class token is real
    x = torch.where(size > 0, x, torch.full_like(x, 1e6))
    for r in (1, 4, 10):
        out, s = bipartite_merge(x, torch.randn(3, 21, 4, generator=g), size, r, 1)
        assert out.shape == (3, 21 - r, 8)
        torch.testing.assert_close(s.sum(1), size.sum(1))  # every real token is held once
        real = s[..., 0] > 0
        assert bool((out[real].abs() < 1e5).all()), "a padded token leaked into a real one"


class MeanPooled(nn.Module):
    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def tiny_bert_encoder():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    model = MeanPooled(transformers.BertModel(cfg, add_pooling_layer=False)).eval()
    ids = torch.randint(1, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, 12:] = 0
    mask[1, 10:] = 0
    gm = fxprune.trace(model, (ids, mask), frontend="export")
    return gm, ids, mask


def test_bert_padding_merges_among_itself_first():
    """With r below the padded tokens of each parity, only padding merges: the masked
    mean-pooled embedding is the unmodified one, so padding never reached a real token
    and the pooling counts each token for the tokens it holds."""
    gm, ids, mask = tiny_bert_encoder()
    want = gm(ids, mask)
    small = fxprune.merge_tokens(gm, (ids, mask), r=[2, 1])
    assert [lay.tokens_out for lay in small.meta["fxprune"]["tokens"].layers] == [18, 17]
    assert "size_as_mask" in small.code
    torch.testing.assert_close(small(ids, mask), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(fxprune.merge_tokens(gm, (ids, mask), r=0)(ids, mask), want)
    assert torch.equal(fxprune.prune_tokens(gm, (ids, mask), keep_rate=1)(ids, mask), want)
    merged = fxprune.merge_tokens(gm, (ids, mask), r=6)(ids, mask)  # real tokens merge too
    assert merged.shape == want.shape and not torch.allclose(merged, want)
    assert F.cosine_similarity(merged, want).min() > 0.5


def test_torchvision_mha_keys_from_in_proj():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                    hidden_dim=32, mlp_dim=64, num_classes=5).eval()
    nn.init.normal_(m.heads.head.weight)
    x = images()
    gm = fxprune.trace(m, (x,))
    propagate_shapes(gm, (x,))
    assert [s.kind for s in find_token_layers(gm)] == ["mha"] * 3
    assert torch.equal(fxprune.merge_tokens(m, (x,), r=0)(x), m(x))
    small = fxprune.merge_tokens(m, (x,), r=3)
    assert small(x).shape == (2, 5)
    assert "mha_key_metric" in small.code and "mha_attention_bias" in small.code
    assert [lay.tokens_out for lay in small.meta["fxprune"]["tokens"].layers] == [14, 11, 8]
    assert fxprune.prune_tokens(m, (x,), keep_rate=0.6)(x).shape == (2, 5)


# ----------------------------------------------------------------------------------
def _flop_counter_macs(gm, inputs) -> float:
    """FlopCounterMode's count with attention on its counted path: the math SDPA backend
    (CPU kernels count 0) and grad enabled (nn.MultiheadAttention's fast path counts 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), \
            torch.enable_grad():
        gm(*inputs)
    return counter.get_total_flops() / 2


def test_cost_agrees_with_flop_counter():
    m, x = tiny_vit(), images()
    for small in (fxprune.merge_tokens(m, (x,), r=[10, 5, 3]),
                  fxprune.prune_tokens(m, (x,), keep_rate=[1, 0.6, 0.6])):
        cost = fxprune.token_macs(m, (x,), small)
        assert cost.macs_before == _flop_counter_macs(m, (x,))
        assert cost.macs_after == _flop_counter_macs(small, (x,))
        assert cost.reduction_macs > 0 and cost.ratio < 0.9
    gm, ids, mask = tiny_bert_encoder()
    small = fxprune.merge_tokens(gm, (ids, mask), r=4)
    assert fxprune.token_macs(gm, (ids, mask), small).macs_after == _flop_counter_macs(
        small, (ids, mask))


def test_composes_with_structured_pruning():
    m, x = tiny_vit(), images()
    analysis = fxprune.analyze(m, (x,))
    plan = fxprune.Plan.from_ratio(analysis, 0.25, criterion="l1")
    pruned = fxprune.compile(m, plan)
    both = fxprune.merge_tokens(pruned, (x,), r=8)
    assert sum(p.numel() for p in both.parameters()) < sum(p.numel() for p in m.parameters())
    assert both(x).shape == (2, 5)
    assert torch.equal(fxprune.merge_tokens(pruned, (x,), r=0)(x), pruned(x))
    cost = fxprune.token_macs(pruned, (x,), both)
    assert cost.macs_after == _flop_counter_macs(both, (x,))
    assert cost.macs_after < fxprune.token_macs(m, (x,), fxprune.merge_tokens(m, (x,), r=8)
                                                ).macs_after


# ----------------------------------------------------------------------------------
def test_r_above_available_tokens_names_layer_and_remedy():
    m, x = tiny_vit(), images()
    with pytest.raises(TokenScheduleError, match=r"layer 'blocks.0.*r=33.*Remedy: r <= 32"):
        fxprune.merge_tokens(m, (x,), r=33)
    with pytest.raises(TokenScheduleError, match=r"layer 'blocks.2.*r=13 but only 12.*Remedy"):
        fxprune.merge_tokens(m, (x,), r=[30, 10, 13])
    with pytest.raises(TokenScheduleError, match="3 layers"):
        fxprune.merge_tokens(m, (x,), r=[1, 2])


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan")])
def test_keep_rate_outside_unit_interval(bad):
    m, x = tiny_vit(), images()
    with pytest.raises(TokenScheduleError, match=r"layer 'blocks.0.*\(0, 1\].*Remedy"):
        fxprune.prune_tokens(m, (x,), keep_rate=bad)


class MixerLike(nn.Module):
    """Token-mixing MLPs: no attention, the token count is fixed by weights."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.ch = nn.Linear(8, 8), nn.Linear(16, 16)

    def forward(self, x):
        x = x + self.tok(x.transpose(1, 2)).transpose(1, 2)
        return x + self.ch(x)


def test_attention_not_found():
    with pytest.raises(AttentionNotFoundError, match="Remedy"):
        fxprune.merge_tokens(MixerLike(), (torch.randn(2, 8, 16),), r=1)


class Layer(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.causal = nn.Linear(dim, dim), causal

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, c))
        return x + self.fc(x)


def test_dynamic_token_count_needs_static():
    x = torch.randn(2, 9, 16)
    n = torch.export.Dim("n", min=4, max=64)
    ep = torch.export.export(Layer(), (x,), dynamic_shapes=({1: n},), strict=False)
    with pytest.raises(StaticShapeError, match="dynamic token count.*Remedy"):
        fxprune.merge_tokens(ep.module(), (x,), r=2)
    static = fxprune.merge_tokens(Layer(), (x,), r=2)  # the same layer traced: fine
    assert static(x).shape == (2, 7, 16)


def test_causal_attention_is_refused():
    model = nn.Sequential(Layer(causal=True), Layer(causal=True))
    with pytest.raises(TokenReductionError, match="layer '0': causal.*Remedy"):
        fxprune.merge_tokens(model, (torch.randn(2, 9, 16),), r=2)


def test_token_schedule_drives_merge():
    assert fxprune.token_schedule(12, 0, 4) == [12, 8, 4, 0]
    assert fxprune.token_schedule(5, 5, 1) == [5]
    with pytest.raises(TokenScheduleError):
        fxprune.token_schedule(4, 0, 0)
    m, x = tiny_vit(), images()
    small = fxprune.merge_tokens(m, (x,), r=fxprune.token_schedule(12, 4, 3))
    assert [lay.tokens_out for lay in small.meta["fxprune"]["tokens"].layers] == [53, 45, 41]
    torch.testing.assert_close(small(x), ref_vit(m, x, "merge", [12, 8, 4]), rtol=1e-4,
                               atol=1e-5)
