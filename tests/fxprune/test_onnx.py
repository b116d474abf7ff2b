"""fxprune.export_onnx: onnxruntime outputs equal the pruned model's (zoo subset)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import fxprune

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _prune(model: torch.nn.Module, inputs: tuple, **kw) -> torch.nn.Module:
    analysis = fxprune.analyze(model, inputs, **kw)
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="random")
    return fxprune.compile(model, plan).eval()


def _first(out):
    while not isinstance(out, torch.Tensor):
        out = list(out.values())[0] if isinstance(out, dict) else out[0]
    return out


def _check(small: torch.nn.Module, inputs: tuple, path, exporter: str = "auto",
           other: tuple | None = None) -> None:
    fxprune.export_onnx(small, inputs, path, exporter=exporter)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (inputs,) + ((other,) if other else ()):
        feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), x)}
        got = session.run(None, feed)[0]
        with torch.no_grad():
            want = _first(small(*x)).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def _tv(name: str, **kw) -> torch.nn.Module:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return tv.models.get_model(name, weights=None, **kw).eval()


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_resnet18_both_exporters_dynamic_batch(tmp_path, exporter):
    x = torch.randn(1, 3, 32, 32)
    small = _prune(_tv("resnet18", num_classes=10), (x,))
    _check(small, (x,), tmp_path / "r18.onnx", exporter, other=(torch.randn(3, 3, 32, 32),))


def test_timm_vit_legacy_needs_baked_constants(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    small = _prune(model, (x,))
    holders = [n for n in small.graph.nodes if n.op == "placeholder"]
    # forward(x, attn_mask=None, is_causal=False): the defaults are traced as constants
    # (fx keeps a placeholder for each); as traced inputs they broke the legacy exporter
    assert [n.name.removesuffix("_1") for n in holders] == ["x", "attn_mask", "is_causal"]
    holders = [n.name for n in holders]
    _check(small, (x,), tmp_path / "vit.onnx", "legacy")
    assert [n.name for n in small.graph.nodes if n.op == "placeholder"] == holders


def test_mobilenet_v3(tmp_path):
    x = torch.randn(1, 3, 64, 64)
    _check(_prune(_tv("mobilenet_v3_small", num_classes=10), (x,)), (x,),
           tmp_path / "mnv3.onnx", "legacy")


@pytest.mark.slow
@pytest.mark.parametrize("name,kw,shape", [
    ("vit_b_16", dict(image_size=32, num_classes=10), (1, 3, 32, 32)),
    ("swin_t", dict(num_classes=10), (1, 3, 64, 64)),
])
def test_torchvision_transformers(tmp_path, name, kw, shape):
    x = torch.randn(shape)
    _check(_prune(_tv(name, **kw), (x,)), (x,), tmp_path / f"{name}.onnx")


@pytest.mark.slow
def test_timm_convnext(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    _check(_prune(model, (x,)), (x,), tmp_path / "convnext.onnx")


def _hf(kind: str):
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=32)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(**small, type_vocab_size=2))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **small, num_key_value_heads=2, use_cache=False))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_hf_export_route(tmp_path, kind):
    model = _hf(kind).eval()
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    small = _prune(model, (ids,), frontend="export")
    _check(small, (ids,), tmp_path / f"{kind}.onnx")


class Unexportable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.special.bessel_j0(self.conv(x)))  # no ONNX symbolic


def test_failed_export_names_the_node_and_writes_nothing(tmp_path):
    x = torch.randn(1, 3, 4, 4)
    model = Unexportable().eval()
    small = _prune(model, (x,))
    with pytest.raises(fxprune.OnnxExportError, match="bessel_j0"):
        fxprune.export_onnx(small, (x,), tmp_path / "bad.onnx", exporter="legacy")
    assert os.listdir(tmp_path) == []


def test_one_tensor_is_one_input_as_analyze_reads_it(tmp_path):
    """export_onnx / save(example_inputs=x) with a bare tensor: tuple(x) passed its batch
    rows as inputs, so an MLP exported for (4,) inputs instead of (2, 4)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(2, 4)
    small = _prune(model.eval(), x)
    fxprune.export_onnx(small, x, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert len(session.get_inputs()) == 1 and session.get_inputs()[0].shape == ["batch", 4]
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, small(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    fxprune.save(small, tmp_path / "m.pt2", example_inputs=x)
    assert torch.export.load(tmp_path / "m.pt2").module()(x).shape == (2, 3)
