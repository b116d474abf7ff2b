"""The command line: inspect, prune, the saved .pt2, plans and error exits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.cli import main, parse_shape

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(autouse=True)
def _models_importable(monkeypatch):
    """``_cli_models:FACTORY`` specs resolve to tests/fxprune/_cli_models.py."""
    monkeypatch.syspath_prepend(str(HERE))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_inspect_prints_the_group_table(capsys):
    assert main(["inspect", "_cli_models:tiny_resnet", "--input-shape", "1,3,16,16"]) == 0
    out = capsys.readouterr().out
    assert "3 coupled groups, 24 prunable units" in out
    for header in ("group", "units", "exact", "#merges"):
        assert header in out
    assert "stem.weight[0]" in out and "blocks.1.conv1.weight[0]" in out


def test_inspect_limit_and_all(capsys):
    assert main(["inspect", "_cli_models:tiny_resnet", "--input-shape", "1,3,8,8",
                 "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 more groups (--all shows every group)" in out
    assert "blocks.1.conv1.weight[0]" not in out
    assert main(["inspect", "_cli_models:tiny_resnet", "--input-shape", "1,3,8,8",
                 "--limit", "1", "--all"]) == 0
    assert "blocks.1.conv1.weight[0]" in capsys.readouterr().out


def test_inspect_why_and_dot(capsys):
    assert main(["inspect", "_cli_models:tiny_resnet", "--input-shape", "1,3,8,8",
                 "--why", "stem.weight[0]"]) == 0
    why = capsys.readouterr().out
    assert why.startswith("group 0 (stem.weight[0])") and "add" in why
    assert main(["inspect", "_cli_models:tiny_resnet", "--input-shape", "1,3,8,8",
                 "--dot", "1"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith('digraph "blocks.0.conv1.weight[0]"') and dot.rstrip().endswith("}")


def test_prune_saves_a_loadable_program_and_a_plan(tmp_path, capsys):
    out, plan_path = tmp_path / "tiny.pt2", tmp_path / "plan.json"
    assert main(["prune", "_cli_models:tiny_resnet", "--ratio", "0.5", "--input-shape",
                 "1,3,16,16", "--out", str(out), "--plan-out", str(plan_path)]) == 0
    text = capsys.readouterr().out
    assert "pruned 3/3 groups at ratio 0.5 (l1): units 24 -> 12" in text
    assert "params 2,637 -> " in text and "MACs" in text
    assert "verify: slice == mask OK" in text
    assert json.loads(plan_path.read_text())["meta"] == {"ratio": 0.5, "criterion": "l1"}

    # The plan re-applies to a fresh copy of the model; the .pt2 computes the same thing.
    from _cli_models import tiny_resnet

    torch.manual_seed(0)  # the CLI's --seed default: the same random init
    model = tiny_resnet().eval()
    x = torch.randn(1, 3, 16, 16)
    plan = fxprune.Plan.from_json(plan_path.read_text())
    small = fxprune.compile(model, plan, example_inputs=(x,)).eval()
    loaded = torch.export.load(str(out)).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))
        assert loaded(torch.randn(3, 3, 16, 16)).shape == (3, 5)  # batch dim is dynamic
    assert sum(p.numel() for p in small.parameters()) < 2637


def test_factory_may_supply_its_inputs(capsys):
    assert main(["prune", "_cli_models:tiny_resnet_with_inputs", "--ratio", "0.5",
                 "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "units 18 -> 9" in out and "verify: skipped (--no-verify)" in out


def test_prune_torchvision_resnet18_small_input(tmp_path, capsys):
    out = tmp_path / "r18.pt2"
    assert main(["prune", "torchvision:resnet18", "--ratio", "0.5", "--input-shape",
                 "1,3,32,32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "12 coupled groups" in text and "pruned 12/12 groups" in text
    assert "params 11,689,512 -> " in text and "verify: slice == mask OK" in text
    # A fresh interpreter loads it with neither fxprune nor torchvision imported.
    probe = textwrap.dedent(f"""
        import sys, torch
        m = torch.export.load({str(out)!r}).module()
        y = m(torch.randn(2, 3, 32, 32))
        assert not [k for k in sys.modules if k.split('.')[0] in ('fxprune', 'torchvision')]
        print(tuple(y.shape))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 1000)"


@pytest.mark.parametrize("spec, message", [
    ("resnet18", "names no model: use torchvision:NAME, timm:NAME, hf:ARCH"),
    ("torchvision:no_such_net", "torchvision has no model 'no_such_net'"),
    ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
    ("_cli_models:missing", "'_cli_models' has no attribute 'missing'"),
    ("_cli_models:not_a_model", "neither a callable nor an nn.Module"),
    ("_cli_models:broken_factory", "broken_factory() failed: RuntimeError"),
])
def test_bad_model_spec_exits_2_with_one_line(spec, message, capsys):
    assert main(["inspect", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxprune: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_fxprune_errors_exit_2(capsys):
    assert main(["prune", "_cli_models:tiny_resnet", "--ratio", "1.5",
                 "--input-shape", "1,3,8,8"]) == 2
    assert "ratio must lie in [0, 1), got 1.5" in capsys.readouterr().err
    assert main(["inspect", "_cli_models:tiny_resnet", "--input-shape", "1,3,8,8",
                 "--why", "nope"]) == 2
    assert "no group 'nope'" in capsys.readouterr().err


def test_usage_errors_and_shapes(capsys):
    assert main(["prune", "_cli_models:tiny_resnet"]) == 2  # --ratio is required
    assert main(["inspect", "x:y", "--input-shape", "1,a"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()
    assert parse_shape("1,3,224,224") == parse_shape("1x3x224x224") == (1, 3, 224, 224)


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "fxprune", "inspect", "bad-spec"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == ("fxprune: error: model spec 'bad-spec' names no model: "
                                   "use torchvision:NAME, timm:NAME, hf:ARCH, hf:DIR or "
                                   "module.path:factory")


@pytest.mark.parametrize("mode, scale", [("original", 4 ** -0.5), ("recompute", 2 ** -0.5)])
def test_prune_attention_scale_option(mode, scale, tmp_path, capsys):
    out = tmp_path / "attn.pt2"
    # --no-split-ties: the model reads C off its (never pruned) input, so default plans
    # hold head_dim whole for the module output (fxprune.core.count_ties); the graph
    # output this test exports takes any head_dim
    assert main(["prune", "_cli_models:tiny_attention", "--ratio", "0.5", "--no-split-ties",
                 "--attention-scale", mode, "--out", str(out)]) == 0
    assert "slice == mask OK" in capsys.readouterr().out
    program = torch.export.load(str(out))
    scales = [n.kwargs.get("scale") for n in program.graph.nodes
              if "scaled_dot_product" in str(n.target)]
    assert scales and all(s == pytest.approx(scale) for s in scales)


def test_prune_output_module_keeps_the_class_and_a_json_plan_reapplies(tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    assert main(["prune", "_cli_models:tiny_resnet", "--ratio", "0.5", "--input-shape",
                 "1,3,16,16", "--output", "module", "--plan-out", str(plan_path)]) == 0
    text = capsys.readouterr().out
    assert "output: the model's own class TinyResNet, proven equal" in text
    assert main(["prune", "_cli_models:tiny_resnet", "--plan", str(plan_path),
                 "--input-shape", "1,3,16,16", "--output", "module", "--quiet"]) == 0
    assert "params 2,637 -> " in capsys.readouterr().out


def test_prune_record_frontend_needs_the_module_output(capsys):
    args = ["prune", "_cli_models:branchy", "--ratio", "0.5", "--input-shape", "1,3,8,8",
            "--frontend", "record", "--quiet"]
    with pytest.warns(UserWarning, match="control flow"):
        assert main(args) == 2  # a GraphModule would drop the other branch
    assert "output='module'" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="control flow"):
        assert main(args + ["--output", "module"]) == 0
    assert "output: the model's own class Branchy" in capsys.readouterr().out


def test_prune_announces_equal_piece_ties(capsys):
    """A group the ties hold whole shows "kept == units" in the table: the output says
    why (plan.meta['split_ties']), and says when --no-split-ties turned the ties off."""
    spec = ["prune", "test_module_chunks:TinyShuffle", "--input-shape", "1,3,8,8",
            "--ratio", "0.4", "--no-verify"]
    assert main(spec) == 0
    out = capsys.readouterr().out
    assert "equal pieces (chunk / split): the same count kept in every piece; groups " \
        "balanced: 1, held whole: 0" in out
    assert main(spec + ["--no-split-ties"]) == 0
    assert "ties off (--no-split-ties)" in capsys.readouterr().out
    assert main(["prune", "_cli_models:tiny_resnet", "--input-shape", "1,3,8,8",
                 "--ratio", "0.5", "--no-verify"]) == 0
    assert "equal pieces" not in capsys.readouterr().out
    assert main(["inspect", "test_module_chunks:TinyShuffle", "--input-shape", "1,3,8,8"]) == 0
    assert "equal pieces (chunk / split(int))" in capsys.readouterr().out  # as table()
    from types import SimpleNamespace

    from fxprune.cli import _ties_summary
    text = _ties_summary(SimpleNamespace(meta={"split_ties": {}, "split_ties_whole": {
        "stage3.0.branch1.2.weight[0]": "equal pieces at chunk_3 tie every unit"}}))
    assert "held whole: 1" in text and "held whole: stage3.0.branch1.2.weight[0]: " \
        "equal pieces at chunk_3 tie every unit" in text
