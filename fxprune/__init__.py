"""fxprune: structured pruning of PyTorch models as torch.fx graph passes.

    analysis = fxprune.analyze(model, example_inputs)     # coupled groups
    plan = fxprune.Plan.from_ratio(analysis, 0.5)         # what to keep
    small = fxprune.compile(model, plan)                  # new, smaller GraphModule
    fxprune.verify(model, small, plan, example_inputs)    # slice == mask

Layers, bottom up, one folder each (``passes/README.md``; ``tests/test_layers.py`` checks
them): ``fxprune/core/`` (errors, groups, plan, pipeline, report, graph_meta, nn,
functional) <- op rules (``passes/rules``, ``passes/units.py``) <- passes (``passes/*.py``)
<- ``fxprune/planning/`` (importance, planner, cost) <- API and CLI (the rest of
``fxprune/``). The public names below are resolved lazily, so importing a core module
(``fxprune.core.errors``, or its old name ``fxprune.errors``) loads no pass.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from typing import Any

__version__ = "0.1.0"

# The folder shows the layers: fxprune/core (layer 0) and fxprune/planning (layer 3).
# The dotted names users already import (``fxprune.errors``, ``fxprune.importance``,
# ``fxprune.cost.model``...) stay valid, lazily: importing one imports the module where it
# now lives and registers it under the old name too (one module object, so classes,
# registries and pickles are shared). Nothing is imported until such a name is used.
_MOVED = {**{m: "fxprune.core." + m for m in ("errors", "groups", "plan", "pipeline", "report",
                                              "nn", "functional", "graph_meta")},
          **{m: "fxprune.planning." + m for m in ("importance", "planner", "cost")}}


def _new_name(name: str) -> str | None:
    """``fxprune.cost.model`` -> ``fxprune.planning.cost.model``; None if not moved."""
    head, _, rest = name.partition(".")[2].partition(".")
    if name.partition(".")[0] != "fxprune" or head not in _MOVED:
        return None
    return _MOVED[head] + ("." + rest if rest else "")


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves the pre-layout dotted names to the modules' new homes (PEP 451 finder)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        new = _new_name(name)
        if new is None:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=new.endswith(".cost"))

    def create_module(self, spec: Any) -> types.ModuleType:
        return importlib.import_module(_new_name(spec.name))

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # already executed under its new name


sys.meta_path.insert(0, _MovedModuleFinder())

# Every name loads on first use, so ``import fxprune`` (and ``fxprune --help``) does not
# import torch. Errors import nothing heavy and load eagerly.
from fxprune.core.errors import (BudgetError, ControlFlowError, FxpruneError, ImportanceError, OnnxExportError, SaveError,  # noqa: E402
                            NonFiniteScoreError, PatternError, PlanError, RewriteError,
                            SharedWeightError, SparsityError, AttentionNotFoundError,
                            StaticShapeError, TokenReductionError, TokenScheduleError,
                            ShapePropagationError, TraceError, UnsupportedOpError,
                            VerificationError, UnprovenBranchWarning)

_PLAN_FUNCTION = "plan"  # ``fxprune.plan`` is the planner function, not the submodule


class _Package(types.ModuleType):
    """Keeps ``fxprune.plan`` the function after ``import fxprune.core.plan`` (the submodule
    stays in ``sys.modules``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == _PLAN_FUNCTION and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

# name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(["ChannelGroup", "GroupAnalysis", "Member"], "fxprune.core.groups"),
    **dict.fromkeys(["Plan", "magnitude_scores"], "fxprune.core.plan"),
    **dict.fromkeys(["CRITERIA", "Importance", "importance_scores"], "fxprune.planning.importance"),
    "plan": "fxprune.planning.planner",
    **dict.fromkeys(["GroupCheck", "VerifyReport", "analyze", "compile", "verify"], "fxprune.api"),
    **dict.fromkeys(["FxpruneTracer", "trace"], "fxprune.capture"),
    **dict.fromkeys(["Block", "block_similarity", "find_blocks", "remove_blocks",
                     "verify_blocks"], "fxprune.blocks"),
    **dict.fromkeys(["GradualPruner", "SparsityPlan", "apply_sparsity", "attach_masks",
                     "cubic_sparsity", "finalize", "sparsify", "to_semi_structured",
                     "verify_sparsity"], "fxprune.sparsity"),
    **dict.fromkeys(["TokenCost", "merge_tokens", "prune_tokens", "token_macs",
                     "token_schedule"], "fxprune.tokens"),
    **dict.fromkeys(["load_sliced_state_dict", "sliced_indices"], "fxprune.shards"),
    **dict.fromkeys(["save", "portable", "export_onnx"], "fxprune.deploy"),
    "check_paths": "fxprune.record",
}

__all__ = [
    "analyze", "compile", "verify", "trace", "Plan", "magnitude_scores", "GroupAnalysis",
    "ChannelGroup", "Member", "VerifyReport", "GroupCheck", "FxpruneTracer", "FxpruneError",
    "TraceError", "UnsupportedOpError", "ShapePropagationError", "PlanError", "RewriteError",
    "VerificationError",
]
__all__ += ["plan", "Importance", "importance_scores", "CRITERIA", "BudgetError",
            "ImportanceError", "NonFiniteScoreError"]
__all__ += ["Block", "find_blocks", "block_similarity", "remove_blocks", "verify_blocks"]
__all__ += ["sparsify", "SparsityPlan", "verify_sparsity", "apply_sparsity", "attach_masks",
            "finalize", "cubic_sparsity", "GradualPruner", "to_semi_structured",
            "SparsityError", "PatternError", "SharedWeightError"]
__all__ += ["merge_tokens", "prune_tokens", "token_macs", "TokenCost", "token_schedule",
            "TokenReductionError", "TokenScheduleError", "AttentionNotFoundError",
            "StaticShapeError"]
__all__ += ["load_sliced_state_dict", "sliced_indices"]
__all__ += ["save", "portable", "export_onnx", "SaveError", "OnnxExportError"]
__all__ += ["UnprovenBranchWarning"]
__all__ += ["ControlFlowError", "check_paths"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if name in _MOVED and name != _PLAN_FUNCTION:  # ``fxprune.errors`` and the like
            return importlib.import_module("fxprune." + name)
        raise AttributeError(f"module 'fxprune' has no attribute {name!r}")
    if module == "fxprune.core.plan":  # plans resolve criterion names through the planning
        importlib.import_module("fxprune.planning.importance")  # layer's registry: install it first
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
