"""benchmarks/distill.py --quick runs every method end to end (sklearn's bundled digits)."""
import importlib.util
import pathlib

import pytest

pytest.importorskip("sklearn")
PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "distill.py"


@pytest.mark.slow  # ~10-20 s on the shared 2-core box (5 analyses, 4 short trainings)
def test_quick_benchmark_runs_every_method():
    spec = importlib.util.spec_from_file_location("bench_distill", PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse(["--quick"])
    result = bench.run(args)
    text = bench.report(result, args, 0.0)
    for name in ("dense",) + bench.METHODS:
        assert name in text
    dense_macs = result["dense"][0][1]
    for (name, factor), rows in result["rows"].items():
        acc, macs, params, ms = rows[0]
        assert macs <= dense_macs / factor * 1.01, name
        assert 0.0 <= acc <= 100.0 and params > 0 and ms > 0
