"""compile(output="module") on attention modules: head count, head_dim and softmax scale
follow the query projection's kept rows (passes/slice_module.py ``head_reading``; HF
layers in fxprune/module_output.py), proven equal to the GraphModule in float64."""
from __future__ import annotations

import copy

import pytest
import torch

import fxprune

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def _logits(out):
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, (tuple, list)) else out


def _check(model, inputs, scale, frontend=None):
    """Module == GraphModule (float64, example batch and a doubled one); .train() runs
    forward and backward; returns the module."""
    kw = {"frontend": frontend} if frontend else {}
    analysis = fxprune.analyze(model, inputs, **kw)
    plan = fxprune.Plan.from_ratio(analysis, 0.3, criterion="random", seed=0)
    gm = fxprune.compile(model, plan, attention_scale=scale)
    small = fxprune.compile(model, plan, attention_scale=scale, output="module")
    assert type(small) is type(model)
    a, b = copy.deepcopy(small).double(), copy.deepcopy(gm).double()
    x = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        want = _logits(b(*x))
        torch.testing.assert_close(_logits(a(*x)), want, rtol=1e-6, atol=1e-7)
        two = _logits(a(*(torch.cat([t, t]) for t in x)))
        torch.testing.assert_close(two[len(two) // 2:], want, rtol=1e-6, atol=1e-7)
    small.train()
    _logits(small(*inputs)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in small.parameters() if p.grad is not None)
    return small


@pytest.mark.parametrize("scale", ["original", "recompute"])
def test_timm_vit_heads_follow(scale):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                              img_size=32, depth=1).eval()
    small = _check(model, (torch.randn(2, 3, 32, 32),), scale)
    attn = small.blocks[0].attn
    assert attn.qkv.weight.shape[0] == 3 * attn.num_heads * attn.head_dim
    assert attn.attn_dim == attn.num_heads * attn.head_dim < 192
    want = 64 ** -0.5 if scale == "original" else attn.head_dim ** -0.5
    assert attn.scale == pytest.approx(want)


def test_timm_pit_heads_follow():
    torch.manual_seed(0)
    model = timm.create_model("pit_ti_224", pretrained=False, num_classes=10,
                              img_size=64).eval()
    _check(model, (torch.randn(2, 3, 64, 64),), "original")


def test_timm_swin_window_attention_heads_follow():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False,
                              num_classes=10, img_size=64, window_size=2,
                              depths=(1, 1, 1, 1)).eval()
    _check(model, (torch.randn(2, 3, 64, 64),), "recompute")


def _bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    return transformers.BertForMaskedLM(cfg).eval(), (ids, torch.ones(2, 8, dtype=torch.long))


@pytest.mark.parametrize("scale", ["original", "recompute"])
def test_hf_bert_head_dim_is_not_read_as_whole_heads(scale):
    model, inputs = _bert()
    small = _check(model, inputs, scale, frontend="export")
    att = small.bert.encoder.layer[0].attention.self
    assert att.num_attention_heads == 4  # head_dim units: every head keeps 6 of 8
    assert att.query.weight.shape[0] == 4 * att.attention_head_size == att.all_head_size
    want = 8 ** -0.5 if scale == "original" else att.attention_head_size ** -0.5
    assert att.scaling == pytest.approx(want)


def test_hf_vit_head_dim_follows():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=48, num_labels=10)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    _check(model, (torch.randn(2, 3, 32, 32),), "original", frontend="export")
