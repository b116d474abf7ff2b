"""Issue 8 item 10: the fx tracer handles chunk iteration, sliced Sequentials and buffers
sliced by a traced size; the export fallback is announced and keeps batch (and sequence)
dims dynamic."""
import warnings

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.capture import FallbackWarning


class ChunkList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.cat(list(self.a(x).chunk(2, 1)), 1))


class SplitLoop(nn.Module):
    """Iterating ``split`` with explicit sizes (and ``torch.chunk``) in a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        parts = [torch.relu(p) for p in self.a(x).split([2, 6], 1)]
        parts = [q for p in torch.chunk(torch.cat(parts, 1), 2, dim=1) for q in [p]]
        return self.b(torch.cat(parts, 1))


class SlicedSequential(nn.Module):
    """FPN idiom: the first layer, then the rest, of one Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.f[1:](self.f[:1](x))


class PositionTable(nn.Module):
    """The classic position-encoding table, sliced by the sequence length."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("pe", torch.randn(1, 16, 8))

    def forward(self, x):
        return self.out(torch.relu(self.fc(x) + self.pe[:, :x.size(1)]))


class ShapeBranch(nn.Module):
    """Python control flow on a shape: fx cannot trace it, export can."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        if x.shape[-1] > 2:
            y = torch.relu(y)
        return self.b(y)


class TokenBranch(nn.Module):
    """Shape control flow on token inputs (B, N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("pe", torch.randn(1, 16, 8))

    def forward(self, x):
        y = self.fc(x)
        if x.shape[-1] == 6:
            y = y + self.pe[:, :x.size(1)]
        return self.out(torch.relu(y))


IMG, TOK = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 6)


@pytest.mark.parametrize("cls,x,groups", [(ChunkList, IMG, 1), (SplitLoop, IMG, 1),
                                          (SlicedSequential, IMG, 1), (PositionTable, TOK, 1)])
def test_fx_traces_without_fallback(cls, x, groups):
    model = cls().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        an = fxprune.analyze(model, (x,))
    assert an.gm.meta["fxprune"]["frontend"] == "fx"
    assert len(an.groups) == groups
    plan = fxprune.Plan.from_ratio(an, 0.5, criterion="random")
    small = fxprune.compile(model, plan)
    assert fxprune.verify(model, small, plan, (x,)).ok
    one = x[:1]
    assert small(one).shape == model(one).shape  # fx graphs never fixed the batch


def test_position_table_buffer_follows_the_channels():
    an = fxprune.analyze(PositionTable(), (TOK,))
    g = an.group("fc.weight[0]")
    assert ("pe", 2) in {(m.fqn, m.dim) for m in g.members}


def test_chunk_that_yields_fewer_pieces_falls_back():
    class Short(nn.Module):  # 5 channels in 4 chunks: 3 pieces of 2, 2, 1
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 5, 1), nn.Conv2d(5, 4, 1)

        def forward(self, x):
            return self.b(torch.cat(list(self.a(x).chunk(4, 1)), 1))

    with pytest.warns(FallbackWarning):
        an = fxprune.analyze(Short(), (IMG,))
    assert an.gm.meta["fxprune"]["frontend"] == "export"


@pytest.mark.parametrize("cls,x,other", [
    (ShapeBranch, IMG, [torch.randn(1, 3, 4, 4), torch.randn(3, 3, 4, 4)]),
    (TokenBranch, TOK, [torch.randn(1, 5, 6), torch.randn(3, 7, 6)]),
])
def test_fallback_is_announced_and_keeps_batch_and_sequence_dynamic(cls, x, other):
    model = cls().eval()
    with pytest.warns(FallbackWarning, match="symbolic tracing failed.*control flow") as rec:
        an = fxprune.analyze(model, (x,))
    assert rec[0].filename == __file__  # points at the user's call
    assert an.gm.meta["fxprune"]["frontend"] == "export"
    assert "control flow" in an.gm.meta["fxprune"]["fallback_reason"]
    plan = fxprune.Plan.from_ratio(an, 0.5, criterion="random")
    small = fxprune.compile(an, plan)
    assert fxprune.verify(an, small, plan, (x,)).ok
    for y in other:  # batch 1 and 3 (and another sequence length for tokens)
        assert small(y).shape == model(y).shape


def test_explicit_export_is_silent_and_dynamic():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        an = fxprune.analyze(ChunkList(), (IMG,), frontend="export")
    plan = fxprune.Plan.from_ratio(an, 0.5)
    small = fxprune.compile(an, plan)
    assert small(IMG[:1]).shape == (1, 4, 4, 4)
