"""benchmarks/sparsity.py --quick runs end to end (tiny sizes) and prints its tables."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_quick_runs():
    pytest.importorskip("sklearn")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sparsity.py"), "--quick",
                          "--sections", "digits", "wanda", "csr"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    for header in ("gradual (cubic) + fine-tune", "per layer s", "CSR speedup"):
        assert header in out.stdout
