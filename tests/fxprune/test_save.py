"""fxprune.save / portable: pruned models load with torch alone, saves are atomic."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fxprune
from fxprune.deploy import fxprune_references


class Small(torch.nn.Module):
    """conv-bn-relu, residual, linear head: every kind of group, seconds to prune."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.conv2(y)
        return self.head(y.mean((2, 3)))


def _pruned(model: torch.nn.Module, inputs: tuple, **kw) -> torch.nn.Module:
    analysis = fxprune.analyze(model, inputs, **kw)
    return fxprune.compile(model, fxprune.Plan.from_ratio(analysis, 0.5)).eval()


# A fresh interpreter that cannot import fxprune (nor passes): torch alone must load it.
_LOADER = textwrap.dedent("""
    import sys
    sys.modules["fxprune"] = None
    sys.modules["passes"] = None
    import torch
    kind, path, inputs, expected = sys.argv[1:5]
    x = torch.load(inputs)
    model = (torch.export.load(path).module() if kind == "export"
             else torch.load(path, weights_only=False))
    out = model(*x)
    ref = torch.load(expected)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    print("LOADED", type(model).__name__)
""")


def _load_without_fxprune(tmp_path, kind: str, path: str, inputs: tuple, expected) -> str:
    torch.save(inputs, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "y.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _LOADER, kind, path, str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_fx_result_pickles_without_fxprune_references(tmp_path):
    model, x = Small().eval(), torch.randn(2, 3, 8, 8)
    small = _pruned(model, (x,))
    path = fxprune.save(small, tmp_path / "small.pt")
    import zipfile
    with zipfile.ZipFile(path) as zf:
        pkl = next(zf.read(n) for n in zf.namelist() if n.endswith("data.pkl"))
    assert fxprune_references(pkl) == []
    with torch.no_grad():
        out = _load_without_fxprune(tmp_path, "pickle", str(path), (x,), small(x))
    assert "LOADED" in out


def test_plain_torch_save_of_compile_result_has_no_fxprune_reference(tmp_path):
    # the kind, not the helper: compile's own output must be portable as it is
    model, x = Small().eval(), torch.randn(2, 3, 8, 8)
    small = _pruned(model, (x,))
    torch.save(small, tmp_path / "plain.pt")
    with torch.no_grad():
        _load_without_fxprune(tmp_path, "pickle", str(tmp_path / "plain.pt"), (x,), small(x))


def test_references_detects_fxprune_class():
    import pickle

    from fxprune.core.errors import PlanError
    assert fxprune_references(pickle.dumps(PlanError)) == ["fxprune.core.errors.PlanError"]
    assert fxprune_references(pickle.dumps(torch.nn.Linear)) == []


def test_program_save_loads_without_fxprune_any_batch(tmp_path):
    model, x = Small().eval(), torch.randn(1, 3, 8, 8)
    small = _pruned(model, (x,))
    path = fxprune.save(small, tmp_path / "small.pt2", example_inputs=(x,))
    x3 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        _load_without_fxprune(tmp_path, "export", str(path), (x3,), small(x3))


def test_export_route_result_pickles(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=16, type_vocab_size=2)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    small = _pruned(model, (ids,), frontend="export")
    with pytest.raises(Exception):  # torch's own: a local function in _guards_fn
        torch.save(small, tmp_path / "raw.pt")
    path = fxprune.save(small, tmp_path / "bert.pt")
    with torch.no_grad():
        expected = small(ids)
        expected = _first(expected)
    loader_out = tmp_path / "bert_out.pt"
    # BertModel returns a pytree of tensors: compare its first leaf in the subprocess
    code = _LOADER.replace("out = model(*x)", "out = model(*x); out = (list(out.values()) "
                           "if isinstance(out, dict) else out)[0]")
    torch.save((ids,), tmp_path / "x.pt")
    torch.save(expected, loader_out)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code, "pickle", str(path),
                           str(tmp_path / "x.pt"), str(loader_out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert small.get_submodule("_guards_fn") is not None  # the user's object is unchanged


def _first(out):
    return out if isinstance(out, torch.Tensor) else (
        list(out.values()) if isinstance(out, dict) else out)[0]


class Unpicklable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.fn = lambda t: t  # noqa: E731  (a lambda cannot be pickled)

    def forward(self, x):
        return self.linear(x)


def test_failed_save_leaves_no_file_and_keeps_old_one(tmp_path):
    path = tmp_path / "m.pt"
    with pytest.raises(fxprune.SaveError, match="example_inputs"):
        fxprune.save(Unpicklable(), path)
    assert os.listdir(tmp_path) == []
    path.write_bytes(b"old")
    with pytest.raises(fxprune.SaveError):
        fxprune.save(Unpicklable(), path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.pt"]


class Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.err = fxprune.PlanError  # a class from fxprune in the pickle


def test_save_refuses_pickle_that_needs_fxprune(tmp_path):
    with pytest.raises(fxprune.SaveError, match="fxprune.core.errors.PlanError"):
        fxprune.save(Holder(), tmp_path / "h.pt")
    assert os.listdir(tmp_path) == []


def test_unwritable_directory_is_a_save_error(tmp_path):
    with pytest.raises(fxprune.SaveError, match="writable"):
        fxprune.save(Small(), tmp_path / "missing" / "m.pt")
