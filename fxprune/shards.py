"""Apply a plan to real weights read shard by shard: compile on ``meta``, load later.

    with torch.device("meta"):
        skeleton = build_model(config)                       # no weight memory
    analysis = fxprune.analyze(skeleton, example_inputs)     # shapes only
    plan = fxprune.Plan.from_json(open("plan.json").read())  # made on the real weights
    small = fxprune.compile(skeleton, plan)                  # sliced, still on meta
    small = fxprune.load_sliced_state_dict(small, plan, ["model-00001.safetensors", ...],
                                           analysis=analysis)

Each tensor is read from its ``.safetensors`` file, sliced along every dim the plan cuts
(the same kept indices ``compile`` uses: ``passes.slice_weights.keep_mask``), checked
against the pruned module's shape and then assigned; the dense tensor is dropped before
the next one is read, so peak memory is the pruned model plus the largest dense tensor,
never the dense model.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from os import PathLike
from typing import Any

import numpy as np
import torch

from fxprune.core.errors import PlanError, RewriteError
from fxprune.core.groups import GroupAnalysis
from fxprune.core.plan import Plan
from passes.slice_weights import keep_mask

__all__ = ["load_sliced_state_dict", "sliced_indices"]


def sliced_indices(analysis: GroupAnalysis, plan: Plan) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Per tensor FQN (every alias of a tied tensor): the ``(dim, kept indices)`` that the
    plan cuts, in the order ``compile`` applies them. Tensors left whole are absent."""
    kept = plan.kept_labels(analysis)
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for (fqn, dim), labels in analysis.tensor_labels.items():
        mask = keep_mask(labels, kept)
        if mask.all():
            continue
        index = torch.as_tensor(np.flatnonzero(mask))
        for alias in analysis.tensor_aliases.get(fqn, (fqn,)):
            out.setdefault(alias, []).append((dim, index))
    return out


def load_sliced_state_dict(pruned: torch.nn.Module, plan: Plan,
                           files: Sequence[str | PathLike], *,
                           analysis: GroupAnalysis | None = None,
                           device: str | torch.device = "cpu") -> torch.nn.Module:
    """A copy of ``pruned`` (typically compiled on ``meta``) holding the dense weights of
    ``files`` (safetensors, keyed by the original model's FQNs) sliced by ``plan``.

    ``analysis``: the analysis ``pruned`` was compiled from (default: the plan's own).
    Each tensor takes the pruned module's dtype and ``device``; a tied tensor is
    loaded once and stays tied; ``device=meta`` literals of a graph captured on meta
    become ``device``.
    Raises ``RewriteError`` when a dense tensor's shape differs from the analysed
    model's, when a sliced tensor's shape differs from the pruned
    module's (wrong files or a fixup that derives the tensor), or when a parameter or
    buffer is in no file (it would stay on ``meta``); ``PlanError`` without an analysis.
    Requires the ``safetensors`` package.
    """
    try:
        from safetensors import safe_open
    except ImportError as exc:  # optional: only this loader needs it
        raise ImportError("load_sliced_state_dict needs safetensors: pip install safetensors") from exc
    analysis = analysis if analysis is not None else plan.analysis
    if analysis is None:
        raise PlanError("this plan carries no analysis (loaded from JSON?): pass "
                        "analysis=fxprune.analyze(meta_model, example_inputs)")
    cuts = sliced_indices(analysis, plan)
    dense = {name: tuple(t.shape) for name, t in
             [*analysis.gm.named_parameters(remove_duplicate=False),
              *analysis.gm.named_buffers(remove_duplicate=False)]}
    out = copy.deepcopy(pruned)  # tensors on meta: free; the caller's module stays as it is
    slots = _slots(out)
    slot_of = {name: k for k, (_, names) in slots.items() for name in names}
    pending = set(slot_of)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in pending:
                    continue
                tensor, names = slots[slot_of[key]]
                value = f.get_tensor(key)
                if key in dense and tuple(value.shape) != dense[key]:
                    raise RewriteError(
                        f"{key} in {path}: shape {tuple(value.shape)}, the analysed model has "
                        f"{dense[key]}. Check that the files hold the model the plan was "
                        "made for (same FQNs and shapes).")
                with torch.no_grad():
                    for dim, index in cuts.get(key, ()):
                        value = value.index_select(dim, index)
                    if tuple(value.shape) != tuple(tensor.shape):
                        raise RewriteError(
                            f"{key} in {path}: shape {tuple(value.shape)} after slicing by the "
                            f"plan, the pruned module has {tuple(tensor.shape)}. Check that the "
                            "files hold the model the plan was made for (same FQNs and shapes).")
                    value = value.to(device=device, dtype=tensor.dtype)
                _assign(out, names, tensor, value)
                pending -= set(names)
    if isinstance(out, torch.fx.GraphModule):
        _retarget_devices(out, torch.device(device))
    if pending:
        missing = sorted(pending)
        raise RewriteError(
            f"{len(missing)} parameter(s)/buffer(s) of the pruned module are in none of the "
            f"{len(files)} file(s), e.g. {missing[:5]}: they would stay on meta. Pass every "
            "shard; non-persistent buffers (rotary inv_freq) are not in a state_dict: save "
            "them (model.named_buffers()) to a file of their own and pass it too.")
    return out


def _retarget_devices(gm: torch.fx.GraphModule, device: torch.device) -> None:
    """A graph captured on ``meta`` bakes ``device=meta`` into its literals (export's
    ``arange(..., device=meta)``, ``_assert_tensor_metadata``): they follow the weights."""
    def move(a: Any) -> Any:
        if isinstance(a, torch.device) and a.type == "meta":
            return device
        if isinstance(a, (tuple, list)):
            return type(a)(move(x) for x in a)
        return a

    changed = False
    for node in gm.graph.nodes:
        args = tuple(move(a) for a in node.args)
        kwargs = {k: move(v) for k, v in node.kwargs.items()}
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs, changed = args, kwargs, True
    if changed:
        gm.recompile()


def _slots(module: torch.nn.Module) -> dict[int, tuple[torch.Tensor, tuple[str, ...]]]:
    """id(tensor) -> (tensor, every FQN it has: tied tensors share one slot)."""
    slots: dict[int, tuple[torch.Tensor, tuple[str, ...]]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False),
                    *module.named_buffers(remove_duplicate=False)]:
        if t is None:
            continue
        old = slots.get(id(t), (t, ()))
        slots[id(t)] = (t, old[1] + (name,))
    return slots


def _assign(module: torch.nn.Module, names: Sequence[str], old: torch.Tensor,
            value: torch.Tensor) -> None:
    new: Any = (torch.nn.Parameter(value, requires_grad=old.requires_grad)
                if isinstance(old, torch.nn.Parameter) else value)
    for name in names:
        path, _, attr = name.rpartition(".")
        holder = module.get_submodule(path) if path else module
        table = holder._parameters if attr in holder._parameters else holder._buffers
        table[attr] = new
