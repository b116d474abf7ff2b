"""The folders are the layers (fxprune/core, fxprune/planning); the dotted names from
before the layout still import, lazily, as the same module objects."""
from __future__ import annotations

import importlib
import pickle
import subprocess
import sys

import pytest

import fxprune

MOVED = {"errors": "core", "groups": "core", "plan": "core", "pipeline": "core",
         "report": "core", "nn": "core", "functional": "core", "graph_meta": "core",
         "importance": "planning", "planner": "planning", "cost": "planning",
         "cost.model": "planning", "cost.flops": "planning", "cost.latency": "planning"}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_dotted_name_is_the_moved_module(old):
    new = importlib.import_module(f"fxprune.{MOVED[old]}.{old}")
    assert importlib.import_module(f"fxprune.{old}") is new
    assert sys.modules[f"fxprune.{old}"] is new


def test_old_names_share_classes_registries_and_pickles():
    from fxprune.errors import PlanError
    from fxprune.importance import CRITERIA
    from fxprune.core.errors import PlanError as moved
    from fxprune.planning.importance import CRITERIA as registry

    assert PlanError is moved and CRITERIA is registry
    assert fxprune.importance is importlib.import_module("fxprune.planning.importance")
    assert callable(fxprune.plan) and fxprune.Plan.__module__ == "fxprune.core.plan"
    # a pickle written before the layout names fxprune.errors.PlanError: it still loads
    old = pickle.dumps(moved("x"), protocol=0).replace(b"fxprune.core.errors", b"fxprune.errors")
    assert b"fxprune.errors" in old and type(pickle.loads(old)) is moved
    with pytest.raises(ImportError):
        importlib.import_module("fxprune.not_a_module")


def test_importing_an_old_core_name_loads_neither_torch_nor_a_pass():
    code = ("import sys, fxprune.errors; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('passes')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
