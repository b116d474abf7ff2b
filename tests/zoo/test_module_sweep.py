"""benchmarks/module_sweep.py --quick: one model per zoo through compile(output="module")."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("timm")
pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "module_sweep.py"


def _sweep():
    spec = importlib.util.spec_from_file_location("module_sweep", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_sweep_rows(capsys):
    sweep = _sweep()
    rows = sweep.main(["--quick"])
    table = capsys.readouterr().out
    assert [r["model"] for r in rows] == [n for names in sweep.QUICK.values() for n in names]
    assert "summary:" in table and "resnet18" in table
    by = {r["model"]: r for r in rows}
    for name in ("resnet18", "mobilenetv3_small_050"):  # symbolic-trace graphs: all columns
        row = by[name]
        assert row["verdict"] == "ok", row
        assert row["class"] is True and row["train"] == "ok"
        assert all(row[k] <= 1e-6 for k in ("err_x", "err_batch", "err_res")), row
    assert not any(r["outcome"].startswith("crash") for r in rows), rows


def test_verdict_flags_errors_and_wrapped_crashes():
    sweep = _sweep()
    good = {"outcome": "ok", "class": True, "err_x": 0.0, "err_batch": 1e-9, "train": "ok"}
    assert sweep.verdict(good) == "ok"
    assert sweep.verdict({**good, "err_batch": 1e-3}) == "mismatch"
    assert sweep.verdict({**good, "class": False}) == "mismatch"
    assert sweep.verdict({**good, "err_res": "FAIL RuntimeError: x"}) == "mismatch"
    assert sweep.verdict({**good, "err_res": "n/a"}) == "ok"
    from fxprune.core.errors import LiteralSizeError, RewriteError

    inner = ValueError("boom")
    wrapped = RewriteError("p: step 's' failed (after: a, b): ValueError: boom")
    wrapped.__cause__ = inner
    assert sweep._wrapped(wrapped) is inner
    typed = LiteralSizeError("compile(output=\"module\"): does not run (ValueError: boom)")
    typed.__cause__ = inner
    outer = LiteralSizeError("p: step 's' failed (after: a): " + str(typed))
    outer.__cause__ = typed
    assert sweep._wrapped(outer) is None  # fxprune's own refusal, re-raised by the pipeline
