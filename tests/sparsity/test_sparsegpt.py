"""SparseGPT: the one-pass solver against a naive OBS reference, the pass on graphs, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.core.errors import ImportanceError, SparsityError
from fxprune.sparsity.masks import check_nm
from fxprune.sparsity.sparsegpt import layer_error, obs_prune

from _sparse_models import cnn_data, cnn_inputs, small_cnn
from conftest import assert_untouched, snapshot


def _hessian(cols: int, n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64)
    x = torch.randn(n, cols, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    return x.T @ x / n


def _naive_obs(w, h, sparsity, nm, blocksize, damp):
    """Optimal Brain Surgeon column by column with explicit inverses of H_F, F = {j..}:
    an independent statement of what obs_prune computes with one Cholesky factor."""
    w, h = w.clone().double(), h.clone().double()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    rows, cols = w.shape
    hf = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]
    d = torch.tensor([float(hf[j][0, 0]) for j in range(cols)], dtype=torch.float64)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    done = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if nm is None:
            k = round(sparsity * rows * i2) - done
            done += k
            sal = (w[:, i1:i2] ** 2 / d[i1:i2]).reshape(-1)
            block = torch.ones(rows * (i2 - i1), dtype=torch.bool)
            block[torch.argsort(sal, stable=True)[:k]] = False
            keep[:, i1:i2] = block.reshape(rows, i2 - i1)
        for j in range(i1, i2):
            if nm is not None and (j - i1) % nm[1] == 0:
                sal = w[:, j:j + nm[1]] ** 2 / d[j:j + nm[1]]
                run = torch.zeros_like(sal, dtype=torch.bool)
                run.scatter_(1, torch.argsort(-sal, dim=1, stable=True)[:, :nm[0]], True)
                keep[:, j:j + nm[1]] = run
            for r in range(rows):
                if not keep[r, j]:
                    w[r, j:] -= w[r, j] / hf[j][0, 0] * hf[j][0, :]
                    w[r, j] = 0.0
    return w, keep


@pytest.mark.parametrize("nm,sparsity", [(None, 0.5), (None, 0.3), ((2, 4), 0.5), ((1, 4), 0.75)])
def test_obs_prune_equals_the_naive_obs_reference(nm, sparsity):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    h = _hessian(12)
    new, keep = obs_prune(w, h, sparsity, nm=nm, blocksize=4, damp=0.01)
    ref_w, ref_keep = _naive_obs(w, h, sparsity, nm, 4, 0.01)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new, ref_w, rtol=0, atol=1e-10)
    assert int((~keep).sum()) == round(sparsity * w.numel())
    assert torch.equal(new == 0, ~keep)


def test_obs_prune_at_zero_sparsity_is_the_identity():
    w = torch.randn(4, 10, dtype=torch.float64)
    new, keep = obs_prune(w, _hessian(10), 0.0, blocksize=3)
    assert keep.all() and torch.equal(new, w)


def test_reconstruction_beats_the_same_mask_and_magnitude_without_update():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 32, generator=g, dtype=torch.float64)
    h = _hessian(32, seed=7)
    new, keep = obs_prune(w, h, 0.5)
    magnitude = w.abs() >= w.abs().reshape(-1).kthvalue(w.numel() // 2).values
    e_sgpt, e_same, e_mag = (layer_error(w, new, h), layer_error(w, w * keep, h),
                             layer_error(w, w * magnitude, h))
    assert e_sgpt < 0.9 * e_same and e_sgpt < 0.9 * e_mag  # measured: 0.236, 0.318, 0.271


def test_layer_error_of_a_conv_follows_its_im2col_columns():
    """The Hessian of a conv, built from the pass's im2col columns, gives the same error as
    running the two convolutions: the column order matches ``W.reshape(out, -1)``."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, stride=2, bias=False)).eval()
    x = torch.randn(3, 4, 9, 9)
    sparse, plan = fxprune.sparsify(model, x, 0.5, criterion="sparsegpt", data=[(x, None)],
                                    batches=1, kinds=("conv", "head"))
    w, w2 = model[0].weight.double(), sparse[0].weight.double()
    with torch.no_grad():
        y, y2 = F.conv2d(x.double(), w, stride=2, padding=1), F.conv2d(x.double(), w2, stride=2,
                                                                       padding=1)
    direct = float((y - y2).norm() / y.norm())
    recorded = plan.meta["reconstruction"]["layers"]["0.weight"]["error"]
    assert abs(direct - recorded) < 1e-6 * max(direct, 1.0)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()


def test_layers_are_calibrated_on_the_already_sparsified_model():
    model, x = _mlp(), torch.randn(32, 8)
    sparse, plan = fxprune.sparsify(model, x[:2], 0.5, criterion="sparsegpt",
                                    data=[(x, None)], batches=1, kinds=("linear", "head"))
    xd = x.double()
    w0, keep0 = obs_prune(model[0].weight, xd.T @ xd / len(x), 0.5)
    hidden = F.relu(F.linear(xd, w0.to(torch.float32).double(), model[0].bias.double()))
    w2, _ = obs_prune(model[2].weight, hidden.T @ hidden / len(x), 0.5)
    torch.testing.assert_close(sparse[0].weight, w0.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sparse[2].weight, w2.float(), rtol=0, atol=1e-5)
    assert torch.equal(plan.mask("0.weight"), keep0)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_on_a_cnn_is_verified_and_leaves_the_model_alone(pattern):
    model = small_cnn()
    model.conv2 = nn.Conv2d(8, 16, 3)  # SparseGPT reconstructs ungrouped convs only
    model.eval()
    x, before = cnn_inputs(), snapshot(model)
    sparse, plan = fxprune.sparsify(model, x, pattern=pattern, criterion="sparsegpt",
                                    data=cnn_data(batches=2, n=16), batches=2)
    assert_untouched(model, before)
    report = fxprune.verify_sparsity(model, sparse, plan, x)
    assert report.ok and report.reconstruction == "sparsegpt" and not report.changed_outside
    assert abs(report.sparsity - 0.5) < 1e-12
    if pattern == "2:4":
        for fqn in plan.masks:
            w = dict(sparse.named_parameters())[fqn]
            assert check_nm(w, 2, 4, fqn.startswith("conv"), fqn) == 0
    layers = plan.meta["reconstruction"]["layers"]
    assert all(v["error"] <= v["error_mask_only"] + 1e-12 for v in layers.values())
    assert "sparsegpt" in report.table()
    # a tampered bias (outside the plan) is caught
    with torch.no_grad():
        sparse.fc.bias.add_(1.0)
    assert not fxprune.verify_sparsity(model, sparse, plan, x, raise_on_failure=False).ok


def test_sparsegpt_bad_input_is_typed():
    model, x = small_cnn(), cnn_inputs()
    with pytest.raises(ImportanceError, match="data"):
        fxprune.sparsify(model, x, 0.5, criterion="sparsegpt")
    with pytest.raises(SparsityError, match="scope must be 'layer'"):
        fxprune.sparsify(model, x, 0.5, criterion="sparsegpt", scope="global",
                         data=cnn_data())
    with pytest.raises(SparsityError, match=r"conv2\.weight.*groups=2.*ignore"):
        fxprune.sparsify(model, x, 0.5, criterion="sparsegpt", data=cnn_data())
    sparse, plan = fxprune.sparsify(model, x, 0.5, criterion="sparsegpt", data=cnn_data(),
                                    ignore=["conv2.weight"])
    with pytest.raises(SparsityError, match="updated the kept weights"):
        fxprune.apply_sparsity(model, plan)
