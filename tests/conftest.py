"""Shared test machinery: every compiled module is checked, every source model must stay intact.

* ``check_pruned(model, inputs, plan)`` compiles a plan, runs slice == mask (``verify``),
  compares output shapes with the unpruned model, re-derives every sliced tensor
  independently of ``passes/slice_weights.py`` (``index_select`` of the original along
  the kept indices of every member) and checks that the model was not touched.
* An autouse fixture wraps ``fxprune.compile`` for the whole suite (in the spirit of TVM
  Relax's well-formedness fixture): every compiled module must lint, and at teardown
  every model that was compiled, successfully or not, must be bit-identical to before
  (parameters, buffers, ``training`` flags, ``requires_grad``).
"""
from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# tests/fxprune mirrors the package: with a bare ``pytest`` (rootdir not on sys.path, tests/
# prepended by pytest) ``import fxprune`` would find that folder as a namespace package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxprune  # noqa: E402
from fxprune.core.groups import GroupAnalysis  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

# Every pass's requires/ensures checks run in the suite (fxprune/core/pipeline.py), also for
# passes called directly; a test that wants them off deletes the variable with monkeypatch.
os.environ.setdefault("FXPRUNE_DEBUG", "1")


@pytest.fixture(autouse=True)
def _pass_checks_on(monkeypatch):
    """``FXPRUNE_DEBUG=1`` for every test, unless the run set it explicitly."""
    monkeypatch.setenv("FXPRUNE_DEBUG", os.environ.get("FXPRUNE_DEBUG") or "1")


# ----------------------------------------------------------------------------------
# Snapshots: "the user's model is untouched"
# ----------------------------------------------------------------------------------
# Tensors up to this many elements are cloned; bigger ones (zoo models) are compared by a
# float64 digest so that snapshots of large models do not double their memory.
CLONE_LIMIT = 1 << 20


@dataclass
class Snapshot:
    tensors: dict[str, Any]          # a clone, or a digest tuple for big tensors
    shapes: dict[str, tuple]
    training: dict[str, bool]
    requires_grad: dict[str, bool]
    ids: dict[str, int]


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    return named


def _value(t: torch.Tensor) -> Any:
    t = t.detach()
    if t.is_meta:
        return None
    if t.numel() <= CLONE_LIMIT:
        return t.clone()
    if t.is_floating_point():
        return (float(t.sum(dtype=torch.float64)), float(t.abs().sum(dtype=torch.float64)),
                float((t * torch.arange(t.numel(), dtype=t.dtype, device=t.device)
                       .view(t.shape).remainder(7)).sum(dtype=torch.float64)))
    return (int(t.long().sum()), int(t.long().abs().sum()))


def _same_value(old: Any, now: torch.Tensor) -> bool:
    if old is None:
        return True
    if not isinstance(old, torch.Tensor):
        return old == _value(now)
    now = now.detach()
    if torch.equal(now, old):
        return True
    return old.is_floating_point() and torch.equal(now.isnan(), old.isnan()) and \
        torch.equal(now.nan_to_num(), old.nan_to_num())


def snapshot(model: torch.nn.Module) -> Snapshot:
    named = _named_tensors(model)
    return Snapshot(
        tensors={n: _value(t) for n, t in named.items()},
        shapes={n: (tuple(t.shape), t.dtype) for n, t in named.items()},
        training={n: m.training for n, m in model.named_modules(remove_duplicate=False)},
        requires_grad={n: p.requires_grad
                       for n, p in model.named_parameters(remove_duplicate=False)},
        ids={n: id(t) for n, t in named.items()})


def assert_untouched(model: torch.nn.Module, before: Snapshot) -> None:
    """Parameters/buffers bit-identical (same objects too), flags and requires_grad unchanged."""
    named = _named_tensors(model)
    assert named.keys() == before.tensors.keys(), "model gained or lost tensors"
    assert {n: id(t) for n, t in named.items()} == before.ids, \
        "a parameter or buffer of the model was replaced"
    for name, t in named.items():
        assert (tuple(t.shape), t.dtype) == before.shapes[name], f"{name} changed shape/dtype"
        assert _same_value(before.tensors[name], t), f"{name} changed value"
    assert {n: m.training for n, m in model.named_modules(remove_duplicate=False)} == \
        before.training, "train/eval flags changed"
    assert {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)} \
        == before.requires_grad, "requires_grad changed"


# ----------------------------------------------------------------------------------
# The suite-wide compile wrapper
# ----------------------------------------------------------------------------------
_real_compile = fxprune.compile


@pytest.fixture(autouse=True)
def _every_compile_is_checked(monkeypatch):
    """Wrap ``fxprune.compile``: its result lints; its source model is intact at teardown."""
    seen: list[tuple[torch.nn.Module, Snapshot]] = []

    def checked_compile(model, plan, **kwargs):
        source = model.gm if isinstance(model, GroupAnalysis) else model
        seen.append((source, snapshot(source)))
        small = _real_compile(model, plan, **kwargs)
        assert small is not source
        if kwargs.get("output", "graph") == "module":  # the user's class, not a graph
            assert type(small) is type(source) and not isinstance(small, torch.fx.GraphModule) \
                or isinstance(source, torch.fx.GraphModule)
            return small
        assert isinstance(small, torch.fx.GraphModule)
        small.graph.lint()
        return small

    monkeypatch.setattr(fxprune, "compile", checked_compile)
    yield
    for source, before in seen:
        assert_untouched(source, before)


# ----------------------------------------------------------------------------------
# check_pruned
# ----------------------------------------------------------------------------------
def as_inputs(x: Any) -> tuple:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def flat_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_tensors(v)]
    return []


def run_eval(model: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """Outputs of a deep copy in eval mode (the model itself is never switched)."""
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        return flat_tensors(m(*inputs))


def removed_indices(analysis: GroupAnalysis, plan: fxprune.Plan) -> dict[tuple[str, int], set]:
    """(fqn, dim) -> indices removed, from members and the plan alone."""
    removed: dict[tuple[str, int], set] = {}
    for name, keep in plan.keep.items():
        g = analysis.group(name)
        gone = np.setdiff1d(np.arange(g.size), np.asarray(keep, dtype=np.int64))
        for m in g.members:
            idx = np.flatnonzero(np.isin(m.units, gone))
            removed.setdefault((m.fqn, m.dim), set()).update(idx.tolist())
    return removed


def expected_tensors(analysis: GroupAnalysis, plan: fxprune.Plan) -> dict[str, torch.Tensor]:
    """Every parameter/buffer of the analysed graph, sliced by ``index_select`` here."""
    gone = removed_indices(analysis, plan)
    out = {}
    named = dict(analysis.gm.named_parameters())
    named.update(dict(analysis.gm.named_buffers()))
    for fqn, t in named.items():
        t = t.detach()
        for (f, dim), idx in gone.items():
            if f == fqn and idx:
                keep = [i for i in range(t.shape[dim]) if i not in idx]
                t = t.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))
        out[fqn] = t
    return out


@dataclass
class Pruned:
    small: torch.fx.GraphModule
    report: fxprune.VerifyReport
    analysis: GroupAnalysis


def _check_pruned(model: torch.nn.Module, inputs: Any, plan: fxprune.Plan, *,
                  analysis: GroupAnalysis | None = None, values: bool = True) -> Pruned:
    """Compile ``plan``, check slice == mask, output shapes, sliced tensors, model intact."""
    inputs = as_inputs(inputs)
    analysis = analysis or plan.analysis
    assert analysis is not None, "pass analysis= for a plan loaded from JSON"
    before = snapshot(model)
    small = fxprune.compile(analysis if plan.analysis is None else model, plan)
    report = fxprune.verify(analysis, small, plan, inputs)
    assert report.ok and report.output_shapes_equal, report
    assert report.max_abs_error <= report.tolerance

    want, got = run_eval(model, inputs), run_eval(small, inputs)
    assert [t.shape for t in got] == [t.shape for t in want]
    assert all(torch.isfinite(t).all() for t in got if t.is_floating_point())

    if values:
        expected = expected_tensors(analysis, plan)
        actual = dict(small.named_parameters())
        actual.update(dict(small.named_buffers()))
        for fqn, t in expected.items():
            assert fqn in actual, f"{fqn} missing from the pruned module"
            assert actual[fqn].shape == t.shape, f"{fqn}: {tuple(actual[fqn].shape)} != {tuple(t.shape)}"
            assert torch.equal(actual[fqn].detach(), t), f"{fqn}: values are not the kept slices"
    assert report.params_after == sum(p.numel() for p in small.parameters())

    own = {t.data_ptr() for t in model.parameters() if t.numel() and not t.is_meta}
    assert not own & {t.data_ptr() for t in small.parameters() if t.numel()}, \
        "the pruned module shares storage with the user's model"
    assert_untouched(model, before)
    return Pruned(small, report, analysis)


@pytest.fixture(scope="session")
def check_pruned():
    """``check_pruned(model, inputs, plan) -> Pruned(small, report, analysis)``."""
    return _check_pruned


@pytest.fixture(scope="session")
def helpers():
    """Small helpers for tests: snapshots, eval runs, expected slices."""
    class H:
        pass
    h = H()
    h.snapshot, h.assert_untouched = snapshot, assert_untouched
    h.run_eval, h.expected_tensors, h.removed_indices = run_eval, expected_tensors, removed_indices
    return h


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
