"""benchmarks/sparsity.py --quick runs end to end (tiny sizes) and prints its tables."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_quick_runs(capsys):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("sparsity_benchmark",
                                                  ROOT / "benchmarks" / "sparsity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import torch

    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--sections", "digits", "wanda", "csr"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for header in ("gradual (cubic) + fine-tune", "per layer s", "CSR speedup", " 0.5000\n"):
        assert header in out
