"""Regressions found by the torchvision zoo (tests/zoo/test_torchvision.py), each on a
tiny module that reproduces the pattern."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's shufflenetv2.channel_shuffle."""
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleStage(nn.Module):
    """ShuffleNet v2 stage: x1 passes, x2 goes through a conv, cat, shuffle; repeated."""

    def __init__(self, c: int = 8, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.branches = nn.ModuleList(nn.Conv2d(c // 2, c // 2, 1) for _ in range(blocks))
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.branches:
            x1, x2 = x.chunk(2, dim=1)
            x = channel_shuffle(torch.cat((x1, branch(x2)), 1), 2)
        return self.head(x)


def _units(group, fqn, dim):
    (m,) = [m for m in group.members if m.fqn == fqn and m.dim == dim]
    return m.units


def test_shuffle_units_collapse_to_whole_layers():
    """Each shuffle unions position j of both halves, so a stage's late layers end up
    one unit wide: the last branch's rows and the head's columns are all unit 0."""
    a = fxprune.analyze(ShuffleStage().eval(), torch.randn(2, 3, 5, 5))
    (g,) = [g for g in a.groups if g.name == "stem.weight[0]"]
    assert g.size == 8
    assert _units(g, "branches.1.weight", 0).tolist() == [0, 0, 1, 1]
    assert set(_units(g, "branches.2.weight", 0).tolist()) == {0}
    assert set(_units(g, "branches.2.weight", 1).tolist()) == {1}
    assert set(_units(g, "head.weight", 1).tolist()) == {0}


@pytest.mark.parametrize("seed", range(12))
def test_random_ratio_plan_never_empties_a_layer(check_pruned, seed):
    """shufflenet_v2_x0_5: from_ratio(criterion="random") removed the unit that spans a
    whole conv, and the plan was refused (PlanError: removes every index of ...). The
    ratio plan now puts back the best-scored unit of any dim it would empty."""
    model = ShuffleStage().eval()
    x = torch.randn(2, 3, 5, 5)
    a = fxprune.analyze(model, x)
    # split_ties=False: the graph-only path this regression is about (the default ties the
    # nested chunks' units into one atom, and the group stays whole: announced)
    assert "stem.weight[0]" in fxprune.Plan.from_ratio(a, 0.4, criterion="random",
                                                       seed=seed).meta["split_ties_whole"]
    plan = fxprune.Plan.from_ratio(a, 0.4, criterion="random", seed=seed, split_ties=False)
    assert {g.name for g in a.groups if g.size >= 2} <= set(plan.keep)
    g = a.group("stem.weight[0]")
    assert 0 in plan.keep[g.name]  # unit 0 is the whole late stream
    assert len(plan.keep[g.name]) < g.size  # still a removal in the group
    small = check_pruned(model, x, plan).small
    assert small.get_submodule("branches.2").out_channels == 4
    assert small.head.in_channels == 8


def test_ratio_plan_keeps_best_scored_unit_of_an_emptied_dim():
    """The put-back unit is the best-scored one of the emptied dim: here the lowest-scored
    units 0 (the last branch's rows) and 1 (its input columns) each span a whole dim."""
    model = ShuffleStage().eval()
    x = torch.randn(2, 3, 5, 5)
    a = fxprune.analyze(model, x)
    g = a.group("stem.weight[0]")
    scores = np.arange(g.size, dtype=np.float64)  # units 0, 1, 2 score lowest

    def criterion(analysis, group):
        return scores if group.name == g.name else np.ones(group.size)

    plan = fxprune.Plan.from_ratio(a, 0.4, criterion=criterion, split_ties=False)
    assert plan.keep[g.name] == (0, 1, 3, 4, 5, 6, 7)


def test_explicit_plan_that_empties_a_layer_is_refused():
    """from_indices is taken literally: emptying a layer stays a typed PlanError."""
    a = fxprune.analyze(ShuffleStage().eval(), torch.randn(2, 3, 5, 5))
    with pytest.raises(fxprune.PlanError, match="every index"):
        fxprune.Plan.from_indices(a, {"stem.weight[0]": [0]}, remove=True)


def test_verify_frees_its_float64_copies():
    """vit_h_14 was OOM-killed in verify: each float64 copy of a GraphModule is a reference
    cycle (graph <-> owning module), and all of them stayed alive until the cyclic
    collector ran. verify now collects each one after its run, and takes the unpruned
    output shapes from a fake-tensor run instead of a fourth float64 copy."""
    import gc

    model = ShuffleStage().eval()
    x = torch.randn(2, 3, 5, 5)
    a = fxprune.analyze(model, x)
    plan = fxprune.Plan.from_ratio(a, 0.4, criterion="random", seed=0)
    small = fxprune.compile(model, plan)
    gc.collect()
    gc.disable()
    try:
        report = fxprune.verify(model, small, plan, x)
        alive = [m for m in gc.get_objects() if isinstance(m, torch.fx.GraphModule)
                 and any(p.dtype == torch.float64 for p in m.parameters())]
    finally:
        gc.enable()
    assert report.ok and report.output_shapes_equal
    assert not alive, f"{len(alive)} float64 copies outlive verify"


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def test_batch_norm_shape_fast_path_keeps_the_kernel_checks():
    """Shape propagation skips eval BatchNorm's fake-tensor decomposition (half of an
    EfficientNet's analysis time) but still rejects what the kernel would reject."""
    from fxprune.core.errors import ShapePropagationError
    from passes.shape_prop import propagate_shapes, tensor_shapes

    model = ConvBN().eval()
    gm = fxprune.trace(model, (torch.randn(2, 3, 5, 5),)).train()
    propagate_shapes(gm, (torch.randn(2, 3, 5, 5),))
    (bn,) = [n for n in gm.graph.nodes if n.target == "bn"]
    assert tensor_shapes(bn) == (2, 6, 5, 5)
    assert gm.training and gm.bn.training  # run in eval mode, flags restored
    gm.bn.running_var = torch.ones(5)  # a botched slice
    with pytest.raises(ShapePropagationError, match="running_var"):
        propagate_shapes(gm, (torch.randn(2, 3, 5, 5),))
    with pytest.raises(ShapePropagationError):
        propagate_shapes(gm, (torch.randn(3, 5, 5),))  # BatchNorm2d on a 3-D input


def test_verify_output_shapes_for_other_inputs(check_pruned):
    """verify takes the unpruned output shapes from the analysis when its inputs match
    the example inputs, and from a fake-tensor run when they do not (another batch)."""
    model = ConvBN().eval()
    a = fxprune.analyze(model, torch.randn(2, 3, 5, 5))
    plan = fxprune.Plan.from_ratio(a, 0.5, criterion="random")
    small = check_pruned(model, torch.randn(2, 3, 5, 5), plan).small
    report = fxprune.verify(model, small, plan, torch.randn(4, 3, 7, 7))
    assert report.ok and report.output_shapes_equal
