"""The student of prune-while-training: a gated copy whose gates are a 0/1 buffer.

With ``soft=True`` (``Pruner(selection="soft")``, ViT-Slim's learnable soft masks) the
student also owns ``soft_mask``, one real-valued *parameter* per unit label (initialised
to 1): the effective gate is ``hard * soft_mask``, on the same consumption edges.

``GatedStudent`` wraps the graph that ``passes.gates.insert_gates`` returns. The gates
(one per unit label, ``_fxprune_gates``) are turned from a parameter into a *buffer*, so
``student.parameters()`` (what an optimizer sees) never contains them: only the pruner
changes them. While recording, each forward passes a fresh leaf copy of the gates
through ``torch.func.functional_call``; a hook on it keeps ``dL/dgate`` of every backward
(the first-order loss change of removing each unit, CPD section III-C) at no extra pass.

Train mode: ``student.train()`` switches BatchNorm to batch statistics with running-stat
updates and turns dropout on, for both front-ends. The fx front-end keeps ``nn.Module``
calls, whose ``training`` flag does it. The torch.export front-end bakes the flag into
ATen arguments (``batch_norm(..., training, ...)``, ``dropout(x, p, train)``); the graph
is captured from a train-mode copy and :func:`set_graph_training` rewrites those literals
on every mode switch (``ExportedProgram.module().train()`` is not supported by torch).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from passes.gates import GATES, GatedGraph, apply_gate

__all__ = ["GatedStudent", "set_graph_training", "TRAINING_ARGS"]

_aten = torch.ops.aten
# ATen op -> index of its "training" positional argument.
TRAINING_ARGS: dict[Any, int] = {
    _aten.batch_norm.default: 5,
    _aten.dropout.default: 2,
    _aten.native_dropout.default: 2,
    _aten.feature_dropout.default: 2,
    _aten.alpha_dropout.default: 2,
    _aten.feature_alpha_dropout.default: 2,
}


# ATen attention ops whose dropout probability export bakes in (train: p, eval: 0.0).
ATTENTION_DROPOUT = {_aten.scaled_dot_product_attention.default: 4}
TRAIN_P = "fxprune_train_dropout_p"  # node.meta: the attention dropout p captured in train mode


def _set_attention_dropout(node: torch.fx.Node, mode: bool) -> int:
    """Attention dropout ``p`` to its train-mode value (kept in meta) or 0.0; 1 if changed."""
    index = ATTENTION_DROPOUT[node.target]
    in_args = len(node.args) > index
    p = node.args[index] if in_args else node.kwargs.get("dropout_p", 0.0)
    train_p = node.meta.setdefault(TRAIN_P, p)  # first seen: the captured (train-mode) value
    want = train_p if mode else 0.0
    if p == want:
        return 0
    if in_args:
        node.update_arg(index, want)
    else:
        node.update_kwarg("dropout_p", want)
    return 1


def set_graph_training(gm: torch.fx.GraphModule, mode: bool) -> int:
    """Set every module's ``training`` and every ATen training literal to ``mode``.

    Requires: a GraphModule (either front-end). Ensures: submodules' flags equal ``mode``;
    in-graph ``batch_norm``/``dropout`` training arguments equal ``mode``, and
    ``scaled_dot_product_attention``'s ``dropout_p`` is 0.0 in eval mode and its captured
    value in train mode (kept in ``node.meta["fxprune_train_dropout_p"]``); the graph is
    recompiled when a literal changed. Returns the number of literals changed. Mutates
    ``gm`` (call it on copies the pruner owns, never on the user's model).
    """
    for m in gm.modules():
        m.training = mode  # bypasses ExportedProgram's train() that raises
    changed = 0
    for node in gm.graph.nodes:
        index = TRAINING_ARGS.get(node.target) if node.op == "call_function" else None
        if index is not None and len(node.args) > index and node.args[index] is not mode:
            node.update_arg(index, mode)
            changed += 1
        if node.op == "call_function" and node.target in ATTENTION_DROPOUT:
            changed += _set_attention_dropout(node, mode)
    if changed:
        gm.recompile()
    return changed


class GatedStudent(nn.Module):
    """The gated student. ``forward`` computes the model with units masked by the gates.

    ``mask`` (property): the gate buffer, float 0/1 per unit label. ``recording=True``
    makes each backward deposit ``dL/dgate`` (float64, [units]) in ``pending_grads``.
    ``soft_mask``: None, or the learnable per-unit mask multiplied into the gates.
    """

    def __init__(self, gated: GatedGraph, *, export: bool, soft: bool = False) -> None:
        super().__init__()
        gm = gated.gm
        gates = gm._parameters.pop(GATES)
        gm.register_buffer(GATES, gates.detach().clone())
        self.gm = gm
        self.sites = gated.sites
        self.param_gates = gated.param_gates
        # learnable, so student.parameters() (and DDP's gradient sync) include it
        self.soft_mask = nn.Parameter(gates.detach().clone()) if soft else None
        self.export = export
        self.recording = False
        self.pending_grads: list[torch.Tensor] = []
        self._override: torch.Tensor | None = None
        n = len(gates)
        self._specs = [(fqn, dim, torch.as_tensor(np.where(lab < 0, n, lab)))
                       for fqn, dim, lab in gated.param_gates]

    @property
    def mask(self) -> torch.Tensor:
        return getattr(self.gm, GATES)

    def train(self, mode: bool = True) -> "GatedStudent":
        self.training = mode
        if self.export:
            set_graph_training(self.gm, mode)
        else:
            for m in self.gm.modules():
                m.training = mode
        return self

    def _record(self, grad: torch.Tensor) -> None:
        self.pending_grads.append(grad.detach().double().cpu())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        gates = self._override
        if gates is None:
            gates = self.mask
            if self.recording and torch.is_grad_enabled():
                gates = gates.detach().clone().requires_grad_(True)
                gates.register_hook(self._record)
        if self.soft_mask is not None:
            gates = gates * self.soft_mask.to(gates.dtype)
        params: dict[str, torch.Tensor] = {GATES: gates}
        for fqn, dim, index in self._specs:
            p = params.get(fqn, self.gm.get_parameter(fqn))
            params[fqn] = apply_gate(p, gates, index.to(gates.device), dim)
        return torch.func.functional_call(self.gm, params, args, kwargs)

    def with_gates(self, gates: torch.Tensor, fn: Callable[[nn.Module], Any]) -> Any:
        """``fn(self)`` with ``gates`` (e.g. a leaf that needs a graph) used instead of the mask."""
        self._override = gates
        try:
            return fn(self)
        finally:
            self._override = None
