"""CLI: model specs, early rejection, budgets, --plan, --onnx, --quiet, 80 columns, --help."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fxprune.cli import main

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TINY = ["_cli_models:tiny_resnet", "--input-shape", "1,3,8,8"]


@pytest.fixture(autouse=True)
def _models_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


@pytest.mark.parametrize("spec, message", [
    ("torchvision:resnet81", "did you mean resnet18"),
    ("timm:resnet_18", "timm has no model 'resnet_18'; did you mean"),
    ("hf:lama", "did you mean llama"),
    ("torchvison:resnet18", "did you mean torchvision"),
    ("resnet18", "names no model"),
])
def test_model_spec_typos_suggest(spec, message, capsys):
    assert main(["inspect", spec]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "1.5"], "ratio must lie in [0, 1), got 1.5"),
    (["--ratio", "abc"], "ratio must lie in [0, 1)"),
    (["--ratio", "0.5", "--out", "/no/such/dir/m.pt2"], "cannot write"),
    (["--ratio", "0.5", "--criterion", "fgpm"], "unknown criterion 'fgpm'; did you mean fpgm"),
    (["--ratio", "0.5", "--criterion", "taylor"], "needs calibration data"),
    (["--ratio", "0.5", "--target-macs", "0.5"], "not allowed with argument"),
    (["--ratio", "0.5", "--input-shape", "1,3,x,64"], "bad shape '1,3,x,64'"),
    (["--ratio", "0.5", "--out", "pruned.txt"], "name it .pt2"),
    (["--ratio", "0.5", "--onnx", "pruned.pt"], "name it .onnx"),
    (["--plan", "/no/such/plan.json"], "cannot read '/no/such/plan.json'"),
    (["--ratio", "0.5", "--out", "/proc/pruned.pt2"], "cannot write"),  # root may "access" it
    (["--ratio", "0.5", "--round-to", "0"], "integer >= 1 or auto"),
])
def test_bad_options_exit_2_before_any_work(argv, message, capsys, monkeypatch):
    import fxprune.specs

    def no_work(spec):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(fxprune.specs, "load_model", no_work)
    monkeypatch.setattr("fxprune.cli.load_model", no_work)
    assert main(["prune", "_cli_models:tiny_resnet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_global_macs_budget_and_saved_plan_round_trip(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["prune", *TINY, "--target-macs", "0.6", "--global", "--plan-out",
                 str(plan), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "target macs 0.6 (l1, global)" in out and "slice == mask OK" in out
    assert "id  group" not in out  # --quiet: no table
    assert main(["prune", *TINY, "--plan", str(plan), "--quiet"]) == 0
    again = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("params"))
    assert line in again.splitlines()
    assert main(["prune", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--plan",
                 str(plan)]) == 2
    assert "another graph" in capsys.readouterr().err


def test_ignore_keeps_a_group_whole(capsys):
    assert main(["prune", *TINY, "--ratio", "0.5", "--ignore", "stem", "--quiet"]) == 0
    assert "pruned 2/3 groups" in capsys.readouterr().out


def test_table_fits_80_columns_unless_wide(capsys):
    assert main(["inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert max(map(len, lines)) <= 80
    assert main(["inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32",
                 "--wide"]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) > 80


def test_prune_writes_onnx_and_pickle(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    onnx_path, pt = tmp_path / "m.onnx", tmp_path / "m.pt"
    assert main(["prune", *TINY, "--ratio", "0.5", "--onnx", str(onnx_path), "--out",
                 str(pt), "--quiet"]) == 0
    assert onnx_path.exists() and pt.exists()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"


def test_hf_text_model_with_token_inputs(capsys):
    pytest.importorskip("transformers")
    assert main(["prune", "hf:bert", "--ratio", "0.5", "--split-policy", "heads",
                 "--input-shape", "2,8", "--quiet"]) == 0
    assert "slice == mask OK" in capsys.readouterr().out


def test_help_and_version_do_not_import_torch():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = ("import sys\nfrom fxprune.cli import main\nassert main(['--help']) == 0\n"
             "assert main(['--version']) == 0\n"
             "assert 'torch' not in sys.modules, 'torch imported'\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "fxprune 0.1.0" in done.stdout and "--target-macs" not in done.stdout
    assert time.perf_counter() - start < 10  # generous: the 1 s target is measured with `time`


def test_save_pretrained_round_trip_loads_in_transformers(tmp_path, capsys):
    """``--save-pretrained`` writes the model's own save_pretrained folder; transformers
    loads it into its own class, and it computes what the Python API's pruned model does."""
    import torch
    import transformers

    import fxprune
    from fxprune.specs import load_model, make_inputs

    out, plan_path = tmp_path / "small", tmp_path / "plan.json"
    assert main(["prune", "hf:llama", "--ratio", "0.25", "--uniform", "--quiet",
                 "--save-pretrained", str(out), "--plan-out", str(plan_path)]) == 0
    assert f"saved {out}" in capsys.readouterr().out
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"

    torch.manual_seed(0)  # the CLI's --seed: the same random init and token inputs
    loaded = load_model("hf:llama")
    inputs = make_inputs(loaded, None, None, None)
    analysis = fxprune.analyze(loaded.model, inputs, frontend="export")
    plan = fxprune.Plan.from_indices(analysis, fxprune.Plan.from_json(plan_path.read_text()).keep)
    small = fxprune.compile(loaded.model, plan, output="module").eval()
    assert reloaded.config.intermediate_size == small.config.intermediate_size < 128
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*inputs).logits, small(*inputs).logits,
                                   rtol=0, atol=1e-6)


def test_save_pretrained_refusals_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["prune", "hf:llama", "--ratio", "0.4", "--global", "--quiet",
                 "--save-pretrained", str(out)]) == 2  # layers keep different widths
    last = capsys.readouterr().err.strip().splitlines()[-1]  # torch.export may warn first
    assert last.startswith("fxprune: error: save_pretrained:") and "--uniform" in last
    assert not out.exists() or not any(out.iterdir())
    assert main(["prune", *TINY, "--ratio", "0.5", "--save-pretrained", str(out)]) == 2
    assert "needs a Hugging Face model" in capsys.readouterr().err
    assert main(["prune", "hf:llama", "--ratio", "0.5", "--output", "graph",
                 "--save-pretrained", str(out)]) == 2
    (out / "x").parent.mkdir(exist_ok=True)
    (out / "x").write_text("")
    assert main(["prune", "hf:llama", "--ratio", "0.5", "--save-pretrained", str(out)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
