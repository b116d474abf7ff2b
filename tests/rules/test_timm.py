"""timm rules (passes/rules/timm.py) and the generic rules timm models need.

timm's leaf modules and leaf functions (``register_notrace_module`` /
``register_notrace_function``) are traced whole by ``fxprune.trace``; those with rules
prune exactly, the others are barriers. Also here: the shape/norm/pool rules that the
timm sweep (tests/zoo/test_timm.py) needed, on minimal modules: a roll of token dims,
``table[idx]`` gathers that keep a per-head dim, zero padding of other dims, slices with
computed bounds, sizes computed at run time or read off a pruned tensor, F.group_norm,
F.normalize; and ``Plan.from_counts`` on head-structured groups.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune

timm = pytest.importorskip("timm")
from timm.layers import Attention, BatchNormAct2d, GroupNorm1  # noqa: E402
from timm.models.maxxvit import grid_reverse_nchw, window_reverse_nchw  # noqa: E402
from timm.models.swin_transformer import window_partition, window_reverse  # noqa: E402


def members(group):
    return {(m.fqn, m.dim, m.role) for m in group.members}


def randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                t.uniform_(0.5, 1.5) if "var" in name or name.endswith("weight") \
                    else t.uniform_(-1, 1)


# ----------------------------------------------------------------------------------
# Front-end: timm's leaves are kept whole without the user naming them
# ----------------------------------------------------------------------------------
def test_trace_uses_timm_leaves_and_autowrap_functions():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32,
                              window_size=2, depths=(1, 1, 1, 1), num_classes=3).eval()
    gm = fxprune.trace(model, (torch.randn(1, 3, 32, 32),))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert window_reverse in targets  # a leaf function, not its traced body


def rearrange(x):
    return x.flip(-1)


def test_autowrap_functions_argument_for_any_model():
    class M(nn.Module):
        def forward(self, x):
            return rearrange(x) + 1

    gm = fxprune.trace(M(), (torch.randn(2, 3),), autowrap_functions=(rearrange,))
    assert rearrange in {n.target for n in gm.graph.nodes}
    a = fxprune.analyze(M(), torch.randn(2, 3), autowrap_functions=(rearrange,))
    assert a.gm is not None


# ----------------------------------------------------------------------------------
# BatchNormAct2d (a leaf: batch norm + activation)
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["relu", "swish", "hard_swish", "gelu"])
def test_batch_norm_act_is_pass_through_with_dependents(act, check_pruned):
    before = nn.Sequential(nn.Conv2d(3, 6, 1), BatchNormAct2d(6, act_layer=act),
                           nn.Conv2d(6, 2, 1)).eval()
    randomize(before[1])
    x = torch.randn(2, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert g.exact and a.barriers == ()
    assert {(f"1.{n}", 0, "dep") for n in ("weight", "bias", "running_mean",
                                            "running_var")} <= members(g)
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1, 4, 5]})).small
    assert isinstance(small.get_submodule("1"), BatchNormAct2d)
    assert small.get_submodule("1").num_features == 3


def test_batch_norm_act_with_a_mixing_activation_is_a_barrier():
    bn = BatchNormAct2d(6)
    bn.act = nn.Softmax(dim=1)  # mixes channels: not elementwise
    before = nn.Sequential(nn.Conv2d(3, 6, 1), bn, nn.Conv2d(6, 2, 1)).eval()
    a = fxprune.analyze(before, torch.randn(2, 3, 4, 4))
    assert a.groups == ()


def timm_module(m: nn.Module) -> nn.Module:
    """Make fxprune.trace treat ``m`` as a timm model (its class lives in timm)."""
    m.__class__ = type(type(m).__name__, (type(m),), {"__module__": "timm.models.test"})
    return m


def test_unknown_timm_leaf_with_parameters_is_a_barrier():
    from timm.models.vgg import ConvMlp

    class WithLeaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.mlp = ConvMlp(8, 4, kernel_size=1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.mlp(self.conv(x)).mean((2, 3)))

    model = timm_module(WithLeaf()).eval()
    a = fxprune.analyze(model, torch.randn(1, 3, 4, 4))
    assert a.barriers == ("mlp",)  # kept whole as timm asks, and fail-closed
    assert "conv.weight[0]" not in {g.name for g in a.groups}
    with pytest.raises(fxprune.UnsupportedOpError, match="ConvMlp"):
        fxprune.analyze(model, torch.randn(1, 3, 4, 4), strict=True)


# ----------------------------------------------------------------------------------
# timm attention: fused qkv reshape(B, N, 3, H, D), heads policy, scale, non-fused path
# ----------------------------------------------------------------------------------
class AttnBlock(nn.Module):
    def __init__(self, dim=24, heads=4, fused=True):
        super().__init__()
        self.inp = nn.Linear(5, dim)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.attn.fused_attn = fused
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.attn(h))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("policy, heads, head_dim", [("heads", 2, 6), ("head_dim", 4, 3)])
def test_timm_attention_heads(fused, policy, heads, head_dim, check_pruned):
    torch.manual_seed(0)
    before = timm_module(AttnBlock(fused=fused)).eval()
    x = torch.randn(2, 7, 5)
    a = fxprune.analyze(before, x, split_policy=policy)
    g = a.group("attn.qkv.weight[0]")
    assert g.exact and g.size == (4 if policy == "heads" else 6)
    assert {("attn.qkv.weight", 0, "out"), ("attn.qkv.bias", 0, "dep"),
            ("attn.proj.weight", 1, "in")} <= members(g)
    plan = fxprune.Plan.from_ratio(a, 0.5, criterion="random", seed=1)
    small = check_pruned(before, x, plan).small
    reshape = [n for n in small.graph.nodes if n.target == "reshape"][0]
    assert list(reshape.args[-3:]) == [3, heads, head_dim]  # literal sizes rewritten
    code = small.code
    if fused:  # the original softmax scale stays (head_dim changed under "head_dim")
        sdpa = [n for n in small.graph.nodes if "scaled_dot_product" in str(n.target)][0]
        if policy == "head_dim":
            assert sdpa.kwargs["scale"] == pytest.approx(1 / math.sqrt(6))
    else:
        assert "0.408248" in code  # q * 6 ** -0.5, a literal in the graph


def test_head_count_that_does_not_divide_is_a_plan_error():
    before = timm_module(AttnBlock()).eval()
    a = fxprune.analyze(before, torch.randn(2, 7, 5), split_policy="heads")
    with pytest.raises(fxprune.PlanError, match=r"module 'attn\.qkv'.*valid counts are "
                                                 r"18, 36, 54, 72"):
        fxprune.Plan.from_counts(a, {"attn.qkv.weight": 40})
    with pytest.raises(fxprune.PlanError, match=r"module 'attn\.proj'.*valid counts are "
                                                 r"6, 12, 18, 24"):
        fxprune.Plan.from_counts(a, {("attn.proj.weight", 1): 20})
    plan = fxprune.Plan.from_counts(a, {"attn.qkv.weight": 36})
    assert plan.removed() == {"attn.qkv.weight[0]": 2}


def test_from_counts_keeps_whole_units_and_agrees_across_entries(check_pruned):
    before = timm_module(AttnBlock()).eval()
    x = torch.randn(2, 7, 5)
    a = fxprune.analyze(before, x, split_policy="head_dim")
    plan = fxprune.Plan.from_counts(a, {"attn.qkv.weight": 48, ("attn.proj.weight", 1): 16,
                                        "inp.weight": 20})
    small = check_pruned(before, x, plan).small
    assert small.get_submodule("attn.qkv").weight.shape == (48, 20)
    with pytest.raises(fxprune.PlanError, match="another entry keeps"):
        fxprune.Plan.from_counts(a, {"attn.qkv.weight": 48, ("attn.proj.weight", 1): 12})
    with pytest.raises(fxprune.PlanError, match="pinned"):
        fxprune.Plan.from_counts(a, {"out.weight": 2})


def test_computed_qkv_bias_follows_the_rows(check_pruned):
    """EVA: F.linear(x, qkv.weight, cat(q_bias, k_bias (zeros buffer), v_bias)): the
    computed bias is sliced with the heads; so is a uniform bias built at run time
    (``new_full``); a non-uniform one built at run time is untracked: heads stay whole."""
    class Eva(nn.Module):
        def __init__(self, untracked=None):
            super().__init__()
            self.untracked = untracked
            self.qkv = nn.Linear(8, 24, bias=False)
            self.q_bias, self.v_bias = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
            self.register_buffer("k_bias", torch.zeros(8), persistent=False)
            self.proj = nn.Linear(8, 3)

        def forward(self, x):
            B, N, C = x.shape
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.untracked == "uniform":
                bias = x.new_full((24,), 0.1)  # every element equal: follows the heads
            elif self.untracked == "computed":
                bias = x.new_full((24,), 0.1).cumsum(0)  # differs per row: untracked
            qkv = F.linear(x, self.qkv.weight, bias)
            q, k, v = qkv.reshape(B, N, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, 8)
            return self.proj(out)

    x = torch.randn(2, 5, 8)
    before = Eva().eval()
    a = fxprune.analyze(before, x, split_policy="heads")
    g = a.group("qkv.weight[0]")
    assert {("q_bias", 0, "dep"), ("v_bias", 0, "dep"), ("k_bias", 0, "dep")} <= members(g)
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1]})).small
    assert small.q_bias.shape == (4,) and small.k_bias.shape == (4,)
    uniform = Eva(untracked="uniform").eval()
    a = fxprune.analyze(uniform, x, split_policy="heads")
    g = a.group("qkv.weight[0]")
    check_pruned(uniform, x, fxprune.Plan.from_indices(a, {g.id: [0]}))
    a = fxprune.analyze(Eva(untracked="computed").eval(), x, split_policy="heads")
    assert "qkv.weight[0]" not in {g.name for g in a.groups}


# ----------------------------------------------------------------------------------
# Gated MLPs: gate and up projections are one group
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", [None, nn.LayerNorm])
def test_swiglu_gate_and_up_projections_are_coupled(norm, check_pruned):
    from timm.layers import SwiGLU

    before = SwiGLU(6, 10, norm_layer=norm).eval()
    x = torch.randn(2, 3, 6)
    a = fxprune.analyze(before, x)
    g = a.group("fc1_g.weight[0]")
    assert {("fc1_g.weight", 0, "out"), ("fc1_x.weight", 0, "out"),
            ("fc2.weight", 1, "in")} <= members(g)
    assert g.size == 10 and g.exact is (norm is None)
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 3, 4, 9]})).small
    assert small.get_submodule("fc1_x").out_features == 4


def test_glu_mlp_halves_of_one_linear_are_coupled(check_pruned):
    from timm.layers import GluMlp

    before = GluMlp(6, 12).eval()  # fc1: 12 rows, chunked into value and gate halves
    x = torch.randn(2, 3, 6)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert g.size == 6 and g.granularity == 2  # row i and row i + 6 go together
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1, 2]})).small
    assert small.get_submodule("fc1").weight.shape == (4, 6)


# ----------------------------------------------------------------------------------
# Windows, rolls, padding, gathers: Swin-style token rearrangements keep channels
# ----------------------------------------------------------------------------------
class Windows(nn.Module):
    """Pad, shift, window partition/reverse around a per-token Linear, crop back."""

    def __init__(self, c=6):
        super().__init__()
        self.a, self.mix, self.b = nn.Linear(3, c), nn.Linear(c, c), nn.Linear(c, 2)

    def forward(self, x):  # (B, H, W, 3), H = W = 3: padded to 4 for windows of 2
        h = self.a(x)
        _, H, W, C = h.shape
        h = F.pad(h, (0, 0, 0, 4 - W, 0, 4 - H))
        h = torch.roll(h, shifts=(1, 1), dims=(1, 2))
        w = window_partition(h, (2, 2)).view(-1, 4, C)
        w = self.mix(w).view(-1, 2, 2, C)
        h = window_reverse(w, (2, 2), 4, 4)
        h = torch.roll(h, shifts=(-1, -1), dims=(1, 2))[:, :H, :W, :]
        return self.b(h)


def test_window_rearrangements_keep_channels(check_pruned):
    before = timm_module(Windows()).eval()
    x = torch.randn(2, 3, 3, 3)
    a = fxprune.analyze(before, x)
    assert a.barriers == ()
    assert {g.name for g in a.groups} == {"a.weight[0]", "mix.weight[0]"}
    assert all(g.exact for g in a.groups)
    check_pruned(before, x, fxprune.Plan.from_ratio(a, 0.5, criterion="random"))


@pytest.mark.parametrize("fn", [window_reverse_nchw, grid_reverse_nchw])
def test_channels_first_reverse(fn, check_pruned):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):  # (B * 4 windows, C, 2, 2) -> (B, C, 4, 4)
            return self.b(fn(self.a(x), [2, 2], [4, 4]))

    before = timm_module(M()).eval()
    x = torch.randn(8, 3, 2, 2)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert g.exact and a.barriers == ()
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 3]}))


def test_roll_along_a_channel_dim_is_pinned():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.roll(self.a(x), 1, -1))

    assert fxprune.analyze(M(), torch.randn(2, 3)).groups == ()


class RelPosBias(nn.Module):
    """Per-head table gathered by an index buffer: table[idx] keeps its head dim."""

    def __init__(self, dim=8, heads=2, tokens=3):
        super().__init__()
        self.heads, self.tokens = heads, tokens
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(5, heads))
        self.register_buffer("index", torch.randint(0, 5, (tokens * tokens,)))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        attn = ((q * 0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def test_gathered_per_head_table_follows_heads(check_pruned):
    torch.manual_seed(0)
    before = RelPosBias().eval()
    x = torch.randn(2, 3, 8)
    a = fxprune.analyze(before, x, split_policy="heads")
    g = a.group("qkv.weight[0]")
    assert g.size == 2 and ("table", 1, "dep") in members(g) and g.exact
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1]})).small
    assert small.table.shape == (5, 1)
    # head_dim units cannot follow a per-head table: it is pinned, head_dim still prunable
    a = fxprune.analyze(before, x, split_policy="head_dim")
    assert a.group("qkv.weight[0]").size == 4
    assert ("table", 1, "dep") not in members(a.group("qkv.weight[0]"))


def test_sizes_read_off_a_pruned_tensor_stay_the_old_count(check_pruned):
    """reshape(B, N, C) with C read off the (pruned) input while its own output dim is not
    pruned (XCiT / EdgeNeXt attention): C must stay the original count."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x)
            B, N, C = h.shape
            v = torch.cumsum(self.b(h), -1)  # a scan over channels: b's are pinned
            return self.c(v.reshape(B, N, C))  # C read off h, whose channels are pruned

    x = torch.randn(2, 5, 3)
    before = M().eval()
    a = fxprune.analyze(before, x)
    assert {g.name for g in a.groups} == {"a.weight[0]"}
    check_pruned(before, x, fxprune.Plan.from_indices(a, {0: [0, 2, 5]}))


def test_sizes_computed_from_a_pruned_size_stay_the_old_count(check_pruned):
    """Twins' kv.reshape(B, -1, 2, heads, C // heads) with C read off the pruned residual
    stream: with whole heads removed, head_dim (C // heads) must stay a literal."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.kv, self.c = nn.Linear(3, 8), nn.Linear(8, 16), nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x)
            B, N, C = h.shape
            k, v = self.kv(h).reshape(B, -1, 2, 2, C // 2).permute(2, 0, 3, 1, 4).unbind(0)
            return self.c((k.softmax(-1) * v).transpose(1, 2).reshape(B, N, -1))

    before = M().eval()
    x = torch.randn(2, 5, 3)
    a = fxprune.analyze(before, x, split_policy="heads")
    plan = fxprune.Plan.from_indices(a, {"a.weight[0]": [0, 1, 2, 5], "kv.weight[0]": [1]})
    small = check_pruned(before, x, plan).small
    reshape = [n for n in small.graph.nodes if n.target == "reshape"][0]
    assert reshape.args[2:4] == (-1, 2) and reshape.args[4] == 1  # one head left
    assert tuple(reshape.meta["tensor_meta"].shape) == (2, 5, 2, 1, 4)  # head_dim stays 4


def test_scale_read_off_a_pruned_head_dim_keeps_its_value(check_pruned):
    """scale = q.shape[-1] ** -0.5 computed at run time: after head_dim pruning it keeps
    the trained value (as the masked model does), and v.size(-1) too."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 3)

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
            attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(B, N, 2 * v.size(-1)))

    before = M().eval()
    x = torch.randn(2, 5, 8)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 3]})).small
    assert "4 ** -0.5" in small.code


def test_shape_computed_as_one_value(check_pruned):
    """maxxvit: x.reshape(restore_shape + (-1,)) after the heads: the computed shape gets
    its channel entries at run time."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x).reshape(x.shape[0], x.shape[1], 2, 4)
            return self.b(h.reshape(h.shape[:-2] + (-1,)))

    before = M().eval()
    x = torch.randn(2, 5, 3)
    a = fxprune.analyze(before, x, split_policy="heads")
    (g,) = a.groups
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1]})).small
    assert small(torch.randn(3, 4, 3)).shape == (3, 4, 2)  # batch and tokens stay symbolic


# ----------------------------------------------------------------------------------
# Functional norms met in timm: GroupNorm1 (F.group_norm), F.normalize
# ----------------------------------------------------------------------------------
def test_functional_group_norm_is_a_mixer_with_dependents(check_pruned):
    before = nn.Sequential(nn.Conv2d(3, 6, 1), GroupNorm1(6), nn.Conv2d(6, 2, 1)).eval()
    randomize(before[1])
    x = torch.randn(2, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert not g.exact and {("1.weight", 0, "dep"), ("1.bias", 0, "dep")} <= members(g)
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 1, 4]})).small
    assert small.get_submodule("1").weight.shape == (3,)


def test_functional_group_norm_groups_stay_equal():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.w = nn.Conv2d(3, 6, 1), nn.Parameter(torch.ones(6))

        def forward(self, x):
            return F.group_norm(self.a(x), 3, self.w) * 2

    a = fxprune.analyze(M(), torch.randn(1, 3, 2, 2))
    assert a.groups == () or all(g.size <= 2 for g in a.groups)


@pytest.mark.parametrize("over, exact", [(-1, False), (1, True)])
def test_normalize_over_channels_is_a_mixer_over_tokens_pass_through(over, exact,
                                                                     check_pruned):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(F.normalize(self.a(x), dim=over))

    x = torch.randn(2, 4, 3)
    model = M().eval()
    a = fxprune.analyze(model, x)
    (g,) = a.groups
    assert g.exact is exact
    check_pruned(model, x, fxprune.Plan.from_indices(a, {g.id: [0, 5]}))
