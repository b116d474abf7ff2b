"""A compiled (pruned) module is an ordinary GraphModule: it runs under torch.compile with
fullgraph=True, exports with torch.export, round-trips through .pt2 files, and can be
saved and loaded without the original model class."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import fxprune


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 1)
        self.se1 = nn.Linear(8, 4)
        self.se2 = nn.Linear(4, 8)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = y + self.c2(torch.relu(self.c1(y)))
        w = torch.sigmoid(self.se2(torch.relu(self.se1(y.mean((2, 3))))))
        y = y * w[:, :, None, None]
        a, b = torch.split(y, [3, 5], dim=1)
        return self.fc(torch.flatten(torch.cat([b, a], 1), 1))


X = torch.randn(2, 3, 4, 4)


@pytest.fixture(scope="module")
def pruned(check_pruned):
    model = Block().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    a = fxprune.analyze(model, X)
    plan = fxprune.Plan.from_indices(a, {"stem.weight[0]": [0, 2, 3, 6, 7],
                                         "c1.weight[0]": [1, 4], "se1.weight[0]": [0, 3]})
    small = check_pruned(model, X, plan).small.eval()
    with torch.no_grad():
        want = small(X)
    return small, want


def test_the_pruned_fixture(pruned):
    small, want = pruned
    assert small.stem.out_channels == 5 and small.fc.in_features == 5 * 16
    assert want.shape == (2, 3)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(pruned, backend):
    small, want = pruned
    torch._dynamo.reset()
    compiled = torch.compile(small, fullgraph=True, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), want, rtol=1e-6, atol=1e-6)
        x2 = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(compiled(x2), small(x2), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_inductor(pruned):
    """About a minute on two busy cores: marked slow (CI runs it)."""
    small, want = pruned
    torch._dynamo.reset()
    compiled = torch.compile(small, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), want, rtol=1e-5, atol=1e-5)


def test_torch_export_and_pt2_round_trip(pruned, tmp_path):
    small, want = pruned
    ep = torch.export.export(small, (X,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(X), want, rtol=1e-6, atol=1e-6)
    path = tmp_path / "small.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(X), want, rtol=1e-6, atol=1e-6)
    sizes = {k: tuple(v.shape) for k, v in loaded.state_dict.items()}
    assert sizes["stem.weight"] == (5, 3, 3, 3) and sizes["fc.weight"] == (3, 80)


def _run_fresh(code: str, cwd) -> None:
    """Run ``code`` in a fresh interpreter that never imports this test or fxprune."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def test_saved_without_the_original_class(pruned, tmp_path):
    """to_folder writes plain torch code; .pt2 needs no Python class at all. Both load in
    a fresh process where neither Block nor fxprune is imported."""
    small, want = pruned
    small.to_folder(tmp_path / "pruned_pkg", "PrunedBlock")
    torch.export.save(torch.export.export(small, (X,)), tmp_path / "small.pt2")
    torch.save({"x": X, "want": want}, tmp_path / "io.pt")
    _run_fresh("""
        import sys
        import torch
        from pruned_pkg import PrunedBlock
        io = torch.load("io.pt")
        m = PrunedBlock().eval()
        with torch.no_grad():
            torch.testing.assert_close(m(io["x"]), io["want"], rtol=1e-6, atol=1e-6)
            ep = torch.export.load("small.pt2")
            torch.testing.assert_close(ep.module()(io["x"]), io["want"], rtol=1e-6, atol=1e-6)
        assert "fxprune" not in sys.modules, "loading must not need fxprune"
        assert m.stem.out_channels == 5
    """, tmp_path)
