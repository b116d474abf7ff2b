"""benchmarks/tokens.py --quick runs (in-process: tiny random models, a few seconds)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("timm")
pytest.importorskip("transformers")


def test_quick_benchmark_runs(capsys):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "tokens.py"
    spec = importlib.util.spec_from_file_location("benchmark_tokens", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "tiny-vit" in out and "merge r=8" in out and "prune keep=0.8" in out
    assert "25% heads/MLP + merge r=8" in out
