"""Shape propagation (passes/shape_prop.py): fake tensors, torch's own tensor_meta key,
meta models, flags restored, typed errors naming the node."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from passes.shape_prop import output_shape, propagate_shapes, tensor_shapes


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        p, q = torch.split(y, [2, 4], dim=1)
        return self.fc(torch.cat([q, p], 1).mean((2, 3))), p


X = torch.randn(2, 3, 8, 8)


def test_tensor_meta_on_every_tensor_node():
    gm = fxprune.trace(Net())
    propagate_shapes(gm, (X,))
    shapes = {n.name: tensor_shapes(n) for n in gm.graph.nodes}
    # conv: stride 2, padding 1, kernel 3 on 8x8 -> 4x4
    assert shapes["conv"] == shapes["bn"] == (2, 6, 4, 4)
    assert shapes["split"] == ((2, 2, 4, 4), (2, 4, 4, 4))
    assert shapes["getitem"] == (2, 2, 4, 4) and shapes["getitem_1"] == (2, 4, 4, 4)
    assert shapes["cat"] == (2, 6, 4, 4) and shapes["mean"] == (2, 6)
    assert shapes["fc"] == (2, 2)
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op != "output")
    assert output_shape(gm) == ((2, 2), (2, 2, 4, 4))


def test_runs_on_fake_tensors_without_touching_the_model(helpers):
    model = Net().train()
    gm = fxprune.trace(model)
    before = helpers.snapshot(gm)
    propagate_shapes(gm, (X,))
    helpers.assert_untouched(gm, before)       # BN running stats not updated
    assert gm.training and gm.bn.training       # flags restored exactly
    assert int(gm.bn.num_batches_tracked) == 0


def test_meta_model_and_meta_inputs():
    gm = fxprune.trace(Net().to("meta"))
    propagate_shapes(gm, (X,))
    assert tensor_shapes(next(n for n in gm.graph.nodes if n.name == "fc")) == (2, 2)
    propagate_shapes(gm, (torch.empty(5, 3, 16, 16, device="meta"),))
    assert tensor_shapes(next(n for n in gm.graph.nodes if n.name == "conv")) == (5, 6, 8, 8)


def test_shapes_follow_new_inputs():
    gm = fxprune.trace(Net())
    propagate_shapes(gm, (X,))
    propagate_shapes(gm, (torch.randn(1, 3, 6, 6),))
    assert tensor_shapes(next(n for n in gm.graph.nodes if n.name == "conv")) == (1, 6, 3, 3)


def test_mismatching_input_raises_shape_propagation_error_naming_the_node():
    gm = fxprune.trace(Net())
    with pytest.raises(fxprune.ShapePropagationError) as info:
        propagate_shapes(gm, (torch.randn(2, 4, 8, 8),))
    text = str(info.value)
    assert "node 'conv'" in text and "example inputs" in text


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 4, bias=False)

    def forward(self, x):  # (B, C, H, W) -> tokens (B, H, W, C): a 4-D, permuted input
        return self.fc2(torch.relu(self.fc1(x.permute(0, 2, 3, 1))))


def test_linear_shortcut_records_what_fake_linear_records(monkeypatch):
    """nn.Linear's output is made without running F.linear on fakes: the same tensor_meta
    (shape, strides, dtype) as the fake kernel, on 4-D and permuted inputs."""
    import passes.shape_prop as shape_prop

    gm = fxprune.trace(_Tokens())
    x = torch.randn(2, 8, 3, 5)
    propagate_shapes(gm, (x,))
    fast = {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}
    monkeypatch.setattr(shape_prop, "_plain_linear", lambda m: False)
    propagate_shapes(gm, (x,))
    assert fast == {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}
    assert fast["fc2"].shape == (2, 3, 5, 4)


@pytest.mark.parametrize("bad", ["in_features", "bias"])
def test_linear_shortcut_fails_closed_like_the_kernel(bad):
    """A Linear whose weight no longer fits its input (a slice gone wrong) stops shape
    propagation at that node, as F.linear would."""
    model = _Tokens()
    with torch.no_grad():
        if bad == "in_features":
            model.fc2.weight = nn.Parameter(torch.randn(4, 5))
        else:
            model.fc1.bias = nn.Parameter(torch.randn(5))
    gm = fxprune.trace(model)
    with pytest.raises(fxprune.ShapePropagationError, match="fc[12]"):
        propagate_shapes(gm, (torch.randn(2, 8, 3, 5),))


def test_linear_of_another_dtype_is_left_to_the_kernel(monkeypatch):
    """A weight of another dtype than its input skips the shortcut: the fake kernel decides,
    as before the shortcut (fxprune.sparsify names an int weight itself)."""
    import passes.shape_prop as shape_prop

    model = _Tokens()
    model.fc2.weight = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
    gm = fxprune.trace(model)
    real, asked = shape_prop._linear_like, []
    monkeypatch.setattr(shape_prop, "_linear_like",
                        lambda m, x: asked.append(m) or real(m, x))
    try:
        propagate_shapes(gm, (torch.randn(2, 8, 3, 5),))
    except fxprune.ShapePropagationError:
        pass  # whatever the kernel says; the shortcut was not asked
    assert gm.get_submodule("fc1") in asked and gm.get_submodule("fc2") not in asked


_CONV_CASES = [  # (dims, in, out, kernel, stride, padding, dilation, groups, spatial)
    (2, 6, 8, 3, 1, 1, 1, 1, (9, 7)), (2, 6, 6, 3, 2, 1, 1, 6, (9, 7)),
    (2, 4, 8, (1, 5), (2, 1), (0, 2), (1, 2), 2, (6, 11)), (2, 6, 8, 4, 1, "same", 2, 1, (5, 8)),
    (2, 6, 8, 3, 3, "valid", 1, 1, (10, 3)), (1, 4, 4, 5, 2, 3, 1, 4, (13,)),
    (3, 2, 4, 3, (1, 2, 2), 1, 1, 2, (4, 5, 6)), (2, 6, 8, 7, 4, 0, 1, 1, (7, 8)),
]


@pytest.mark.parametrize("case", range(len(_CONV_CASES)))
def test_conv_shortcut_records_what_the_fake_kernel_records(monkeypatch, case):
    """nn.ConvNd's output is made without running the conv on fakes: the same tensor_meta
    (shape, strides, dtype) as the fake kernel, for strides, paddings (ints, tuples,
    'same', 'valid'), dilations, groups and 1-3 spatial dims."""
    import passes.shape_prop as shape_prop

    d, cin, cout, k, s, p, dil, g, spatial = _CONV_CASES[case]
    conv = getattr(nn, f"Conv{d}d")(cin, cout, k, stride=s, padding=p, dilation=dil, groups=g)
    gm = fxprune.trace(nn.Sequential(conv, nn.ReLU()))
    x = torch.randn(2, cin, *spatial)
    asked = []
    real = shape_prop._conv_like
    monkeypatch.setattr(shape_prop, "_conv_like", lambda m, x: asked.append(m) or real(m, x))
    propagate_shapes(gm, (x,))
    fast = {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}
    assert asked  # the shortcut ran
    monkeypatch.setattr(shape_prop, "_plain_conv", lambda m, x: False)
    propagate_shapes(gm, (x,))
    assert fast == {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}
    assert fast["_0"].shape == conv(x).shape


@pytest.mark.parametrize("bad", ["channels", "bias", "kernel"])
def test_conv_shortcut_fails_closed_like_the_kernel(bad):
    conv = nn.Conv2d(6, 8, 3, groups=2)
    with torch.no_grad():
        if bad == "channels":
            conv.weight = nn.Parameter(torch.randn(8, 2, 3, 3))
        elif bad == "bias":
            conv.bias = nn.Parameter(torch.randn(5))
    gm = fxprune.trace(nn.Sequential(conv))
    x = torch.randn(1, 6, 2 if bad == "kernel" else 5, 5)
    with pytest.raises(fxprune.ShapePropagationError, match="_0"):
        propagate_shapes(gm, (x,))


def test_channels_last_conv_input_is_left_to_the_kernel():
    """A channels-last input gives a channels-last output: the kernel's strides, recorded."""
    conv = nn.Conv2d(4, 8, 3)
    gm = fxprune.trace(nn.Sequential(conv))
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    propagate_shapes(gm, (x,))
    assert [n.meta["tensor_meta"].stride for n in gm.graph.nodes if n.name == "_0"] == \
        [conv(x).stride()]
