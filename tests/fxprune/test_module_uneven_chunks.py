"""chunk(n) / split(int) of a width that is not a multiple: the last piece is shorter
(timm EdgeNeXt's ``x.chunk(len(self.convs) + 1, dim=1)`` of 88 channels: 30 / 30 / 28).
Default plans keep what chunk / split cuts from the kept width (every piece loses as
many, or the longer pieces' excess goes as one atom), so compile(output="module")
follows (fxprune/core/ties.py ``_set_excess_apart``); a hand-made plan that breaks it is
refused naming the line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.core.errors import LiteralSizeError
from fxprune.core.ties import broken_ties, chunk_sizes, tied_orders


class TinySplitTranspose(nn.Module):
    """EdgeNeXt's SplitTransposeBlock scales: chunk(3) of 22 (8 / 8 / 6), a depthwise conv
    on the first piece, added to the second before the next conv (pieces 0 and 1 hold
    the same units), the last piece passed on, a residual add."""

    def __init__(self, c: int = 22, scales: int = 3) -> None:
        super().__init__()
        width = -(-c // scales)
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c))
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, groups=width)
                                   for _ in range(scales - 1))
        self.pw = nn.Conv2d(c, c, 1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        spx = x.chunk(len(self.convs) + 1, dim=1)
        spo, sp = [], spx[0]
        for i, conv in enumerate(self.convs):
            if i > 0:
                sp = sp + spx[i]
            sp = conv(sp)
            spo.append(sp)
        spo.append(spx[-1])
        x = x + self.pw(torch.cat(spo, 1)).relu()
        return self.head(x.mean((2, 3)))


class TinyWidthSplit(nn.Module):
    """Res2Net-like ``x.split(self.split_size, 1)`` of 22 channels (8 / 8 / 6), each piece
    its own conv: the int attribute follows the kept first piece."""

    def __init__(self, c: int = 22, width: int = 8) -> None:
        super().__init__()
        self.split_size = width
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU())
        sizes = chunk_sizes(c, step=width)
        self.convs = nn.ModuleList(nn.Conv2d(s, 4, 1) for s in sizes)

    def forward(self, x):
        parts = self.stem(x).split(self.split_size, 1)
        return sum(conv(parts[i]) for i, conv in enumerate(self.convs)).mean((2, 3))


def _plans(analysis):
    yield fxprune.Plan.from_ratio(analysis, 0.3, criterion="random", seed=0)
    yield fxprune.Plan.from_ratio(analysis, 0.5, criterion="random", seed=3)
    yield fxprune.plan(analysis, "l1", ratio=0.4)
    yield fxprune.plan(analysis, "l2", target_macs=0.6, scope="global")


@pytest.mark.filterwarnings("ignore:macs target")  # coarse atoms on tiny models
@pytest.mark.parametrize("make", [TinySplitTranspose, TinyWidthSplit])
def test_default_plans_keep_what_the_chunk_cuts_and_the_module_follows(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 8, 8)
    analysis = fxprune.analyze(model, (x,))
    (tie,) = analysis.split_ties  # recorded although the pieces are 8 / 8 / 6
    assert tie.shortfall == 2 and "the last 2 shorter" in tie.describe()
    assert tie.chunks == (3 if make is TinySplitTranspose else 0)
    shrunk = False
    for plan in _plans(analysis):
        assert plan.meta["split_ties"] and not plan.meta["split_ties_whole"], plan.meta
        assert "the last piece keeps 2 fewer" in plan.meta["split_ties"][tie.groups[0]]
        gm = fxprune.compile(model, plan)
        assert fxprune.verify(model, gm, plan, (torch.randn(3, 3, 8, 8),)).ok
        small = fxprune.compile(model, plan, output="module")  # proven == gm in float64
        assert type(small) is type(model)
        x2 = torch.randn(4, 3, 8, 8, dtype=torch.float64)
        want = gm.double()(x2)
        torch.testing.assert_close(small.double()(x2), want, rtol=0, atol=1e-10)
        small.float().train()
        small(torch.randn(4, 3, 8, 8)).sum().backward()
        width = small.stem[0].out_channels
        shrunk |= width < 22
        if make is TinyWidthSplit:  # the attribute followed the first piece
            assert [c.in_channels for c in small.convs] == chunk_sizes(width, step=small.split_size)
    assert shrunk


def test_every_whole_atom_removal_keeps_the_cut_and_the_excess_goes_once():
    """Atoms pair a unit of pieces 0+1 (one unit, added) with one of piece 2, and one
    atom holds the 2 units the longer pieces have more; no cut leaves piece 2 empty."""
    torch.manual_seed(0)
    analysis = fxprune.analyze(TinySplitTranspose().eval(), (torch.randn(2, 3, 8, 8),))
    g = analysis.group(analysis.split_ties[0].groups[0])
    order, held = tied_orders(analysis, {g.name: np.random.default_rng(0).random(g.size)})
    t = order[g.name]
    assert not held and sorted(np.bincount(t.atom)[np.unique(t.atom)].tolist()) == [2] * 7
    labels = np.flatnonzero(analysis.group_of == g.id)
    for cut in t.cuts[:-1]:
        kept = np.ones(analysis.num_units, dtype=bool)
        kept[labels[t.order[:cut]]] = False
        assert not broken_ties(analysis, kept), cut
    kept = np.ones(analysis.num_units, dtype=bool)
    piece2 = analysis.local_of[analysis.split_ties[0].pieces[2]]
    kept[labels[piece2[:1]]] = False  # one unit of the short piece only: 8 / 8 / 5
    assert broken_ties(analysis, kept)


def test_hand_made_plan_breaking_the_uneven_cut_is_refused_naming_the_line():
    torch.manual_seed(0)
    model = TinySplitTranspose().eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 3, 8, 8),))
    tie = analysis.split_ties[0]
    g = analysis.group(tie.groups[0])
    drop = set(analysis.local_of[tie.pieces[2][:3]].tolist())  # 8 / 8 / 3: chunk cuts 7/7/5
    plan = fxprune.Plan.from_indices(analysis, {g.name: [i for i in range(g.size)
                                                         if i not in drop]})
    assert fxprune.verify(model, fxprune.compile(model, plan), plan,
                          (torch.randn(2, 3, 8, 8),)).ok  # the GraphModule takes any plan
    with pytest.raises(LiteralSizeError, match=r"chunk\(3\) of 19.*\[7, 7, 5\].*"
                                               r"test_module_uneven_chunks.py"):
        fxprune.compile(model, plan, output="module")


def test_split_int_attribute_follows_a_plan_that_keeps_the_shorter_last_piece():
    """One unit of every piece removed (7 / 7 / 5): ``self.split_size`` becomes 7 (no
    width-named guess: the split's own int), the module proven equal in float64."""
    torch.manual_seed(0)
    model = TinyWidthSplit().eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 3, 8, 8),))
    tie = analysis.split_ties[0]
    g = analysis.group(tie.groups[0])
    drop = {int(analysis.local_of[p[0]]) for p in tie.pieces}
    plan = fxprune.Plan.from_indices(analysis, {g.name: [i for i in range(g.size)
                                                         if i not in drop]})
    small = fxprune.compile(model, plan, output="module")
    assert small.split_size == 7 and [c.in_channels for c in small.convs] == [7, 7, 5]


class PinnedShortfall(nn.Module):
    """chunk(3) of 22 = [2 input channels + a, 2 input channels + b, c] (a, b, c added, so
    one unit holds one index of every piece): the last piece is shorter by never-pruned
    indices only, so every balanced removal keeps the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(3, 6, 1) for _ in range(3))
        self.heads = nn.ModuleList(nn.Conv2d(s, 4, 1) for s in (8, 8, 6))
        self.head_s = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        a, b, c = self.a(x), self.b(x), self.c(x)
        parts = torch.cat([x[:, :2], a, x[:, :2], b, c], 1).chunk(3, dim=1)
        return sum(h(parts[i]) for i, h in enumerate(self.heads)) + self.head_s(a + b + c)


def test_a_last_piece_short_by_never_pruned_indices_balances_the_rest():
    torch.manual_seed(0)
    model = PinnedShortfall().eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 3, 4, 4),))
    (tie,) = analysis.split_ties
    assert tie.shortfall == 2 and [int((lab < 0).sum()) for lab in tie.pieces] == [2, 2, 0]
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="random", seed=0)
    assert "the last piece keeps 2 fewer" in plan.meta["split_ties"][tie.groups[0]]
    small = fxprune.compile(model, plan, output="module")
    assert [h.in_channels for h in small.heads] == [5, 5, 3]
