"""Issue 8 item 7: rules for common ops that were barriers (glu, narrow, channel shuffle,
index_select with a constant index, repeat_interleave / tile, einsum with ``...``) and
the pin reason of a computed integer index."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


def _remove_one(analysis):
    return fxprune.Plan.from_indices(analysis, {g.id: [1] for g in analysis.groups
                                                if g.size > 1}, remove=True)


def _group_of(analysis, fqn):
    (group,) = [g for g in analysis.groups if any(m.fqn == fqn for m in g.members)]
    return group


class Between(nn.Module):
    """a -> op -> b, with a and b convs (or linears for token layouts)."""

    def __init__(self, op, c_in=8, c_out=4, linear=False) -> None:
        super().__init__()
        self.op = op
        layer = nn.Linear if linear else nn.Conv2d
        self.a = layer(3, c_in) if linear else layer(3, c_in, 1)
        self.b = layer(c_out, 2) if linear else layer(c_out, 2, 1)
        self.register_buffer("perm", torch.tensor([5, 2, 7, 0, 1, 3, 6, 4]))
        self.register_buffer("pick", torch.tensor([6, 1, 3, 4]))
        self.glu = nn.GLU(dim=1)
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x):
        return self.b(self.op(self, self.a(x)))


CASES = {
    # name: (op, c_in, c_out, linear)
    "F.glu": (lambda m, y: F.glu(y, dim=1), 8, 4, False),
    "nn.GLU": (lambda m, y: m.glu(y), 8, 4, False),
    "glu_last": (lambda m, y: F.glu(y, -1), 8, 4, True),
    "narrow_method": (lambda m, y: y.narrow(1, 2, 4), 8, 4, False),
    "torch.narrow": (lambda m, y: torch.narrow(y, -1, 1, 4), 8, 4, True),
    "nn.ChannelShuffle": (lambda m, y: m.shuffle(y), 8, 8, False),
    "torch.channel_shuffle": (lambda m, y: torch.channel_shuffle(y, 4), 8, 8, False),
    "index_select_perm": (lambda m, y: y.index_select(1, m.perm), 8, 8, False),
    "index_select_pick": (lambda m, y: torch.index_select(y, -1, m.pick), 8, 4, True),
    "repeat_interleave": (lambda m, y: y.repeat_interleave(2, dim=1), 4, 8, False),
    "tile": (lambda m, y: torch.tile(y, (1, 2, 1, 1)), 4, 8, False),
    "pixel_shuffle": (lambda m, y: F.pixel_shuffle(y, 2), 8, 2, False),
    "nn.PixelShuffle": (lambda m, y: nn.PixelShuffle(2)(y), 8, 2, False),
    "pixel_unshuffle": (lambda m, y: F.pixel_unshuffle(F.interpolate(y, size=(6, 6)), 2),
                        4, 16, False),
    "flip_channels": (lambda m, y: y.flip(1), 8, 8, False),
    "flip_spatial": (lambda m, y: torch.flip(y, dims=(2, 3)), 8, 8, False),
    "cumsum_spatial": (lambda m, y: y.cumsum(dim=-1), 8, 8, False),
    "rrelu": (lambda m, y: F.rrelu(y, training=False), 8, 8, False),
    "reflection_pad3d": (lambda m, y: F.pad(y.unsqueeze(2), (1, 1, 1, 1, 0, 0),
                                            mode="reflect").squeeze(2), 8, 8, False),
    "circular_pad": (lambda m, y: F.pad(y, (1, 1, 1, 1), mode="circular"), 8, 8, False),
    "einsum_ellipsis": (lambda m, y: torch.einsum("...c,...c->...c", y, y.sigmoid()),
                        8, 8, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_op_is_no_barrier(check_pruned, name):
    op, c_in, c_out, linear = CASES[name]
    model = Between(op, c_in, c_out, linear).eval()
    x = torch.randn(2, 5, 3) if linear else torch.randn(2, 3, 5, 5)
    analysis = fxprune.analyze(model, (x,))
    group = _group_of(analysis, "a.weight")
    assert group.size > 1 and group.exact
    assert any(m.fqn == "b.weight" for m in group.members)
    check_pruned(model, x, _remove_one(analysis))
    check_pruned(model, x, fxprune.Plan.from_ratio(analysis, 0.5, criterion="random", seed=3))


class ComputedIndex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(5, 2)

    def forward(self, x):
        y = self.a(x)  # (B, N, 6)
        return self.b(y[:, y.size(1) - 1, 1:])  # a computed token index, then channels


def test_computed_integer_index_keeps_other_dims_and_says_why():
    analysis = fxprune.analyze(ComputedIndex().eval(), (torch.randn(2, 4, 3),))
    reasons = " ".join(r for rs in analysis.pin_reasons.values() for r in rs)
    assert "advanced indexing" not in reasons
    group = _group_of(analysis, "a.weight")  # the channel dim is not the indexed one
    assert group.size == 6


class ComputedChannelIndex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Linear(5, 2)

    def forward(self, x):
        y = self.a(x)
        return self.b(y[:, y.size(1) - 1])


def test_computed_index_into_channels_is_pinned_with_its_reason():
    analysis = fxprune.analyze(ComputedChannelIndex().eval(), (torch.randn(2, 3, 5, 5),))
    reasons = [r for rs in analysis.pin_reasons.values() for r in rs]
    assert any("computed integer index into a channel dim" in r for r in reasons), reasons
