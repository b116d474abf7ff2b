"""Equal chunk / split(int) pieces (ShuffleNetV2, CSPNet): default plans keep the same
count in every piece, so compile(output="module") follows the forward's chunk/split
(fxprune/core/ties.py; the analysis records ``split_ties``)."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.core.errors import LiteralSizeError
from fxprune.core.ties import broken_ties


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class _Branch(nn.Sequential):
    def __init__(self, c: int) -> None:
        super().__init__(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                         nn.BatchNorm2d(c), nn.Conv2d(c, c, 1, bias=False),
                         nn.BatchNorm2d(c), nn.ReLU())


class TinyShuffle(nn.Module):
    """Two ShuffleNetV2 stride-1 blocks: chunk(2), one branch, cat, channel shuffle."""

    def __init__(self, c: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList(_Branch(c // 2) for _ in range(blocks))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.blocks:
            x1, x2 = x.chunk(2, dim=1)
            x = _shuffle(torch.cat((x1, branch(x2)), dim=1), 2)
        return self.head(x.mean((2, 3)))


class TinyCSP(nn.Module):
    """A CSPNet cross stage: split(self.expand_chs // 2), a residual block on one half."""

    def __init__(self, c: int = 24) -> None:
        super().__init__()
        self.expand_chs = 2 * c
        self.conv_exp = nn.Sequential(nn.Conv2d(3, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.conv_b = nn.Conv2d(c, c, 1)
        self.conv_t = nn.Conv2d(2 * c, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        xs, xb = self.conv_exp(x).split(self.expand_chs // 2, dim=1)
        xb = self.conv_b(xb + self.block(xb))
        return self.head(self.conv_t(torch.cat([xs, xb], dim=1)).mean((2, 3)))


def _default_plans(analysis):
    yield fxprune.Plan.from_ratio(analysis, 0.4, criterion="random", seed=1)
    yield fxprune.plan(analysis, "l1", ratio=0.4)
    yield fxprune.plan(analysis, "l1", target_macs=0.6, scope="global")


@pytest.mark.filterwarnings("ignore:macs target")  # coarse atoms on tiny models
@pytest.mark.parametrize("make", [TinyShuffle, TinyCSP])
def test_default_plans_keep_equal_pieces_and_the_module_follows(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 8, 8)
    analysis = fxprune.analyze(model, (x,))
    assert analysis.split_ties and all(len(t.pieces) == 2 for t in analysis.split_ties)
    assert "forward" in analysis.split_ties[0].source  # the user's line, for errors
    assert f"{analysis.split_ties[0].groups[0]}: {analysis.split_ties[0].node}" in \
        analysis.table()  # announced in the analysis table too
    pruned_any = False
    for plan in _default_plans(analysis):
        assert plan.meta["split_ties"], plan.meta  # announced, never silent
        gm = fxprune.compile(model, plan)
        assert fxprune.verify(model, gm, plan, (torch.randn(3, 3, 8, 8),)).ok
        small = fxprune.compile(model, plan, output="module")  # proven == gm in float64
        assert type(small) is type(model)
        pruned_any |= sum(p.numel() for p in small.parameters()) < \
            sum(p.numel() for p in model.parameters())
        small.train()
        small(torch.randn(4, 3, 8, 8)).sum().backward()
    assert pruned_any
    if make is TinyCSP:
        width = small.conv_exp[0].out_channels
        assert small.expand_chs == width and width % 2 == 0


def test_atoms_pair_units_across_shuffle_halves_and_nested_chunks():
    """Two nested chunks on 32 channels: atoms of 4 units (1 + 1 from the inner pieces,
    2 from the outer second piece), and every whole-atom removal keeps the pieces equal."""
    torch.manual_seed(0)
    analysis = fxprune.analyze(TinyShuffle().eval(), (torch.randn(2, 3, 8, 8),))
    from fxprune.core.ties import tied_orders

    g = analysis.group(analysis.split_ties[0].groups[0])
    scores = {g.name: np.random.default_rng(0).random(g.size)}
    orders, held = tied_orders(analysis, scores)
    assert not held and set(np.diff(orders[g.name].cuts)) == {4}
    labels = np.flatnonzero(analysis.group_of == g.id)
    for cut in orders[g.name].cuts[:-1]:
        kept = np.ones(analysis.num_units, dtype=bool)
        kept[labels[orders[g.name].order[:cut]]] = False
        assert not broken_ties(analysis, kept)
    kept = np.ones(analysis.num_units, dtype=bool)
    kept[labels[orders[g.name].order[:1]]] = False  # one unit: not a whole atom
    assert broken_ties(analysis, kept)


def test_hand_made_plan_with_unequal_pieces_is_refused_naming_the_line():
    torch.manual_seed(0)
    model = TinyCSP().eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 3, 8, 8),))
    g = analysis.group(analysis.split_ties[0].groups[0])
    keep = [i for i in range(g.size) if i != 0]  # one unit of the first piece only
    plan = fxprune.Plan.from_indices(analysis, {g.name: keep})
    assert broken_ties(analysis, plan_kept(analysis, plan))
    with pytest.raises(LiteralSizeError, match=r"test_module_chunks.py.*split"):
        fxprune.compile(model, plan, output="module")


def plan_kept(analysis, plan) -> np.ndarray:
    kept = np.ones(analysis.num_units, dtype=bool)
    for name, idx in plan.keep.items():
        g = analysis.group(name)
        labels = np.flatnonzero(analysis.group_of == g.id)
        kept[labels] = False
        kept[labels[list(idx)]] = True
    return kept


@functools.lru_cache(maxsize=1)
def _shufflenet_x0_5():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.shufflenet_v2_x0_5(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    return model, x, fxprune.analyze(model, (x,))


def test_torchvision_shufflenet_v2_x0_5_module_output():
    model, x, analysis = _shufflenet_x0_5()
    plan = fxprune.Plan.from_ratio(analysis, 0.3, criterion="random", seed=0)
    small = fxprune.compile(model, plan, output="module")
    assert type(small) is type(model) and "split_ties" in plan.meta
    assert small.stage2[1].branch2[0].in_channels < 24  # the chunked half shrank
    small.train()
    small(torch.randn(3, 3, 32, 32)).sum().backward()


@pytest.mark.parametrize("c", [12, 20])
def test_units_cut_by_a_chunk_join_a_balanced_core(c):
    """c/2 halved three times is no integer: a shuffled unit spans both pieces of the
    deepest chunk unevenly; it joins a core atom balanced by other units (not the whole
    group), and the module still follows (proven in float64)."""
    torch.manual_seed(0)
    model = TinyShuffle(c, blocks=3).eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 3, 8, 8),))
    plan = fxprune.Plan.from_ratio(analysis, 0.4, criterion="random", seed=1)
    assert not plan.meta["split_ties_whole"] and set(plan.meta["split_ties"]) <= set(plan.keep)
    gm = fxprune.compile(model, plan)
    assert fxprune.verify(model, gm, plan, (torch.randn(3, 3, 8, 8),)).ok
    small = fxprune.compile(model, plan, output="module")
    assert small.stem[0].out_channels < c


class TwoGroupChunk(nn.Module):
    """chunk(2) of a cat of two convs: each piece holds another group's units."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.head_a, self.head_b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        left, right = torch.cat([self.a(x), self.b(x)], dim=1).chunk(2, dim=1)
        return self.head_a(left) + self.head_b(right.relu())


def test_pieces_of_two_groups_are_announced_untied():
    torch.manual_seed(0)
    model = TwoGroupChunk().eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 3, 4, 4),))
    (tie,) = analysis.split_ties
    assert len(tie.groups) == 2 and "(untied): chunk" in analysis.table()
    plan = fxprune.plan(analysis, "l1", ratio=0.5)
    assert tie.node in plan.meta["split_ties_untied"] and not broken_ties(analysis, np.zeros(
        analysis.num_units, dtype=bool))  # untied ties are not checked
    gm = fxprune.compile(model, plan)
    assert fxprune.verify(model, gm, plan, (torch.randn(3, 3, 4, 4),)).ok


def test_split_ties_off_prunes_what_the_ties_hold_whole_for_the_graph_only():
    model, x, analysis = _shufflenet_x0_5()
    tied = fxprune.plan(analysis, "l1", ratio=0.3)
    assert tied.meta["split_ties_whole"]  # stage3's nested chunks tie every unit
    free = fxprune.plan(analysis, "l1", ratio=0.3, split_ties=False)
    assert free.meta["split_ties"] == "off"
    whole = set(tied.meta["split_ties_whole"])
    assert any(len(free.keep[n]) < free.sizes[n] for n in whole)  # now pruned
    assert fxprune.verify(model, fxprune.compile(model, free), free, (x,)).ok
    with pytest.raises(LiteralSizeError, match=r"chunk.*shufflenetv2.py, line \d+.*"
                       r"split_ties=True, the default"):  # names the line and the remedy
        fxprune.compile(model, free, output="module")
    loose = fxprune.Plan.from_ratio(analysis, 0.3, split_ties=False)
    assert loose.meta["split_ties"] == "off" and any(n in loose.keep for n in whole)
