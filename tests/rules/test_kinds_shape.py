"""Issue 8 kinds, shape family: a feature vector reshaped into channels (item 5) and
concatenation with untracked pieces (item 6)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune


class Decoder(nn.Module):
    """DCGAN / VAE decoder head: Linear -> (B, C, H, W) -> conv-like layer."""

    def __init__(self, form: str, consumer: str) -> None:
        super().__init__()
        self.form = form
        self.fc = nn.Linear(4, 3 * 2 * 2)
        self.bn = nn.BatchNorm2d(3) if consumer == "bn_conv" else nn.Identity()
        self.conv = (nn.ConvTranspose2d(3, 2, 2, stride=2) if consumer == "deconv"
                     else nn.Conv2d(3, 2, 1))

    def forward(self, z):
        h = torch.relu(self.fc(z))
        h = {"view": lambda: h.view(-1, 3, 2, 2),
             "reshape": lambda: h.reshape(z.shape[0], 3, 2, 2),
             "unflatten": lambda: h.unflatten(1, (3, 2, 2)),
             "nn_unflatten": lambda: nn.functional.dropout(h, 0.0).view(-1, 3, 2, 2)}[self.form]()
        return self.conv(self.bn(h))


@pytest.mark.parametrize("form", ["view", "reshape", "unflatten", "nn_unflatten"])
@pytest.mark.parametrize("consumer", ["conv", "bn_conv", "deconv"])
def test_linear_rows_split_into_channel_blocks(check_pruned, form, consumer):
    model = Decoder(form, consumer).eval()
    z = torch.randn(2, 4)
    analysis = fxprune.analyze(model, (z,))
    (group,) = [g for g in analysis.groups if any(m.fqn == "fc.weight" for m in g.members)]
    assert group.size == 3 and group.granularity == 4  # blocks of H*W rows
    small = check_pruned(model, z, fxprune.Plan.from_indices(
        analysis, {group.id: [1]}, remove=True)).small
    assert small.fc.out_features == 8


class HeadSplit(nn.Module):
    """A head split (B, N, H*d) -> (B, N, H, d) without a conv keeps its old policy."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.q(x).view(2, 3, 2, 4).relu()
        return self.o(h.reshape(2, 3, 8))


def test_head_split_without_conv_is_unchanged():
    analysis = fxprune.analyze(HeadSplit().eval(), (torch.randn(2, 3, 4),))
    (group,) = analysis.groups
    assert group.size == 4  # inner policy: head_dim units, coupled across heads


# ----------------------------------------------------------------------------------
# item 6: cat with untracked pieces (CoordConv)
# ----------------------------------------------------------------------------------
class CoordConv(nn.Module):
    def __init__(self, coords: str) -> None:
        super().__init__()
        self.coords = coords
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(6, 2, 1)
        self.register_buffer("grid", torch.randn(2, 2, 5, 5))

    def forward(self, x, c=None):
        h = self.a(x)
        n, _, H, W = h.shape
        if self.coords == "forward":
            yy = torch.linspace(-1, 1, H).view(1, 1, H, 1).expand(n, 1, H, W)
            xx = torch.linspace(-1, 1, W).view(1, 1, 1, W).expand(n, 1, H, W)
            return self.b(torch.cat([h, yy, xx], 1))
        if self.coords == "input":
            return self.b(torch.cat([c, h], dim=1))
        return self.b(torch.cat((self.grid, h), 1))  # a buffer (batch 2)


@pytest.mark.parametrize("coords", ["forward", "input", "buffer"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_cat_with_untracked_piece_prunes_the_tracked_one(check_pruned, coords, frontend):
    model = CoordConv(coords).eval()
    inputs = (torch.randn(2, 3, 5, 5),) + ((torch.randn(2, 2, 5, 5),) if coords == "input"
                                          else ())
    analysis = fxprune.analyze(model, inputs, frontend=frontend)
    (group,) = [g for g in analysis.groups if any(m.fqn == "a.weight" for m in g.members)]
    # a constant buffer is a dependent whose channels may go too; coords made in forward
    # or passed in keep their columns
    assert group.size == (6 if coords == "buffer" else 4)
    small = check_pruned(model, inputs, fxprune.Plan.from_indices(
        analysis, {group.id: [0, 2]}, remove=True)).small
    assert small.get_parameter("b.weight").shape[1] == 4
