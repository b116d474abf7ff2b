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


def _check(model, inputs, scale, frontend=None, dtype=torch.float64):
    """Module == GraphModule (float64, or float32 for an export graph specialised to it;
    example batch and a doubled one); .train() runs forward and backward; returns the
    module."""
    kw = {"frontend": frontend} if frontend else {}
    analysis = fxprune.analyze(model, inputs, **kw)
    plan = fxprune.Plan.from_ratio(analysis, 0.3, criterion="random", seed=0)
    gm = fxprune.compile(model, plan, attention_scale=scale)
    small = fxprune.compile(model, plan, attention_scale=scale, output="module")
    assert type(small) is type(model)
    a, b = copy.deepcopy(small).to(dtype), copy.deepcopy(gm).to(dtype)
    x = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        want = _logits(b(*x))
        torch.testing.assert_close(_logits(a(*x)), want, **tol)
        two = _logits(a(*(torch.cat([t, t]) for t in x)))
        torch.testing.assert_close(two[len(two) // 2:], want, **tol)
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


@pytest.mark.parametrize("scale", ["original", "recompute"])
def test_timm_levit_split_sections_follow(scale):
    """LeViT's ``split([self.key_dim, self.key_dim, self.val_dim])`` and ``reshape(B, N,
    self.val_attn_dim)``: the int attributes follow the ints the rewrite gave those ops;
    its downsampling attention has num_heads == key_dim == 16 and keeps its heads."""
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, num_classes=10,
                              img_size=64).eval()
    small = _check(model, (torch.randn(2, 3, 64, 64),), scale)
    down = model.stages[2].downsample.attn_downsample
    new = small.stages[2].downsample.attn_downsample
    assert down.num_heads == down.key_dim == 16 and new.num_heads == 16
    assert new.key_dim < 16 and new.val_attn_dim == new.num_heads * new.val_dim < 1024
    assert new.kv.linear.weight.shape[0] == new.num_heads * (new.key_dim + new.val_dim)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                  n_positions=32, n_inner=48, use_cache=False)
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    return transformers.GPT2LMHeadModel(cfg).eval(), (ids,)


def test_hf_gpt2_uneven_query_value_refused_naming_the_split():
    """c_attn's q.k and v features are separate spaces: a plan keeping 6 q.k but 5 v
    features per head runs as a GraphModule; GPT2Attention's one head_dim cannot."""
    model, inputs = _gpt2()
    analysis = fxprune.analyze(model, inputs, frontend="export")
    name = "transformer.h.0.attn.c_attn.weight[1]"
    assert analysis.group(name).size == 16  # 8 q.k (all heads) + 8 v features
    plan = fxprune.Plan.from_indices(analysis, {name: [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12]})
    fxprune.compile(model, plan)  # the GraphModule takes it
    with pytest.raises(fxprune.core.errors.ModuleOutputError,
                       match=r"keep 24 query/key but 20 value.*modeling_gpt2.py.*split"):
        fxprune.compile(model, plan, output="module")


@pytest.mark.parametrize("scale", ["original", "recompute"])
def test_hf_gpt2_even_plan_reads_head_dim_not_whole_heads(scale):
    """24 kept rows per third of c_attn are 4 heads x 6, not 3 heads x 8."""
    model, inputs = _gpt2()
    analysis = fxprune.analyze(model, inputs, frontend="export")
    plan = fxprune.Plan.from_indices(
        analysis, {"transformer.h.0.attn.c_attn.weight[1]": [0, 2, 3, 5, 6, 7,
                                                              8, 9, 11, 12, 14, 15]})
    gm = fxprune.compile(model, plan, attention_scale=scale)
    small = fxprune.compile(model, plan, attention_scale=scale, output="module")
    attn = small.transformer.h[0].attn
    assert (attn.num_heads, attn.head_dim, attn.split_size) == (4, 6, 24)
    assert attn.scaling == pytest.approx(8 ** -0.5 if scale == "original" else 6 ** -0.5)
    with torch.no_grad():  # the export graph is specialised to float32
        torch.testing.assert_close(small(*inputs).logits, gm(*inputs).logits,
                                   rtol=1e-4, atol=1e-5)


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          decoder_input_ids=decoder_input_ids).logits


@pytest.mark.parametrize("scale", ["original", "recompute"])
def test_hf_t5_key_value_proj_dim_follows(scale):
    """T5Attention views q/k/v as (-1, self.key_value_proj_dim): with 6 of 8 features kept
    per head, a stale 8 read the 24 rows as 3 heads against a 4-head position bias."""
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                num_heads=4, use_cache=False)
    torch.manual_seed(0)
    model = _Logits(transformers.T5ForConditionalGeneration(cfg)).eval()
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    small = _check(model, (ids, torch.ones(2, 8, dtype=torch.long), ids[:, :6]), scale,
                   frontend="export", dtype=torch.float32)
    for m in small.modules():
        if type(m).__name__ == "T5Attention":
            assert m.q.weight.shape[0] == m.n_heads * m.key_value_proj_dim == m.inner_dim


def test_timm_vit_head_count_equal_to_head_dim_keeps_its_value():
    """8 heads of 8: the qkv reshape's 8 -> 6 is head_dim's (already followed), not the
    head count's, which shares its original value."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                              img_size=32, depth=1, embed_dim=64, num_heads=8).eval()
    small = _check(model, (torch.randn(2, 3, 32, 32),), "original")
    attn = small.blocks[0].attn
    assert attn.qkv.weight.shape[0] == 3 * attn.num_heads * attn.head_dim < 3 * 64


def test_hf_t5_save_pretrained_round_trip(tmp_path):
    """T5's q/k/v projections are read for the config: d_kv (its head_dim, through
    attribute_map) follows, so from_pretrained rebuilds the pruned shapes."""
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                num_heads=4, use_cache=False)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    x = (ids, torch.ones(2, 8, dtype=torch.long), ids[:, :6])
    analysis = fxprune.analyze(model, x, frontend="export")
    plan = fxprune.Plan.from_ratio(analysis, 0.3, criterion="random", seed=0)
    small = fxprune.compile(model, plan, output="module")
    attn = small.encoder.block[0].layer[0].SelfAttention
    assert small.config.d_kv == attn.key_value_proj_dim < 8
    small.save_pretrained(tmp_path)
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(*x).logits, small(*x).logits)
