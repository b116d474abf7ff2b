"""The rewrite pass (passes/slice_weights.py): a new module with sliced tensors, fixed
module attributes and literal sizes, checked by ``check_sliced``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from passes.slice_weights import check_sliced, expected_shapes, keep_mask, slice_weights


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.fc(torch.flatten(y, 1))


X = torch.randn(2, 3, 4, 4)


@pytest.fixture
def setup():
    model = Net().eval()
    a = fxprune.analyze(model, X)
    plan = fxprune.Plan.from_indices(a, {"conv1.weight[0]": [0, 2, 3, 7],
                                         "conv2.weight[0]": [1, 3]})
    return model, a, plan.kept_labels(a)


def test_keep_mask_treats_unpruned_indices_as_kept():
    kept = np.array([True, False, True])
    labels = np.array([0, 1, -1, 2, 1])
    assert keep_mask(labels, kept).tolist() == [True, False, True, True, False]


def test_slice_weights_returns_a_new_module_and_leaves_the_old_one(setup, helpers):
    model, a, kept = setup
    before = helpers.snapshot(model)
    gm = slice_weights(a, kept)
    assert gm is not a.gm and isinstance(gm, torch.fx.GraphModule)
    helpers.assert_untouched(model, before)
    helpers.assert_untouched(a.gm, before)
    assert gm.conv1.weight.shape == (4, 3, 3, 3)
    assert torch.equal(gm.conv1.weight, model.conv1.weight[[0, 2, 3, 7]])
    assert torch.equal(gm.bn.running_var, model.bn.running_var[[0, 2, 3, 7]])
    assert torch.equal(gm.conv2.weight, model.conv2.weight[[1, 3]][:, [0, 2, 3, 7]])
    # fc columns: channel c of conv2 covers features 16c .. 16c+15
    cols = list(range(16, 32)) + list(range(48, 64))
    assert torch.equal(gm.fc.weight, model.fc.weight[:, cols])
    assert (gm.conv1.out_channels, gm.bn.num_features, gm.conv2.in_channels,
            gm.conv2.out_channels, gm.fc.in_features) == (4, 4, 4, 2, 32)


def test_kinds_flags_and_dtypes_are_preserved(setup):
    model, a, kept = setup
    model.conv1.weight.requires_grad_(False)
    try:
        gm = slice_weights(a, kept)
    finally:
        model.conv1.weight.requires_grad_(True)
    assert isinstance(gm.conv1.weight, nn.Parameter) and not gm.conv1.weight.requires_grad
    assert gm.conv1.bias.requires_grad
    assert {n for n, _ in gm.named_buffers()} == {n for n, _ in model.named_buffers()}
    assert {n for n, _ in gm.named_parameters()} == {n for n, _ in model.named_parameters()}


def test_float64_model_stays_float64(check_pruned):
    model = Net().double().eval()
    x = X.double()
    a = fxprune.analyze(model, x)
    small = check_pruned(model, x, fxprune.Plan.from_ratio(a, 0.5)).small
    assert all(p.dtype == torch.float64 for p in small.parameters())


def test_keep_all_is_an_exact_copy(setup):
    model, a, _ = setup
    gm = slice_weights(a, np.ones(a.num_units, dtype=bool))
    assert gm is not a.gm
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(gm(X), model(X))


def test_expected_shapes_shrink_tracked_dims_only(setup):
    _, a, kept = setup
    shapes = expected_shapes(a, kept)
    assert shapes["x"] == (2, 3, 4, 4)
    assert shapes["conv1"] == shapes["bn"] == shapes["relu"] == (2, 4, 4, 4)
    assert shapes["conv2"] == (2, 2, 4, 4)
    assert shapes["flatten"] == (2, 32)
    assert shapes["fc"] == (2, 2)


def test_check_sliced_accepts_the_rewrite_and_rejects_a_tampered_one(setup):
    _, a, kept = setup
    gm = slice_weights(a, kept)
    check_sliced(gm, a, kept, (X,))
    gm.conv2.weight = nn.Parameter(gm.conv2.weight[:, :3].clone())
    with pytest.raises(fxprune.RewriteError, match="conv2.weight dim 1"):
        check_sliced(gm, a, kept, (X,))


def test_check_sliced_rejects_a_graph_that_does_not_run(setup):
    _, a, kept = setup
    gm = slice_weights(a, kept)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.flatten:
            node.args = (node.args[0], 2)  # flatten(y, 2): fc now sees a wrong width
    gm.recompile()
    with pytest.raises(fxprune.RewriteError, match="does not run"):
        check_sliced(gm, a, kept, (X,))


def test_split_fixup_writes_explicit_kept_sizes(check_pruned):
    class Chunky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 9, 1)
            self.b = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            p, q, r = self.a(x).chunk(3, dim=1)
            return self.b(p + q * torch.sigmoid(r))

    model = Chunky().eval()
    a = fxprune.analyze(model, X)
    (g,) = a.groups
    assert (g.size, g.granularity) == (3, 3)
    small = check_pruned(model, X, fxprune.Plan.from_indices(a, {g.id: [0, 2]})).small
    (node,) = [n for n in small.graph.nodes if "split" in str(n.target) or "chunk" in str(n.target)]
    assert list(node.args[1]) == [2, 2, 2] and node.args[2] == 1


def test_rewrite_on_meta_model_slices_meta_tensors():
    model = Net().to("meta")
    a = fxprune.analyze(model, X)
    plan = fxprune.Plan.from_ratio(a, 0.5)
    gm = slice_weights(a, plan.kept_labels(a))
    assert gm.conv1.weight.is_meta and gm.conv1.weight.shape == (4, 3, 3, 3)
    check_sliced(gm, a, plan.kept_labels(a), (X,))


class Tied(nn.Module):
    """A tied embedding/output weight next to an untied one, so both memo paths run."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.relu(self.mid(self.emb(ids))))


@pytest.mark.parametrize("make, x", [(Net, X), (Tied, torch.tensor([[1, 2, 3]]))])
def test_pruned_tensors_share_no_storage_with_the_model(make, x):
    """Sliced tensors are copied once (index_select on the original, no deepcopy first):
    the pruned module must still own every byte, sliced or not."""
    model = make().eval()
    a = fxprune.analyze(model, (x,))
    small = slice_weights(a, fxprune.Plan.from_ratio(a, 0.5).kept_labels(a))
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]
           if t.numel()}
    theirs = {t.untyped_storage().data_ptr() for t in [*small.parameters(), *small.buffers()]
              if t.numel()}
    assert own and theirs and not own & theirs
    before = [t.clone() for t in model.parameters()]
    with torch.no_grad():
        for t in small.parameters():
            t.mul_(0)
    assert all(torch.equal(b, t) for b, t in zip(before, model.parameters()))
