"""Property: the gated student computes what the compiled model computes (GLOSSARY.md,
"gate / mask").

For random removal sets over the exact groups, ``GatedStudent`` with those units' gates at
0 must equal ``fxprune.compile`` of the same plan (eval mode, float64), and both must
equal the mask oracle (``insert_masks``). Inexact groups (a LayerNorm over the channels)
are left whole: a gate there cannot reproduce the changed statistics, so the Pruner names
them instead (``tests/distill/test_pruner.py``). Zoo-like models cover the gate placement
rules (fused qkv under both split policies and front-ends, GQA, recurrent hidden units,
nn.MultiheadAttention and Swin window-attention heads gated on rows, grouped/depthwise
convs, channel shuffle); the hypothesis networks are those of the slice == mask test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fxprune
from fxprune.distill.student import GatedStudent
from passes.gates import insert_gates
from passes.mask import insert_masks
from tests.property.test_slice_equals_mask import SETTINGS, give_back, networks


class FusedAttention(nn.Module):
    """timm's Attention: qkv = Linear(d, 3d).view(b, n, 3, h, d_h), permute, split."""

    def __init__(self, d: int, h: int, how: str) -> None:
        super().__init__()
        self.h, self.how = h, how
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.how == "unbind" else (qkv[0], qkv[1], qkv[2])
        if self.how == "softmax":
            a = (q @ k.transpose(-2, -1) * (c // self.h) ** -0.5).softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(b, n, c))


class FusedBlock(nn.Module):
    """d=16, h=4: pre-norm attention and MLP residuals, a head."""

    def __init__(self, how: str = "getitem") -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.attn = FusedAttention(16, 4, how)
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.n2(x))))
        return self.head(x.mean(1))


class GQABlock(nn.Module):
    """LLaMA-like: 4 query heads over 2 key/value heads (repeat_interleave or enable_gqa),
    causal SDPA, a SwiGLU MLP."""

    def __init__(self, sdpa_gqa: bool) -> None:
        super().__init__()
        self.gqa, self.dh = sdpa_gqa, 4
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8),
                                          nn.Linear(16, 16))
        self.up, self.gate, self.down = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, self.dh).transpose(1, 2)
        k = self.k(x).view(b, n, 2, self.dh).transpose(1, 2)
        v = self.v(x).view(b, n, 2, self.dh).transpose(1, 2)
        if self.gqa:
            a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            a = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                               v.repeat_interleave(2, 1), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, 16))
        x = x + self.down(F.silu(self.gate(x)) * self.up(x))
        return self.head(x.mean(1))


class Recurrent(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc, self.rnn, self.head = nn.Linear(6, 8), getattr(nn, kind)(8, 10, batch_first=True), \
            nn.Linear(10, 3)

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.fc(x)))
        return self.head(y[:, -1])


class MHABlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.mha, self.head = nn.Linear(6, 8), nn.MultiheadAttention(8, 2, batch_first=True), \
            nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        y, _ = self.mha(h, h, h)
        return self.head(torch.relu(y + h).mean(1))


class ShuffleBlock(nn.Module):
    """Grouped conv, channel shuffle (view/transpose/reshape), depthwise residual."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.g = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.bn, self.dw = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c2, self.fc = nn.Conv2d(8, 8, 1, groups=2), nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.g(F.relu(self.c1(x)))))
        b, c, h, w = y.shape
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.fc((y + self.c2(F.relu(self.dw(y)))).mean((2, 3)))


def _tiny_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 16, [1, 1], [2, 4], [2, 2], num_classes=5)


def _timm_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1,
                             num_classes=5)


def _torchvision(name: str):
    import torchvision

    return lambda: getattr(torchvision.models, name)(num_classes=5)


TOKENS, IMAGE = (2, 5, 16), (1, 3, 32, 32)
# (id, model factory, input shape, split policies, front-ends)
ZOO = [
    ("fused_qkv_sdpa", lambda: FusedBlock("getitem"), TOKENS, ("heads", "head_dim"), ("fx", "export")),
    ("fused_qkv_unbind", lambda: FusedBlock("unbind"), TOKENS, ("head_dim",), ("fx", "export")),
    ("fused_qkv_softmax", lambda: FusedBlock("softmax"), TOKENS, ("head_dim",), ("fx",)),
    ("timm_vit", _timm_vit, IMAGE, ("heads", "head_dim"), ("fx",)),
    ("gqa_repeat", lambda: GQABlock(False), TOKENS, ("heads", "head_dim"), ("fx",)),
    ("gqa_sdpa", lambda: GQABlock(True), TOKENS, ("head_dim",), ("fx", "export")),
    ("lstm", lambda: Recurrent("LSTM"), (2, 4, 6), ("head_dim",), ("fx",)),
    ("gru", lambda: Recurrent("GRU"), (2, 4, 6), ("head_dim",), ("fx",)),
    ("mha", MHABlock, (2, 4, 6), ("heads", "head_dim"), ("fx",)),
    ("swin_window", _tiny_swin, (1, 3, 16, 16), ("heads", "head_dim"), ("fx",)),
    ("shuffle_grouped", ShuffleBlock, (2, 3, 8, 8), ("head_dim",), ("fx",)),
    ("resnet18", _torchvision("resnet18"), IMAGE, ("head_dim",), ("fx",)),
    ("mobilenet_v3_small", _torchvision("mobilenet_v3_small"), IMAGE, ("head_dim",), ("fx",)),
]
CASES = [pytest.param(make, shape, policy, frontend, id=f"{name}-{policy}-{frontend}")
         for name, make, shape, policies, frontends in ZOO
         for policy in policies for frontend in frontends]


def exact_removals(analysis, pick) -> dict[int, list[int]]:
    """``pick(group) -> unit indices`` for every exact group (inexact ones stay whole)."""
    return give_back(analysis, {g.id: set(pick(g)) if g.exact else set()
                                for g in analysis.groups})


def assert_student_equals_compiled(analysis, remove, x, *, export: bool) -> None:
    """Gated student (gates of ``remove`` at 0) == compile(plan) == mask oracle."""
    plan = fxprune.Plan.from_indices(analysis, remove, remove=True)
    kept = plan.kept_labels(analysis)
    student = GatedStudent(insert_gates(analysis), export=export).eval()
    small = fxprune.compile(analysis, plan)
    if export:
        from fxprune.distill.student import set_graph_training
        set_graph_training(small, False)
    with torch.no_grad():
        student.mask.copy_(torch.as_tensor(kept, dtype=student.mask.dtype))
        got, want = student(x), small.eval()(x)
        masked = insert_masks(analysis, kept).eval()(x)
    removed = sorted(g.name for g in analysis.groups if remove.get(g.id))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9,
                               msg=lambda m: f"gated student != compiled, removed in {removed}\n{m}")
    torch.testing.assert_close(masked, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("make,shape,policy,frontend", CASES)
def test_gated_student_equals_compiled_model_on_the_zoo(make, shape, policy, frontend):
    torch.manual_seed(0)
    model, x = make().double().eval(), torch.randn(shape, dtype=torch.float64)
    analysis = fxprune.analyze(model, (x,), split_policy=policy, frontend=frontend)
    assert analysis.groups and any(g.exact for g in analysis.groups)
    rng = np.random.default_rng(0)
    for _ in range(2):
        remove = exact_removals(analysis, lambda g: rng.choice(
            g.size, rng.integers(1, g.size), replace=False) if g.size > 1 else ())
        assert any(remove.values())
        assert_student_equals_compiled(analysis, remove, x, export=frontend == "export")


@SETTINGS
@given(net=networks(), data=st.data())
def test_gated_student_equals_compiled_model_on_random_networks(net, data):
    model, x = net
    model, x = model.double(), x.double()
    analysis = fxprune.analyze(model, x)
    remove = exact_removals(analysis, lambda g: data.draw(
        st.lists(st.integers(0, g.size - 1), unique=True, max_size=g.size - 1),
        label=f"remove {g.name}"))
    assert_student_equals_compiled(analysis, remove, x, export=False)
