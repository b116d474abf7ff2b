"""Layer pruning: find_blocks, block_similarity, remove_blocks, and the block mask oracle.

The oracle for a removed block is the original model with the block's branch output
``f(x)`` zeroed. It is built twice: by ``passes.mask.mask_blocks`` (graph level, used by
``verify_blocks``) and here, independently, with forward hooks on the user's modules
that return zeros, so that neither the rewrite nor the graph oracle checks itself.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.core.errors import RewriteError
from passes.find_blocks import find_blocks as find_blocks_pass
from passes.remove_blocks import remove_blocks as remove_blocks_pass

torchvision = pytest.importorskip("torchvision")


# ----------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------
class Attention(nn.Module):
    """timm-style fused qkv attention: reshape(B, N, 3, H, D) and SDPA."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, class token, position embedding, pre-norm layers, head."""

    def __init__(self, dim: int = 16, heads: int = 4, depth: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.1)
        self.blocks = nn.Sequential(*[Layer(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x)[:, 0])


def _zeroing_hooks(model: nn.Module, modules: list[str]):
    """Forward hooks that replace each module's output by zeros (the independent oracle)."""
    return [model.get_submodule(m).register_forward_hook(lambda mod, i, out: out * 0)
            for m in modules]


def _oracle(model: nn.Module, x: torch.Tensor, zeroed: list[str]) -> torch.Tensor:
    ref = copy.deepcopy(model).double()
    _zeroing_hooks(ref, zeroed)
    with torch.no_grad():
        return ref(x.double())


def _run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(m).double()(x.double())


# ----------------------------------------------------------------------------------
# ResNet: identity-skip blocks only
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that no branch is ~0
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    return model, x, fxprune.analyze(model, x)


def test_resnet_blocks_are_the_identity_skip_ones(resnet):
    _, _, analysis = resnet
    blocks = fxprune.find_blocks(analysis)
    # layerN.0 (N >= 2) downsample their skip with a conv: not removable
    assert [b.name for b in blocks] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1",
                                        "layer4.1"]
    b = blocks[1]
    assert b.input == "layer1_0_relu_1" and b.residuals == (b.output,) and len(b.branches) == 1
    assert {"layer1_1_conv1", "layer1_1_bn2", b.output} <= set(b.nodes)
    assert "layer1_1_relu_1" not in b.nodes  # the activation after the add stays
    assert "layer1.1.conv1.weight" in b.params and "layer1.1.bn2.running_var" in b.params
    assert b.num_params == 2 * (64 * 64 * 9 + 2 * 64)


@pytest.mark.parametrize("names", [["layer1.1"], ["layer1.0", "layer3.1"],
                                   ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]])
def test_resnet_removal_equals_zeroed_branches(resnet, names):
    model, x, analysis = resnet
    blocks = [b for b in fxprune.find_blocks(analysis) if b.name in names]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = fxprune.remove_blocks(analysis, blocks)

    want = _oracle(model, x, [f"{n}.bn2" for n in names])
    got = _run(small, x)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(got, _run(model, x), atol=1e-6)  # removal changed something
    assert fxprune.verify_blocks(analysis, small, blocks, x) <= 1e-9

    removed = sum(b.num_params for b in blocks)
    assert sum(p.numel() for p in small.parameters()) == \
        sum(p.numel() for p in model.parameters()) - removed
    for n in names:
        with pytest.raises(AttributeError):
            small.get_submodule(f"{n}.conv1")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    small.graph.lint()


def test_similarity_ranks_a_dead_block_first(resnet):
    model, x, _ = resnet
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.layer3[1].bn2.weight.zero_()
        dead.layer3[1].bn2.bias.zero_()
    analysis = fxprune.analyze(dead, x)
    blocks = fxprune.find_blocks(analysis)
    scores = fxprune.block_similarity(analysis, blocks, x)
    assert scores.shape == (len(blocks),) and ((scores > -1 - 1e-9) & (scores < 1 + 1e-9)).all()
    # f(x) = 0 and the ReLU after the add sees x >= 0: y == x exactly
    assert blocks[int(scores.argmax())].name == "layer3.1"
    assert scores.max() == pytest.approx(1.0, abs=1e-6)
    assert (scores[[b.name != "layer3.1" for b in blocks]] < 0.9999).all()


def test_removed_then_channel_pruned(resnet, check_pruned):
    model, x, analysis = resnet
    blocks = [b for b in fxprune.find_blocks(analysis) if b.name in ("layer1.1", "layer2.1")]
    small = fxprune.remove_blocks(analysis, blocks)
    again = fxprune.analyze(small, x)
    plan = fxprune.Plan.from_ratio(again, 0.5, criterion="random", seed=1)
    check_pruned(small, x, plan)


# ----------------------------------------------------------------------------------
# A ViT-like model: a layer is two chained residual branches
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(1)
    model = TinyViT().eval()
    x = torch.randn(2, 3, 8, 8)
    return model, x, fxprune.analyze(model, x)


def test_vit_layers_and_branches(vit):
    _, _, analysis = vit
    layers = fxprune.find_blocks(analysis)
    assert [b.name for b in layers] == [f"blocks.{i}" for i in range(4)]
    assert all(len(b.residuals) == 2 and len(b.branches) == 2 for b in layers)
    assert layers[1].input == layers[0].output  # chained through the residual stream
    branches = fxprune.find_blocks(analysis, level="branch")
    assert len(branches) == 8 and branches[0].output == layers[0].residuals[0]
    assert all(len(b.residuals) == 1 for b in branches)
    first = layers[0]
    assert "blocks.0.attn.qkv.weight" in first.params and "blocks.0.mlp.2.bias" in first.params
    assert "pos_embed" not in first.params and "cls_token" not in first.params


@pytest.mark.parametrize("which", [[1], [0, 3], [0, 1, 2, 3]])
def test_vit_layer_removal_equals_zeroed_branches(vit, which):
    model, x, analysis = vit
    layers = fxprune.find_blocks(analysis)
    blocks = [layers[i] for i in which]
    small = fxprune.remove_blocks(analysis, blocks)
    zeroed = [f"blocks.{i}.{m}" for i in which for m in ("attn", "mlp")]
    want = _oracle(model, x, zeroed)
    assert torch.allclose(_run(small, x), want, rtol=1e-9, atol=1e-9)
    assert fxprune.verify_blocks(analysis, small, blocks, x) <= 1e-9
    per_layer = sum(p.numel() for p in model.blocks[0].parameters())
    assert sum(p.numel() for p in small.parameters()) == \
        sum(p.numel() for p in model.parameters()) - per_layer * len(which)
    assert {b.num_params for b in blocks} == {per_layer}


def test_vit_attention_branch_only(vit):
    model, x, analysis = vit
    attn = [b for b in fxprune.find_blocks(analysis, level="branch")
            if b.name == "blocks.2"][0]
    small = fxprune.remove_blocks(analysis, [attn])
    assert torch.allclose(_run(small, x), _oracle(model, x, ["blocks.2.attn"]),
                          rtol=1e-9, atol=1e-9)
    assert hasattr(small.get_submodule("blocks.2"), "mlp")
    with pytest.raises(AttributeError):
        small.get_submodule("blocks.2.attn")


def test_vit_removed_then_heads_pruned(vit, check_pruned):
    _, x, analysis = vit
    small = fxprune.remove_blocks(analysis, [fxprune.find_blocks(analysis)[1]])
    again = fxprune.analyze(small, x, split_policy="heads")
    plan = fxprune.Plan.from_ratio(again, 0.5, criterion="random", seed=3)
    pruned = check_pruned(small, x, plan)
    assert pruned.report.ok


# ----------------------------------------------------------------------------------
# What is not a block
# ----------------------------------------------------------------------------------
class NotBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = self.a(x)
        y1 = x + h                        # h is returned too: its branch is not private
        y2 = y1 + self.bias               # broadcast add of a parameter: not a block
        y3 = y2 + self.c(self.b(y2))      # a real block
        return y3, h


def test_only_private_identity_branches_are_blocks():
    x = torch.randn(3, 2, 4)
    analysis = fxprune.analyze(NotBlocks().eval(), x)
    blocks = fxprune.find_blocks(analysis)
    assert [(b.input, b.branches) for b in blocks] == [("add_1", ("c",))]
    assert blocks[0].params == ("b.bias", "b.weight", "c.bias", "c.weight")


def test_blocks_from_another_graph_are_refused(resnet, vit):
    _, _, analysis = vit
    foreign = fxprune.find_blocks(resnet[2])[:1]
    with pytest.raises(RewriteError, match="does not belong to this graph"):
        fxprune.remove_blocks(analysis, foreign)


def test_level_is_checked(vit):
    with pytest.raises(ValueError, match="level"):
        fxprune.find_blocks(vit[2], level="stage")


def test_nested_block_goes_with_its_outer_block():
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            h = h + self.b(h)               # inner block inside the outer branch
            return self.out(x + h)

    model = Nested().eval()
    x = torch.randn(2, 4)
    analysis = fxprune.analyze(model, x)
    blocks = find_blocks_pass(analysis.gm, level="branch")
    assert len(blocks) == 2
    small = remove_blocks_pass(analysis.gm, blocks)  # outer first; the inner is inside it
    assert torch.allclose(_run(small, x), _run(model.out, x))
    assert {n for n, _ in small.named_parameters()} == {"out.weight", "out.bias"}


class CastLayer(nn.Module):
    """A pre-norm layer whose two halves are separated by a same-dtype cast, with a
    parameter-free residual (tanh-GELU-like ``h + 0.044715 * h**3``) inside its MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.up, self.down = nn.Linear(4, 4), nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = x + self.attn(x)
        h = h.to(torch.float32)
        u = self.up(h)
        u = u + 0.044715 * u ** 3
        return h + self.down(torch.tanh(u))


class CastNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CastLayer(), CastLayer()])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_casts_between_halves_are_bridged_and_arithmetic_is_no_block():
    x = torch.randn(3, 4)
    model = CastNet().eval()
    analysis = fxprune.analyze(model, x)
    blocks = fxprune.find_blocks(analysis)
    assert [b.name for b in blocks] == ["layers.0", "layers.1"]
    assert all(len(b.residuals) == 2 for b in blocks)  # attention half + MLP half
    branch = fxprune.find_blocks(analysis, level="branch")
    assert len(branch) == 4  # the parameter-free u + 0.044715 u**3 is none of them
    small = fxprune.remove_blocks(analysis, blocks[:1])
    assert fxprune.verify_blocks(analysis, small, blocks[:1], x) <= 1e-6
    assert sum(p.numel() for p in small.parameters()) == \
        sum(p.numel() for p in model.parameters()) - blocks[0].num_params
