"""Structured then unstructured (both proofs), and export of the sparse model."""
from __future__ import annotations

import io

import pytest
import torch

import fxprune
from fxprune.core.errors import SparsityError
from fxprune.sparsity import semi_structured_support, storage_bytes, to_semi_structured

from _sparse_models import cnn_inputs, small_cnn


def test_compile_then_sparsify_both_proofs_hold():
    model, x = small_cnn(), cnn_inputs()
    analysis = fxprune.analyze(model, x)
    plan = fxprune.Plan.from_ratio(analysis, 0.5)
    small = fxprune.compile(model, plan)
    assert fxprune.verify(model, small, plan, x).ok
    for options in ({"sparsity": 0.7}, {"pattern": "2:4", "kinds": ("linear",)}):
        sparse, splan = fxprune.sparsify(small, x, **options)
        report = fxprune.verify_sparsity(small, sparse, splan, x)
        assert report.ok and abs(report.sparsity - options.get("sparsity", 0.5)) < 1e-3
    assert fxprune.verify(model, small, plan, x).ok  # the structured proof still holds
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_dense_with_zeros_exports():
    model, x = small_cnn(), cnn_inputs()
    sparse, plan = fxprune.sparsify(model, x, 0.5)
    buf = io.BytesIO()
    torch.save(sparse.state_dict(), buf)
    buf.seek(0)
    fresh = small_cnn(seed=5)
    fresh.load_state_dict(torch.load(buf))
    assert fxprune.verify_sparsity(model, fresh, plan, x).ok
    ep = torch.export.export(sparse, (x,))
    assert torch.equal(ep.module()(x), sparse(x))
    zeros = {n: int((t == 0).sum()) for n, t in ep.state_dict.items() if n in plan.masks}
    assert zeros == {n: m.numel - m.kept for n, m in plan.masks.items()}


def test_storage_bytes_formula():
    model, x = small_cnn(), cnn_inputs()
    sparse, plan = fxprune.sparsify(model, x, pattern="2:4")
    b = storage_bytes(sparse, plan)
    n = plan.num_weights
    assert b["dense"] == 4 * n
    assert b["semi_structured_2_4"] == 4 * n // 2 + n // 8
    assert b["csr"] > b["dense"] // 2  # int64 indices: CSR saves little at 50%


def test_to_semi_structured():
    model, x = small_cnn(), cnn_inputs()
    why = semi_structured_support()
    if why is not None:
        _, plan = fxprune.sparsify(model, x, pattern="2:4")
        with pytest.raises(SparsityError, match="export dense-with-zeros instead"):
            to_semi_structured(model, plan)
        pytest.skip(why)
    lin = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 128)).half().cuda().eval()
    xx = torch.randn(64, 128, dtype=torch.half, device="cuda")
    sparse, plan = fxprune.sparsify(lin, xx, pattern="2:4", kinds=("linear", "head"))
    fast = to_semi_structured(sparse, plan)
    torch.testing.assert_close(fast(xx), sparse(xx), rtol=1e-2, atol=1e-2)


def test_dense_with_zeros_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    model, x = small_cnn(), cnn_inputs()
    sparse, plan = fxprune.sparsify(model, x, 0.5)
    path = tmp_path / "sparse.onnx"
    torch.onnx.export(sparse, (x,), str(path), dynamo=False)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    for fqn in ("conv2.weight", "fc.weight"):  # conv1 is folded with the BatchNorm
        assert int((inits[fqn] == 0).sum()) == plan.masks[fqn].numel - plan.masks[fqn].kept
    session = ort.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - sparse(x).detach().numpy()).max() < 1e-5
