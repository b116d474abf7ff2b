"""fxprune.bench: interleaved model latency, backends behind typed errors."""
import importlib.util

import numpy as np

import pytest
import torch
from torch import nn

from fxprune.bench import bench_pruning, measure_model_latency, prepare_backend, rows_table
from fxprune.core.errors import BackendUnavailableError


def _tiny(width):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, 4, 1)).eval()


def test_measure_model_latency_interleaved_two_repeats():
    x = torch.randn(1, 3, 16, 16)
    got = measure_model_latency({"a": _tiny(8), "b": _tiny(4)}, (x,), repeats=2, warmup=1)
    assert set(got) == {"a", "b"}
    for s in got.values():
        assert s.repeats == 2 and 0 < s.q1_ms <= s.median_ms <= s.q3_ms and s.iqr_ms >= 0


def test_bench_pruning_rows_on_onnxruntime_and_eager():
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed")
    rows = bench_pruning(_tiny(16), _tiny(8), lambda b: (torch.randn(b, 3, 16, 16),),
                         mac_reduction=2.0, batches=(1, 2), backends=("eager", "onnxruntime"),
                         repeats=2, warmup=1)
    assert [(r.backend, r.batch) for r in rows] == [("eager", 1), ("eager", 2),
                                                    ("onnxruntime", 1), ("onnxruntime", 2)]
    assert all(r.speedup > 0 and r.ratio == pytest.approx(r.speedup / 2.0) for r in rows)
    assert "speedup/MACs" in rows_table(rows)


def test_missing_backend_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(BackendUnavailableError, match=r"fxprune\[onnx\]"):
        prepare_backend("onnxruntime", _tiny(4), (torch.randn(1, 3, 8, 8),))


def test_missing_compiler_is_typed(monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(BackendUnavailableError, match="C compiler"):
        prepare_backend("compile", _tiny(4), (torch.randn(1, 3, 8, 8),))


def test_unknown_backend():
    with pytest.raises(ValueError, match="choose from"):
        prepare_backend("tvm", _tiny(4), (torch.randn(1, 3, 8, 8),))


def test_cli_bench_on_a_tiny_model(capsys):
    pytest.importorskip("torchvision")
    from fxprune.cli import main

    rc = main(["bench", "torchvision:resnet18", "--ratio", "0.5", "--input-shape", "1,3,32,32",
               "--batch", "1", "--repeats", "2", "--fold-bn"])
    out = capsys.readouterr().out
    assert rc == 0 and "speedup/MACs" in out and "eager" in out


def test_latency_target_below_the_floor_gives_both_figures():
    from fxprune.bench import plan_for_measured_latency
    from fxprune.core.errors import LatencyTargetError

    with pytest.raises(LatencyTargetError, match=r"1e-06|0\.000 ms.*floor model measures \([0-9.]+ ms"):
        plan_for_measured_latency(_tiny(8), (torch.randn(1, 3, 16, 16),), 1e-6, repeats=2)


def test_cli_lists_the_backends_bench_knows():
    from fxprune.bench import BACKENDS
    from fxprune.cli_bench import BENCH_BACKENDS

    assert BENCH_BACKENDS == BACKENDS


def test_onnxruntime_falls_back_to_the_deployment_exporter_and_says_so():
    if importlib.util.find_spec("onnxruntime") is None or \
            importlib.util.find_spec("onnxscript") is None:
        pytest.skip("onnxruntime / onnxscript not installed")
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(32, 16, 1, 2, 16, 32, num_classes=3).eval()  # fused MHA in eval
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="TorchScript exporter failed on VisionTransformer"):
        run = prepare_backend("onnxruntime", vit, (x,))
    with torch.no_grad():
        assert np.allclose(run()[0], vit(x).numpy(), atol=1e-5)


def test_cli_bench_memory_format_auto_measures_and_says_which(capsys):
    pytest.importorskip("torchvision")
    from fxprune.cli import main

    rc = main(["bench", "torchvision:resnet18", "--ratio", "0.5", "--input-shape", "1,3,32,32",
               "--batch", "1", "--repeats", "2", "--memory-format", "auto"])
    out = capsys.readouterr().out
    assert rc == 0 and "memory format: " in out and "channels-last " in out


def test_faster_memory_format_keeps_contiguous_within_the_margin():
    from fxprune.bench import faster_memory_format

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    # margin 1.0: channels-last would have to take no time at all
    layout, got = faster_memory_format(m, (torch.randn(1, 3, 16, 16),), repeats=2, margin=1.0)
    assert layout == "contiguous" and set(got) == {"contiguous", "channels_last"}
    assert all(p.is_contiguous() for p in m.parameters())


def _macs_table(cost, **kwargs):
    """A deterministic latency table (ms = MACs, sampled dense and at one unit per group):
    the planner's predictions do not depend on this machine's timing."""
    from fxprune.planning.cost import uniform_kept
    from fxprune.planning.cost.latency import _build_table

    samples = [(c, {n: 1e-6 * v.macs + 1e-7 * v.memory for n, v in c.items()})
               for c in (cost.node_costs(uniform_kept(cost.analysis, 0.0)), cost.node_costs(None))]
    return _build_table(f"{cost.analysis.fingerprint}|macs", "cpu", cost, samples)


def test_measured_latency_target_is_not_moved_by_load_between_runs(monkeypatch):
    """The search compares each run's pruned/dense ratio: a machine twice, three times...
    as busy at each run (both models slower alike) finds the same plan, with the same
    figure, as a machine whose load never changes."""
    import fxprune.bench as bench
    from fxprune.bench import LatencyStats, plan_for_measured_latency
    from fxprune.cli import count_macs

    import fxprune.planning.cost as cost_package

    monkeypatch.setattr(cost_package, "measure_latency", _macs_table)
    model, x = _tiny(32), (torch.randn(1, 3, 16, 16),)
    dense_macs = count_macs(model, x)

    def search(growing: bool):
        calls = []

        def fake(models, inputs, **kwargs):  # ms = 1 + 9 * MAC share, times the load
            calls.append(1)
            load = float(len(calls)) if growing else 1.0
            return {k: LatencyStats(*(3 * [load * (1 + 9 * count_macs(m, inputs) / dense_macs)]),
                                    1) for k, m in models.items()}

        monkeypatch.setattr(bench, "measure_model_latency", fake)
        plan, _, ms = plan_for_measured_latency(model, x, 6.0, round_to=1, scope="local",
                                                max_iters=4, tolerance=1e-9)  # all 4 tries
        return plan.keep, ms, len(calls)

    steady, busier = search(False), search(True)
    assert busier[2] >= 3  # several runs, each busier than the last
    assert busier[0] == steady[0] and busier[1] == pytest.approx(steady[1])


def test_latency_target_as_a_fraction_of_dense(monkeypatch):
    import fxprune.bench as bench
    from fxprune.bench import LatencyStats, plan_for_measured_latency
    from fxprune.cli import count_macs

    import fxprune.planning.cost as cost_package

    monkeypatch.setattr(cost_package, "measure_latency", _macs_table)
    model, x = _tiny(32), (torch.randn(1, 3, 16, 16),)
    dense_macs = count_macs(model, x)
    with pytest.raises(ValueError, match="one of target_ms"):
        plan_for_measured_latency(model, x, 5.0, target_fraction=0.5)
    with pytest.raises(ValueError, match="target_fraction must be"):
        plan_for_measured_latency(model, x, target_fraction=1.5)
    load = [3.0]  # the first (dense) run sets what the fraction means: 3x busier -> 30 ms
    monkeypatch.setattr(bench, "measure_model_latency", lambda models, inputs, **kw: {
        k: LatencyStats(*(3 * [load[0] * (1 + 9 * count_macs(m, inputs) / dense_macs)]), 1)
        for k, m in models.items()})
    by_fraction = plan_for_measured_latency(model, x, target_fraction=0.6, round_to=1,
                                            scope="local", max_iters=3)
    load[0] = 1.0
    by_ms = plan_for_measured_latency(model, x, 6.0, round_to=1, scope="local", max_iters=3)
    assert by_fraction[0].keep == by_ms[0].keep and by_fraction[2] == pytest.approx(3 * by_ms[2])


def test_measure_model_latency_leaves_the_training_flag():
    """(trial19) the runners measure in eval mode; the caller's flags come back."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    model[1].eval()
    measure_model_latency({"m": model}, torch.randn(1, 3, 8, 8), repeats=1, warmup=0)
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(ValueError, match="at least one model"):
        measure_model_latency({}, (torch.randn(1, 3, 8, 8),))


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--batch", "0"]])
def test_cli_bench_rejects_bad_counts_up_front(bad, capsys):
    """(trial19) refused by the parser (exit 2), before any pruning."""
    pytest.importorskip("torchvision")
    from fxprune.cli import main

    try:
        rc = main(["bench", "torchvision:resnet18", "--input-shape", "1,3,16,16",
                   "--batch", "1", "--repeats", "1", *bad])
    except SystemExit as e:  # argparse's own refusal
        rc = e.code
    assert rc == 2 and "must be an integer >= 1" in capsys.readouterr().err
