"""compile(..., output="module"): the user's own class, sliced as the GraphModule, proven
equal to it in float64 (passes/slice_module.py, fxprune/module_output.py)."""
from __future__ import annotations

import copy

import pytest
import torch

import fxprune
from fxprune.core.errors import LiteralSizeError, ModuleOutputError


def _prune(model, inputs, ratio=0.3, seed=0, **kw):
    analysis = fxprune.analyze(model, inputs, **kw)
    plan = fxprune.Plan.from_ratio(analysis, ratio)
    return analysis, plan


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resnet18_keeps_class_indexing_train_mode_and_batch_sizes():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    before = _state(model)
    analysis, plan = _prune(model, x)
    gm = fxprune.compile(model, plan)
    small = fxprune.compile(model, plan, output="module")
    assert type(small) is type(model) and small is not model
    assert _same_state(before, _state(model))  # the user's model is untouched
    block = small.layer1[0]
    assert block.conv1.out_channels == block.bn1.num_features == block.conv1.weight.shape[0]
    assert block.conv1.out_channels < 64
    assert block.conv2.in_channels == block.conv1.out_channels
    for b in (1, 5):
        y = torch.randn(b, 3, 48, 48)  # another batch size and resolution
        torch.testing.assert_close(small(y), gm(y))
    small.train()
    out = small(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert small.layer1[0].bn1.running_mean.shape == (block.bn1.num_features,)
    assert small.fc.in_features == small.fc.weight.shape[1]


def test_mobilenet_v3_small_module():
    tv = pytest.importorskip("torchvision")
    model = tv.models.mobilenet_v3_small(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    analysis, plan = _prune(model, x)
    small = fxprune.compile(model, plan, output="module")
    assert isinstance(small, tv.models.MobileNetV3)
    gm = fxprune.compile(model, plan)
    y = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(small(y), gm(y))


def test_vit_b_16_small_image():
    tv = pytest.importorskip("torchvision")
    model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                        num_heads=4, hidden_dim=32, mlp_dim=48,
                                        num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    analysis, plan = _prune(model, x, split_policy="heads")
    small = fxprune.compile(model, plan, output="module")
    assert isinstance(small, tv.models.VisionTransformer)
    attn = small.encoder.layers[0].self_attention
    assert attn.embed_dim == attn.in_proj_weight.shape[1]
    torch.testing.assert_close(small(torch.randn(3, 3, 32, 32)).shape, torch.Size([3, 10]))


def test_timm_forward_features_and_methods():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    analysis, plan = _prune(model, x)
    small = fxprune.compile(model, plan, output="module")
    assert type(small) is type(model)
    feats = small.forward_features(x)
    assert feats.shape[1] == small.num_features or feats.shape[1] == small.fc.in_features
    small.reset_classifier(3)
    assert small(x).shape == (2, 3)


class LiteralView(torch.nn.Module):
    """The forward holds the channel count 16 as a literal: no attribute controls it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.head = torch.nn.Linear(16 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = torch.nn.functional.adaptive_avg_pool2d(y, 2)
        return self.head(y.reshape(y.shape[0], 16 * 4))


def test_literal_size_refused_with_source_line():
    model = LiteralView().eval()
    before = _state(model)
    x = torch.randn(2, 3, 8, 8)
    analysis, plan = _prune(model, x, ratio=0.25)
    gm = fxprune.compile(model, plan)  # the graph output handles it
    assert gm(x).shape == (2, 5)
    with pytest.raises(LiteralSizeError, match=r"test_module_output.py.*output=\"graph\""):
        fxprune.compile(model, plan, output="module")
    assert _same_state(before, _state(model))


class Windowed(torch.nn.Module):
    """A custom module whose forward reads a width attribute with a field-standard name."""

    def __init__(self):
        super().__init__()
        self.hidden_dim = 16
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h.reshape(-1, self.hidden_dim))


def test_width_attribute_follows_and_is_proven():
    model = Windowed().eval()
    x = torch.randn(2, 8)
    analysis, plan = _prune(model, x, ratio=0.5)
    gm = fxprune.compile(model, plan)
    small = fxprune.compile(model, plan, output="module")
    assert small.hidden_dim == small.fc1.out_features < 16
    y = torch.randn(7, 8)
    torch.testing.assert_close(small(y), gm(y))


def test_stale_width_is_a_typed_error(monkeypatch):
    import passes.slice_module as sm

    monkeypatch.setattr(sm, "WIDTH_ATTRIBUTES", frozenset())  # hidden_dim stays 16
    model = Windowed().eval()
    analysis, plan = _prune(model, torch.randn(2, 8), ratio=0.5)
    with pytest.raises(ModuleOutputError, match="output=\"graph\""):
        fxprune.compile(model, plan, output="module")


def test_bad_output_name():
    model = LiteralView()
    analysis, plan = _prune(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="output"):
        fxprune.compile(model, plan, output="modul")


def test_keep_all_module_equals_model():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    analysis = fxprune.analyze(model, x)
    plan = fxprune.Plan.from_ratio(analysis, 0.0)
    small = fxprune.compile(model, plan, output="module")
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)


def _module_equals_graph(model, x, y, ratio=0.3):
    analysis = fxprune.analyze(model, x)
    plan = fxprune.Plan.from_ratio(analysis, ratio, criterion="random", seed=0)
    gm = fxprune.compile(model, plan)
    small = fxprune.compile(model, plan, output="module")
    assert type(small) is type(model)
    torch.testing.assert_close(small(y), gm(y))
    return small


def test_torchvision_layer_norm_2d_follows_its_weight():
    """torchvision's LayerNorm2d(nn.LayerNorm) overrides forward and reads
    self.normalized_shape: the nn.LayerNorm fixup re-derives it (it crashed before)."""
    tv = pytest.importorskip("torchvision")
    from torchvision.models.convnext import CNBlockConfig

    model = tv.models.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)],
                               num_classes=10).eval()
    small = _module_equals_graph(model, torch.randn(2, 3, 64, 64), torch.randn(3, 3, 48, 48))
    norm = small.features[0][1]
    assert norm.normalized_shape == tuple(norm.weight.shape) and norm.weight.shape[0] < 16


def test_timm_layer_norm_2d_follows_its_weight():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
    small = _module_equals_graph(model, torch.randn(2, 3, 32, 32), torch.randn(3, 3, 48, 48))
    norm = small.stem[1]
    assert norm.normalized_shape == tuple(norm.weight.shape) and norm.weight.shape[0] < 40


class ScaledBatchNorm(torch.nn.BatchNorm2d):
    """A user's BatchNorm subclass with its own forward reading ``num_features``."""

    def forward(self, x):
        y = torch.nn.functional.batch_norm(x, self.running_mean, self.running_var,
                                           self.weight, self.bias, False, 0.0, self.eps)
        pooled = y.reshape(y.shape[0], self.num_features, -1).mean(-1)  # per channel
        return y + pooled.reshape(y.shape[0], self.num_features, 1, 1)


class BnNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = ScaledBatchNorm(8)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def test_user_norm_subclass_attributes_follow():
    torch.manual_seed(0)
    small = _module_equals_graph(BnNet().eval(), torch.randn(2, 3, 8, 8),
                                 torch.randn(3, 3, 12, 12), ratio=0.5)
    assert small.bn.num_features == small.bn.weight.shape[0] < 8


@pytest.mark.slow
def test_uneven_head_dim_is_refused_naming_the_attention_module():
    """GPT-2 keeping fewer value than query/key features (c_attn's q.k and v features are
    separate units): GPT2Attention splits q, k, v in equal pieces with one head_dim, so
    the module output refuses, naming the layer (was a LiteralSizeError blaming
    layer_norm's shape, from a ValueError in c_attn's split)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                  n_positions=16, n_inner=48, use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    analysis = fxprune.analyze(model, (ids,), frontend="export")
    attn = next(g for g in analysis.groups if "c_attn" in g.name)
    # one unit fewer: the last value feature (units 0-7: q.k features, 8-15: v features)
    plan = fxprune.Plan.from_indices(analysis, {attn.name: range(attn.size - 1)})
    with pytest.raises(ModuleOutputError, match=r"transformer\.h\.0\.attn.*32 query/key but "
                                                r"28 value.*split_policy"):
        fxprune.compile(model, plan, output="module")


def test_hf_vit_patch_embedding_width():
    """HF ViT's input embedding (ViTPatchEmbeddings) holds no weight of its own: the
    config's hidden size is read from its projection (an AttributeError crash before)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, image_size=16, patch_size=8,
                                 num_labels=5)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    analysis = fxprune.analyze(model, (x,), frontend="export", split_policy="heads")
    plan = fxprune.Plan.from_ratio(analysis, 0.3, criterion="random", seed=0)
    gm = fxprune.compile(model, plan)
    small = fxprune.compile(model, plan, output="module")
    assert isinstance(small, transformers.ViTForImageClassification)
    torch.testing.assert_close(small(x).logits, gm(x)[0] if isinstance(gm(x), (tuple, list))
                               else gm(x).logits)
