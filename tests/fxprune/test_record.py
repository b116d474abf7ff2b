"""Issue 9, section 1: data-dependent control flow (``frontend="record"``).

One path is recorded on the example inputs (loud warning naming the branch line); the
user's own module keeps its control flow (``output="module"``) and equals the masked
recorded graph on the example inputs; other inputs are proven with ``check_paths`` or
refused with ``ControlFlowError`` naming the line and a remedy."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from conftest import assert_untouched, snapshot
from fxprune.capture import FallbackWarning
from fxprune.core.errors import ControlFlowError, TraceError
from passes.mask import insert_masks

torch.manual_seed(0)
X = torch.randn(2, 3, 6, 6).abs() + 0.1  # x.sum() > 0: the first branch


class SumBranch(nn.Module):
    """``if x.sum() > 0`` chooses between two conv paths."""

    def __init__(self) -> None:
        super().__init__()
        self.s1, self.s2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.a, self.b = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = torch.relu(self.s2(torch.relu(self.s1(x))))
        if x.sum() > 0:
            y = self.a(y)
        else:
            y = self.b(y)
        return self.head(torch.relu(y))


class WhileLoop(nn.Module):
    """A ``while`` loop whose trip count is a tensor condition on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y, k = torch.relu(self.stem(x)), x.new_zeros(())
        while k < x.abs().mean() * 3:
            y, k = torch.relu(self.body(y)), k + 1
        return self.head(y)


class ItemScale(nn.Module):
    """``.item()`` used as a Python number."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        s = x.abs().amax().item()
        return self.b(torch.relu(self.a(x) - s / 2)) * s


class ShapeBranch(nn.Module):
    """Shape-dependent (not data-dependent) control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        if x.shape[0] > 1:
            y = torch.relu(y)
        return self.b(y)


class ActivationBranch(nn.Module):
    """The condition reads an activation whose channels are pruned."""

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.threshold = threshold

    def forward(self, x):
        y = torch.relu(self.stem(x))
        if y.sum() > self.threshold:
            return self.head(y)
        return self.head(-y)


def _analyze(model, x, frontend="record"):
    with pytest.warns(FallbackWarning, match=r"specialised.*test_record\.py:\d+") as rec:
        an = fxprune.analyze(model, (x,), frontend=frontend)
    assert an.gm.meta["fxprune"]["frontend"] == "record"
    return an, " ".join(str(w.message) for w in rec)


def _cut(an, fqn, count, seed=0):
    """A random (not magnitude-ordered) removal of ``count`` output channels of ``fqn``."""
    n = an.gm.get_parameter(fqn).shape[0]
    keep = np.sort(np.random.default_rng(seed).permutation(n)[count:])
    return fxprune.Plan.from_tensor_indices(an, {fqn: keep.tolist()})


def _compiled(model, an, plan, x):
    """compile(output='module') and the oracle: it equals the masked recorded graph in
    float64 on the example inputs; the user's model is untouched."""
    before, attrs = snapshot(model), dict(vars(model))
    small = fxprune.compile(model, plan, output="module")
    assert type(small) is type(model) and not isinstance(small, torch.fx.GraphModule)
    masked = insert_masks(an, plan.kept_labels(an)).eval().double()
    with torch.no_grad():
        got = copy.deepcopy(small).eval().double()(x.double())
        torch.testing.assert_close(got, masked(x.double()), rtol=1e-9, atol=1e-10)
    assert_untouched(model, before)
    assert dict(vars(model)).keys() == attrs.keys()
    assert all(vars(model)[k] is v for k, v in attrs.items())
    return small


def test_sum_branch_auto_falls_back_and_names_the_line():
    model = SumBranch().eval()
    an, msg = _analyze(model, X, frontend="auto")
    assert "frontend='auto' recorded one path" in msg and "if x.sum() > 0:" in msg
    assert "torch.export failed" in an.gm.meta["fxprune"]["fallback_reason"]
    with pytest.raises(TraceError):
        fxprune.analyze(model, (X,), frontend="fx")


def test_sum_branch_prunes_consistently_before_the_branch():
    model = SumBranch().eval()
    an, _ = _analyze(model, X)
    assert "b.weight" not in dict(an.gm.named_parameters())  # the other branch
    plan = _cut(an, "s1.weight", 3)  # s1 -> s2 only: the same on both paths
    small = _compiled(model, an, plan, X)
    assert small.s1.out_channels == 5 and small.b.in_channels == 8
    fxprune.check_paths(model, small, plan, [(-X,), (X,)])
    assert torch.equal(small(X), small(X))  # still callable


def test_sum_branch_refuses_channels_that_reach_the_other_branch():
    model = SumBranch().eval()
    an, _ = _analyze(model, X)
    plan = _cut(an, "s2.weight", 3)  # s2 feeds a on this path, b on the other
    small = _compiled(model, an, plan, X)  # the recorded path itself is proven
    fxprune.check_paths(model, small, plan, [(X * 2,)])
    with pytest.raises(ControlFlowError, match=r"test_record\.py:\d+: if x\.sum\(\) > 0:.*"
                       r"b\.weight.*ignore=\['s2'\]"):
        fxprune.check_paths(model, small, plan, [(-X,)])
    # compile says so too: b, on the other branch, reads a width the plan changed
    with pytest.warns(fxprune.UnprovenBranchWarning, match=r"modules b lie on a branch"):
        fxprune.compile(model, plan, output="module")
    report = fxprune.verify(model, small, plan, (X,))  # counts the model, b included
    assert report.params_before == sum(p.numel() for p in model.parameters())
    # the remedy works: with s2 protected nothing crosses the branch
    plan2 = fxprune.Plan.from_ratio(an, 0.5, criterion="random", ignore=["s2", "a"])
    small2 = _compiled(model, an, plan2, X)
    fxprune.check_paths(model, small2, plan2, [(-X,)])


def test_graph_output_refuses_a_recorded_path():
    model = SumBranch().eval()
    an, _ = _analyze(model, X)
    with pytest.raises(ControlFlowError, match=r"one path.*if x\.sum\(\) > 0:.*output='module'"):
        fxprune.compile(model, _cut(an, "s1.weight", 2), output="graph")


def test_while_loop_other_trip_counts_are_proven():
    model = WhileLoop().eval()
    an, msg = _analyze(model, X)
    trips = sum(1 for p in an.gm.meta["fxprune"]["specialised"] if p[2] is True)
    assert trips >= 2 and "while k < x.abs().mean() * 3:" in msg
    assert len(an.groups) == 1  # stem, body (both sides) and head share one space
    plan = _cut(an, "stem.weight", 3)
    small = _compiled(model, an, plan, X)
    assert small.body.in_channels == small.body.out_channels == 5
    fxprune.check_paths(model, small, plan, [(X * 0.1,), (X * 3,)])  # fewer, more trips


def test_item_used_as_a_number():
    model = ItemScale().eval()
    an, msg = _analyze(model, X)
    assert "item at" in msg and "s = x.abs().amax().item()" in msg
    plan = _cut(an, "a.weight", 4)
    small = _compiled(model, an, plan, X)
    fxprune.check_paths(model, small, plan, [(X * 5,)])  # another value read by Python


def test_shape_branch_uses_export_under_auto_and_also_records():
    model = ShapeBranch().eval()
    with pytest.warns(FallbackWarning, match="torch.export") as rec:
        an = fxprune.analyze(model, (X,))
    assert an.gm.meta["fxprune"]["frontend"] == "export"
    assert not any("specialised" in str(w.message) for w in rec)
    small = fxprune.compile(model, fxprune.Plan.from_ratio(an, 0.5, criterion="random"),
                            output="module")
    assert small(X[:1]).shape == (1, 4, 6, 6)
    an, msg = _analyze(model, X)  # explicit: the shape read is recorded and named
    assert "if x.shape[0] > 1:" in msg
    plan = _cut(an, "a.weight", 4)
    small = _compiled(model, an, plan, X)
    fxprune.check_paths(model, small, plan, [(X[:1],), (torch.cat([X, X]),)])


def test_condition_on_a_pruned_activation():
    model = ActivationBranch(0.0).eval()  # relu output: the sum stays > 0 when pruned
    an, msg = _analyze(model, X)
    assert "if y.sum() > self.threshold:" in msg
    plan = _cut(an, "stem.weight", 4)
    small = _compiled(model, an, plan, X)
    fxprune.check_paths(model, small, plan, [(X * 2,)])
    with torch.no_grad():
        full = torch.relu(model.stem(X)).sum().item()
    flip = ActivationBranch(0.99 * full).eval()  # pruned, the sum drops below it
    flip.load_state_dict(model.state_dict())
    an, _ = _analyze(flip, X)
    before = snapshot(flip)
    with pytest.raises(ControlFlowError, match=r"pruned ActivationBranch takes another path.*"
                       r"if y\.sum\(\) > self\.threshold:.*ignore=\['stem'\]"):
        fxprune.compile(flip, _cut(an, "stem.weight", 4), output="module")
    assert_untouched(flip, before)


def test_train_mode_batchnorm_statistics_are_not_updated():
    class Norm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.head(y if x.mean() > 0 else -y)

    model = Norm().train()
    x = X.clone()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        fxprune.analyze(model, (x,), frontend="record")
    assert_untouched(model, before)
    assert torch.equal(x, X) and model.training


class _Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(8, 8, 1)

    def forward(self, y, x):
        if torch.any(x < 0):
            return y
        return torch.relu(self.c(y))


class NestedSkip(nn.Module):
    """A branch inside a submodule; the other path merges two groups of the recorded one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.inner, self.head = nn.Conv2d(3, 8, 1), _Skip(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.inner(self.stem(x), x))


def test_branch_in_a_submodule_that_merges_groups_elsewhere():
    model = NestedSkip().eval()
    an, msg = _analyze(model, X)
    assert "if torch.any(x < 0):" in msg and len(an.groups) == 2
    plan = fxprune.Plan.from_ratio(an, 0.5, criterion="random")
    small = _compiled(model, an, plan, X)
    fxprune.check_paths(model, small, plan, [(X * 2,)])
    with pytest.raises(ControlFlowError, match=r"if torch\.any\(x < 0\): -> True.*does not "
                       r"carry over.*Remedy"):
        fxprune.check_paths(model, small, plan, [(-X,)])
    one = fxprune.Plan.from_tensor_indices(an, {"inner.c.weight": list(range(5))})
    with pytest.raises(ControlFlowError, match=r"inner\.c"):
        fxprune.check_paths(model, fxprune.compile(model, one, output="module"), one, [(-X,)])
