"""Shape rules (passes/rules/shape.py): index maps through cat / split / chunk / getitem
(offsets), flatten / view / reshape (expansion, head blocking, shuffles), transpose /
permute, expand / stack, and the fixups that rewrite literal sizes after slicing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune


def members(group):
    return {(m.fqn, m.dim, m.role) for m in group.members}


def units(group, fqn, dim):
    (m,) = [m for m in group.members if m.fqn == fqn and m.dim == dim]
    return m.units.tolist()


def call(small, name):
    (node,) = [n for n in small.graph.nodes if n.name == name]
    return node


# ----------------------------------------------------------------------------------
class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


def test_cat_offsets(check_pruned):
    """cat([a (4), b (6)], dim=1): a's units are c's columns 0..3, b's are 4..9."""
    before = Cat().eval()
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert g.size == 10
    assert units(g, "a.weight", 0) == [0, 1, 2, 3]
    assert units(g, "b.weight", 0) == [4, 5, 6, 7, 8, 9]
    assert units(g, "c.weight", 1) == list(range(10))
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1, 5, 6]},
                                                               remove=True)).small
    assert (small.a.out_channels, small.b.out_channels, small.c.in_channels) == (3, 4, 7)
    assert torch.equal(small.c.weight, before.c.weight[:, [0, 2, 3, 4, 7, 8, 9]])


def test_cat_along_batch_couples_channels(check_pruned):
    class CatB(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 5, 1)
            self.b = nn.Conv2d(3, 5, 1)
            self.c = nn.Conv2d(5, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 0))

    before = CatB().eval()
    x = torch.randn(2, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert g.size == 5 and units(g, "b.weight", 0) == [0, 1, 2, 3, 4]
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 4]}))


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 10, 1)
        self.b = nn.Conv2d(4, 2, 1)
        self.c = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        p, q = torch.split(self.a(x), [4, 6], dim=1)
        return self.b(p) + self.c(q)


def test_split_offsets_and_sizes_rewritten(check_pruned):
    before = Split().eval()
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert units(g, "b.weight", 1) == [0, 1, 2, 3]
    assert units(g, "c.weight", 1) == [4, 5, 6, 7, 8, 9]
    # remove 1 unit of the first piece and 3 of the second -> sizes [3, 3]
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [2, 4, 8, 9]},
                                                               remove=True)).small
    (node,) = [n for n in small.graph.nodes if "split" in str(n.target)]
    assert list(node.args[1]) == [3, 3]
    assert (small.b.in_channels, small.c.in_channels) == (3, 3)


def test_removing_a_whole_split_piece_is_refused():
    """Removing channels 0..3 (the whole first piece) would leave b with no input channel,
    which torch cannot run: the plan is refused up front, naming the emptied slice."""
    a = fxprune.analyze(Split().eval(), torch.randn(1, 3, 4, 4))
    with pytest.raises(fxprune.PlanError, match=r"b\.weight dim 1"):
        fxprune.Plan.from_indices(a, {0: [0, 1, 2, 3]}, remove=True)


def test_removing_a_whole_cat_input_is_refused(check_pruned):
    before, x = Cat().eval(), torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(before, x)
    with pytest.raises(fxprune.PlanError, match=r"a\.weight dim 0"):
        fxprune.Plan.from_indices(a, {0: [0, 1, 2, 3]}, remove=True)
    # with one of a's channels left the same removal elsewhere compiles
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {0: [0, 1, 2, 4, 5]},
                                                               remove=True)).small
    assert (small.a.out_channels, small.b.out_channels) == (1, 4)


def test_chunk_then_gate_couples_halves(check_pruned):
    """p, q = y.chunk(2); p * sigmoid(q): channel j of p and j of q are one unit."""
    class GLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            p, q = self.a(x).chunk(2, dim=1)
            return self.b(p * torch.sigmoid(q))

    before = GLU().eval()
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert (g.size, g.granularity) == (4, 2)
    assert units(g, "a.weight", 0) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert units(g, "b.weight", 1) == [0, 1, 2, 3]
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 3]})).small
    assert torch.equal(small.a.weight, before.a.weight[[0, 3, 4, 7]])


def test_getitem_slice_bounds_are_recounted(check_pruned):
    class Slc(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 10, 1)
            self.b = nn.Conv2d(3, 2, 1)
            self.c = nn.Conv2d(10, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y[:, 2:5]) + self.c(y)

    before = Slc().eval()
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert units(g, "b.weight", 1) == [2, 3, 4]
    # kept [0, 1, 3, 4, 7]: y[:, 2:5] keeps channels 3, 4 -> positions 2..4 of the kept
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 1, 3, 4, 7]})).small
    index = call(small, "getitem").args[1]
    assert index[1] == slice(2, 4, None)
    assert torch.equal(small.b.weight, before.b.weight[:, [1, 2]])


@pytest.mark.parametrize("index", ["int", "strided"])
def test_integer_and_strided_index_on_channels_pin(index):
    class Idx(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)

        def forward(self, x):
            y = self.a(x)
            return y[:, 0] if index == "int" else y[:, ::2]

    assert fxprune.analyze(Idx(), torch.randn(1, 3, 4, 4)).groups == ()


# ----------------------------------------------------------------------------------
class Flat(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        y = self.a(x)
        if self.how == "flatten":
            y = torch.flatten(y, 1)
        elif self.how == "view-1":
            y = y.view(y.size(0), -1)
        elif self.how == "literal":
            y = y.reshape(2, 100)
        else:
            y = nn.functional.relu(y).flatten(start_dim=1)
        return self.fc(y)


@pytest.mark.parametrize("how", ["flatten", "view-1", "literal", "method"])
def test_flatten_expands_channels_into_features(check_pruned, how):
    """Channel c of C x H x W becomes features c*25 ... c*25+24 of fc's input."""
    before = Flat(how).eval()
    x = torch.randn(2, 3, 5, 5)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert g.size == 4 and g.granularity == 1
    assert units(g, "fc.weight", 1) == np.repeat(np.arange(4), 25).tolist()
    (fc_in,) = [m for m in g.members if m.fqn == "fc.weight"]
    assert fc_in.index_map == "x25 blocks"
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1]},
                                                               remove=True)).small
    cols = [i for i in range(100) if not 25 <= i < 50]
    assert torch.equal(small.fc.weight, before.fc.weight[:, cols])
    assert small.fc.in_features == 75
    if how == "literal":
        assert list(call(small, "reshape").args[1:]) == [2, 75]
    if how == "view-1":
        assert call(small, "view").args[2] == -1  # -1 stays -1


def test_view_with_literal_channel_size_is_rewritten(check_pruned):
    class V(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.l = nn.Linear(6, 4)

        def forward(self, x):
            b, _, h, w = x.shape
            return self.l(self.a(x).view(b, 6, h * w).transpose(1, 2))

    before = V().eval()
    x = torch.randn(2, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert members(g) == {("a.weight", 0, "out"), ("a.bias", 0, "dep"), ("l.weight", 1, "in")}
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 2, 5]})).small
    assert call(small, "view").args[2] == 3


def test_view_reading_channel_count_from_shape_is_rewritten(check_pruned):
    """A channel size read from a pruned tensor's .shape is replaced by the kept count."""
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.a(x)
            b, c, h, w = y.shape
            y = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
            return self.b(y)

    before = Shuffle().eval()
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    # channel shuffle: the view splits 8 into (2, 4); both axes vary, so positions j of
    # both halves are one unit (granularity 2); the transpose interleaves them for b.
    assert (g.size, g.granularity) == (4, 2)
    assert units(g, "a.weight", 0) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert units(g, "b.weight", 1) == [0, 0, 1, 1, 2, 2, 3, 3]
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1, 2, 3]})).small
    assert small.a.out_channels == 6


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 12)
        self.o = nn.Linear(12, 8)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.q(x).view(b, n, 3, 4).permute(0, 2, 1, 3)  # B, heads, N, head_dim
        h = torch.relu(h).permute(0, 2, 1, 3).reshape(b, n, 12)
        return self.o(h)


@pytest.mark.parametrize("policy,size,gran", [("inner", 4, 3), ("outer", 3, 4)])
def test_reshape_to_heads_and_permute(check_pruned, policy, size, gran):
    """view(B, N, 3, 4): feature f is (head f // 4, dim f % 4). 'inner' keeps head_dim
    prunable (unit = dim j of every head), 'outer' keeps heads (unit = a whole head)."""
    before = Heads()
    x = torch.randn(2, 5, 8)
    a = fxprune.analyze(before, x, split_policy=policy)
    (g,) = a.groups
    assert (g.size, g.granularity) == (size, gran)
    want = [f % 4 for f in range(12)] if policy == "inner" else [f // 4 for f in range(12)]
    assert units(g, "q.weight", 0) == want and units(g, "o.weight", 1) == want
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [1]},
                                                               remove=True)).small
    view = call(small, "view")
    assert list(view.args[3:]) == ([3, 3] if policy == "inner" else [2, 4])
    assert call(small, "reshape").args[3] == (9 if policy == "inner" else 8)


def test_head_size_computed_from_pruned_channel_count(check_pruned):
    """4 heads of size 1: the units vary along the heads axis, so removing unit 0 removes
    a head; the head_dim size c // h read from the pruned input must stay 1."""
    class H(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            y = self.a(x)
            b, n, c = y.shape
            y = torch.relu(y.reshape(b, n, 4, c // 4)).reshape(b, n, c)
            return self.b(y)

    before = H()
    x = torch.randn(2, 3, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert g.size == 4
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0]}, remove=True))


def test_permute_to_channels_last_and_back(check_pruned):
    class NHWC(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.l = nn.Linear(6, 5)
            self.b = nn.Conv2d(5, 2, 1)

        def forward(self, x):
            y = self.a(x).permute(0, 2, 3, 1)              # N, H, W, C
            return self.b(self.l(y).permute(0, 3, 1, 2))   # N, C', H, W

    before = NHWC().eval()
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(before, x)
    g_a, g_l = a.groups
    assert members(g_a) == {("a.weight", 0, "out"), ("a.bias", 0, "dep"), ("l.weight", 1, "in")}
    assert members(g_l) == {("l.weight", 0, "out"), ("l.bias", 0, "dep"), ("b.weight", 1, "in")}
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g_a.id: [0, 1], g_l.id: [4]}))


def test_unflatten_and_squeeze(check_pruned):
    class U(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 12)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x).unflatten(-1, (3, 4)).unsqueeze(0).squeeze(0)))

    before = U()
    x = torch.randn(2, 5)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    # (3, 4): the last axis reaches b's columns; the 3 rows of one column are one unit
    assert (g.size, g.granularity) == (4, 3)
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 2]})).small
    assert list(call(small, "unflatten").args[2]) == [3, 2]


def test_expand_and_none_index(check_pruned):
    class E(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 6)
            self.b = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.b(self.a(x)[:, :, None, None].expand(-1, -1, 4, 4))

    before = E()
    x = torch.randn(2, 5)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert members(g) == {("a.weight", 0, "out"), ("a.bias", 0, "dep"), ("b.weight", 1, "in")}
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [3]}))


def test_stack_couples_inputs(check_pruned):
    class St(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(3, 6, 1)
            self.c = nn.Conv3d(6, 2, 1)

        def forward(self, x):
            return self.c(torch.stack([self.a(x), self.b(x)], 2))

    before = St().eval()
    x = torch.randn(1, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert {("a.weight", 0, "out"), ("b.weight", 0, "out"), ("c.weight", 1, "in")} <= members(g)
    assert "stack" in g.merged_by
    check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 5]}))


# ----------------------------------------------------------------------------------
class Tokens(nn.Module):
    """ViT-style: patch conv -> tokens, a class-token Parameter cat along tokens, a
    position-embedding Parameter added, a head on the class token."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 5, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)                    # B, 4, 8
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos
        return self.head(t[:, 0])


def test_class_token_and_position_embedding_follow_channels(check_pruned):
    before = Tokens()
    x = torch.randn(2, 3, 4, 4)
    a = fxprune.analyze(before, x)
    (g,) = a.groups
    assert members(g) == {("patch.weight", 0, "out"), ("patch.bias", 0, "dep"),
                          ("cls", 2, "dep"), ("pos", 2, "dep"), ("head.weight", 1, "in")}
    # the token dims (cls dim 1 of size 1, pos dim 1 of size 5) are never sliced
    assert all(m.dim == 2 for m in g.members if m.fqn in ("cls", "pos"))
    small = check_pruned(before, x, fxprune.Plan.from_indices(a, {g.id: [0, 3, 4]})).small
    assert small.cls.shape == (1, 1, 3) and small.pos.shape == (1, 5, 3)
    assert torch.equal(small.pos, before.pos[:, :, [0, 3, 4]])
    assert isinstance(small.cls, nn.Parameter) and isinstance(small.pos, nn.Parameter)


class UniformFactories(nn.Module):
    """Literal-size zeros/ones/full next to conv channels, in each calling convention."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "zeros_varargs":
            y = y + torch.zeros(1, 8, 1, 1)
        elif self.how == "ones_tuple":
            y = y * torch.ones((1, 8, 1, 1))
        elif self.how == "full_size_kwarg":
            y = y * torch.full(size=(8, 1, 1), fill_value=2.0)
        elif self.how == "new_zeros_method":
            y = y + y.new_zeros(1, 8, 1, 1)
        elif self.how == "new_full_method":
            y = y - y.new_full((1, 8, 1, 1), 0.5)
        return self.head(torch.relu(y))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("how", ["zeros_varargs", "ones_tuple", "full_size_kwarg",
                                 "new_zeros_method", "new_full_method"])
def test_uniform_factory_sizes_follow_the_channels(how, frontend, check_pruned):
    """A tensor whose elements are all equal can be sliced like a mask zeroes it: its
    literal channel size joins the conv's group (instead of pinning it) and is rewritten
    to the kept count."""
    model = UniformFactories(how).eval()
    x = torch.randn(2, 3, 4, 4)
    a = fxprune.analyze(model, x, frontend=frontend)
    g = a.group("conv.weight[0]")
    assert g.size == 8
    small = check_pruned(model, x, fxprune.Plan.from_indices(a, {g.id: [1, 2, 6]})).small
    factories = [n for n in small.graph.nodes if n.op in ("call_function", "call_method")
                 and any(k in str(n.target) for k in ("zeros", "ones", "full"))]
    if not factories:  # fx ran torch.zeros(1, 8, 1, 1) while tracing: a constant, sliced
        assert frontend == "fx" and how.startswith(("zeros", "ones", "full"))
        consts = [getattr(small, n.target) for n in small.graph.nodes if n.op == "get_attr"]
        assert any(tuple(c.shape).count(3) for c in consts)
        return
    (factory,) = factories
    ints: list = []
    torch.fx.node.map_aggregate((factory.args, factory.kwargs),
                                lambda v: ints.append(v) if type(v) is int else None)
    assert 3 in ints and 8 not in ints  # the literal channel size is the kept count


class FactoryMeetsNothing(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) + torch.ones(16).sum()  # summed away: no channel to follow


def test_uniform_factory_that_joins_no_parameter_is_no_group():
    a = fxprune.analyze(FactoryMeetsNothing().eval(), torch.randn(1, 3, 2, 2))
    assert all(any(m.fqn.startswith("conv.") for m in g.members) for g in a.groups)


class ComputedSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return y + y.new_zeros(y.shape[0], y.shape[1], 1, 1)


def test_uniform_factory_with_a_computed_size_stays_untracked():
    """A size computed at run time is not a literal to rewrite: fail closed (pinned)."""
    a = fxprune.analyze(ComputedSize().eval(), torch.randn(1, 3, 2, 2), frontend="fx")
    assert a.groups == ()


# ----------------------------------------------------------------------------------
# fix_sizes / fix_unflatten: a size merging the batch with a pruned dim stays symbolic
class BatchTimesChannels(nn.Module):
    """Per-channel normalisation written as ``reshape(n * c, -1)``: channel merged with batch."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        n, c, h, w = y.shape
        z = y.reshape(n * c, -1)
        z = z - z.mean(1, keepdim=True)
        return self.c2(z.reshape(n, c, h, w))


class ViewBatchTimesChannels(nn.Module):
    """``view(n * c, h * w)``, a reduction, then ``unflatten`` back to ``(n, c)``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        n, c, h, w = y.shape
        z = y.view(n * c, h * w).amax(1, keepdim=True).unflatten(0, (n, c))
        return self.fc(z.flatten(1))


class BatchTimesHeads(nn.Module):
    """Attention as ``reshape(B * H, N, d)`` (F.multi_head_attention_forward's layout), the
    head count read off the projection (``q.shape[-1] // d``) so that heads are prunable."""

    def __init__(self, C: int = 32, d: int = 8) -> None:
        super().__init__()
        self.d, self.qkv, self.proj = d, nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        H = q.shape[-1] // self.d
        q, k, v = (t.reshape(B, N, H, self.d).transpose(1, 2).reshape(B * H, N, self.d)
                   for t in (q, k, v))
        a = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * self.d ** -0.5, -1)
        y = torch.bmm(a, v).reshape(B, H, N, self.d).transpose(1, 2)
        return self.proj(y.reshape(B, N, H * self.d))


def _batch_consistent(model, x, frontend, **analyze):
    """Compile half the units away at the batch of ``x``; then every sample run alone must
    give what it gives in a batch of another size (eval mode: samples are independent)."""
    torch.manual_seed(0)
    analysis = fxprune.analyze(model, (x,), frontend=frontend, **analyze)
    plan = fxprune.plan(analysis, "l1", ratio=0.5, include_softmax=True)
    assert plan.keep, "nothing pruned: the test would prove nothing"
    small = fxprune.compile(model, plan)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    x2 = torch.randn((x.shape[0] + 1,) + tuple(x.shape[1:]))
    with torch.no_grad():
        torch.testing.assert_close(small(x2)[1:], small(x2[1:]))
    assert fxprune.verify(model, small, plan, (x,)).ok


# export specialises a batch of 1, so its example has a batch of 2 (dynamic)
@pytest.mark.parametrize("frontend,batch", [("fx", 1), ("export", 2)])
@pytest.mark.parametrize("make", [BatchTimesChannels, ViewBatchTimesChannels])
def test_batch_times_channel_size_keeps_the_batch(make, frontend, batch):
    _batch_consistent(make().eval(), torch.randn(batch, 3, 8, 8), frontend)


@pytest.mark.parametrize("frontend,batch", [("fx", 1), ("export", 2)])
def test_batch_times_heads_size_keeps_the_batch(frontend, batch):
    _batch_consistent(BatchTimesHeads().eval(), torch.randn(batch, 5, 32), frontend,
                      split_policy="heads")


class BatchTimesHeadsLiteral(nn.Module):
    """``reshape(B * self.H, N, d)`` with a literal head count (trial19)."""

    def __init__(self, C: int = 32, H: int = 4) -> None:
        super().__init__()
        self.H, self.qkv, self.proj = H, nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x):
        B, N, C = x.shape
        d = C // self.H
        q, k, v = (t.reshape(B, N, self.H, d).transpose(1, 2).reshape(B * self.H, N, d)
                   for t in self.qkv(x).chunk(3, dim=-1))
        a = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * d ** -0.5, -1)
        return self.proj(torch.bmm(a, v).reshape(B, self.H, N, d).transpose(1, 2).reshape(B, N, C))


def test_batch_times_literal_heads_is_held_whole_or_keeps_the_batch():
    """The count ties hold this group whole today (``B * 4`` reads the batch); whatever the
    plan, the compiled graph must not bake the example batch."""
    torch.manual_seed(0)
    model, x = BatchTimesHeadsLiteral().eval(), torch.randn(1, 5, 32)
    analysis = fxprune.analyze(model, (x,), split_policy="heads")
    small = fxprune.compile(model, fxprune.plan(analysis, "l1", ratio=0.5, include_softmax=True))
    x2 = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x2)[1:], small(x2[1:]))


class FloorDivBatchTimesChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        n, c, h, w = y.shape
        z = y.reshape(n * c // 1, h * w)
        return self.c2((z - z.mean(1, keepdim=True)).reshape(n, c, h, w))


def test_batch_size_that_is_not_a_product_is_refused_with_its_line():
    """``n * c // 1`` is not a product fxprune can rescale: a typed refusal naming the
    line, never a literal right at the example batch only."""
    from fxprune.core.errors import RewriteError

    model, x = FloorDivBatchTimesChannels().eval(), torch.randn(1, 3, 8, 8)
    analysis = fxprune.analyze(model, (x,))
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="l1")
    line = r"(?s)cannot rescale.*test_shape.py\", line \d+, in forward"
    with pytest.raises(RewriteError, match=line):
        fxprune.compile(model, plan)
