"""docs/coverage.md is generated from the rule table (benchmarks/coverage.py) and current;
every op without a rule says why."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _coverage():
    spec = importlib.util.spec_from_file_location("coverage_table", ROOT / "benchmarks" /
                                                  "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coverage_doc_is_current():
    cov = _coverage()
    assert (ROOT / "docs" / "coverage.md").read_text() == cov.render(), \
        "regenerate: PYTHONPATH=$PWD python benchmarks/coverage.py"


def test_issue_8_ops_are_covered():
    cov = _coverage()
    covered = {name for name, c in cov.functional_ops() + cov.tensor_methods() if c}
    assert {"glu", "narrow", "index_select", "repeat_interleave", "tile", "channel_shuffle",
            "pixel_shuffle", "einsum"} <= covered
    modules = {name for name, c in cov.module_types() if c}
    assert {"GLU", "ChannelShuffle", "PixelShuffle"} <= modules
