"""slice_weights refuses to leave a called module with a stale size attribute."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from passes.rules.registry import MODULE_FIXUPS, RuleContext, module_fixup, rule


class Scale(nn.Module):
    """A per-channel scale whose forward reads its width from an attribute."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.gain = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        return x * self.gain.view(1, self.width)


@rule(Scale)
def scale_rule(ctx: RuleContext) -> None:
    """out[c] = in[c] * gain[c]."""
    dims = ctx.dims(ctx.arg(0)) or {}
    ctx.link(dims.get(1), ctx.module_tensor("gain", 0, "dep"), "scale on untracked channels")
    ctx.set(dims)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.s, self.b = nn.Linear(4, 8), Scale(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.s(self.a(x)))


def test_a_module_left_with_a_stale_size_is_refused_with_its_name_and_remedies():
    x = torch.randn(3, 4)
    model = Net()
    analysis = fxprune.analyze(model, (x,), leaf_modules=(Scale,))
    plan = fxprune.Plan.from_ratio(analysis, 0.5)
    with pytest.raises(fxprune.RewriteError) as err:
        fxprune.compile(model, plan)
    text = str(err.value)
    assert "module 's' (Scale)" in text and "'width' = 8" in text
    assert "ignore=['s']" in text and "module_fixup(Scale)" in text
    # the remedy the message names works
    small = fxprune.compile(model, fxprune.Plan.from_ratio(analysis, 0.5, ignore=["s"]))
    assert small(x).shape == (3, 2)


def test_with_a_module_fixup_the_same_plan_compiles(check_pruned):
    x = torch.randn(3, 4)
    model = Net()

    @module_fixup(Scale)
    def fix_scale(m: Scale) -> None:
        m.width = m.gain.shape[0]

    try:
        analysis = fxprune.analyze(model, (x,), leaf_modules=(Scale,))
        pruned = check_pruned(model, (x,), fxprune.Plan.from_ratio(analysis, 0.5))
        assert pruned.small.s.width == 4
    finally:
        del MODULE_FIXUPS[Scale]
