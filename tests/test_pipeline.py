"""fxprune/core/pipeline.py: checked passes run their requires/ensures in debug mode only, and
a failing check names the pass and the check."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fxprune
from fxprune.core.errors import RewriteError
from fxprune.core.pipeline import Pass, checked_pass, debug_enabled
from passes.gates import insert_gates
from passes.mask import insert_masks
from passes.remove_blocks import remove_blocks
from passes.slice_weights import slice_weights

calls: list[str] = []


def needs_positive(x: int) -> None:
    calls.append("requires")
    if x <= 0:
        raise ValueError("x must be positive")


def doubles(result: int, x: int) -> None:
    calls.append("ensures")
    assert result == 2 * x, f"{result} != 2 * {x}"


@checked_pass(requires=needs_positive, ensures=doubles, error_type=RewriteError)
def good(x: int) -> int:
    return 2 * x


@checked_pass(ensures=doubles, error_type=RewriteError)
def bad(x: int) -> int:
    return 2 * x + 1


def test_the_suite_runs_with_checks_on():
    assert debug_enabled()


def test_checks_run_in_debug_mode_and_name_the_failure():
    calls.clear()
    assert good(3) == 6 and calls == ["requires", "ensures"]
    with pytest.raises(RewriteError, match="good: requires check needs_positive failed"):
        good(-1)
    with pytest.raises(RewriteError, match="bad: ensures check doubles failed"):
        bad(1)


def test_checks_are_off_without_debug(monkeypatch):
    monkeypatch.setenv("FXPRUNE_DEBUG", "0")
    calls.clear()
    assert bad(1) == 3 and good(-1) == -2 and calls == []


def test_the_rewrite_passes_are_checked_passes():
    for p in (slice_weights, insert_masks, insert_gates, remove_blocks):
        assert isinstance(p, Pass) and p.name == p.__wrapped__.__name__


def test_a_direct_slice_weights_call_is_checked(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    analysis = fxprune.analyze(model, (torch.randn(2, 4),))
    kept = np.ones(analysis.num_units, dtype=bool)
    kept[0] = False
    assert slice_weights(analysis, kept).get_submodule("0").weight.shape[0] == 5
    with pytest.raises(RewriteError, match="slice_weights: requires"):
        slice_weights(analysis, kept[:-1])
    import passes.slice_weights as sw
    monkeypatch.setattr(sw, "_slice", lambda a, k, options: sw.copy.deepcopy(a.gm))  # slices nothing
    with pytest.raises(RewriteError, match="slice_weights: ensures check ensures_sliced"):
        slice_weights(analysis, kept)
