"""Recurrent layers: nn.RNN / nn.GRU / nn.LSTM as stop ops with gated structure.

Gate rows of ``weight_ih_l{k}`` / ``weight_hh_l{k}`` are blocked as (gates, hidden): a unit
is one hidden index across every gate, the matching ``weight_hh`` column, and the output
feature. ``hidden_size`` is shared by all layers and directions, so their hidden units
are coupled index by index (counts stay equal). Removed units stay exactly zero in the
masked model (zero gate rows and recurrent columns), so these groups are exact.
"""
from __future__ import annotations

import numpy as np
import torch.nn as nn

from passes.rules.registry import (Contractions, MacContext, RuleContext, Terms, contractions,
                                   macs, module_fixup, rule)

_GATES = {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4}


def _gates(m: nn.Module) -> int:
    return next(g for t, g in _GATES.items() if isinstance(m, t))


@rule(nn.RNN, nn.GRU, nn.LSTM, stop=True)
def recurrent(ctx: RuleContext) -> None:
    """Input features -> layer-0 ih columns; hidden units -> output features (x directions)."""
    m = ctx.module
    x = ctx.arg(0, "input")
    dims = dict(ctx.dims(x) or {})
    last = len(ctx.shape(x)) - 1
    out_shape = ctx.out_shape
    if getattr(m, "proj_size", 0) or len(ctx.node.args) > 1 or "hx" in ctx.node.kwargs:
        ctx.pin_info(dims, "recurrent layer with projections or an initial state")
        ctx.set(_tree_of_empty(out_shape))
        return
    gates, dirs = _gates(m), 2 if m.bidirectional else 1
    features = dims.pop(last, None)
    hidden = None
    for layer in range(m.num_layers):
        for suffix in ("", "_reverse")[:dirs]:
            tag = f"l{layer}{suffix}"
            rows = ctx.module_tensor(f"weight_ih_{tag}", 0, "out").reshape(gates, -1)
            ctx.union(rows[:1], rows)
            units = rows[0]
            for name, role in ((f"weight_hh_{tag}", "out"), (f"bias_ih_{tag}", "dep"),
                               (f"bias_hh_{tag}", "dep")):
                t = ctx.module_tensor(name, 0, role)
                if t is not None:
                    ctx.union(t.reshape(gates, -1), units[None, :])
            ctx.union(ctx.module_tensor(f"weight_hh_{tag}", 1, "in"), units)
            hidden = units if hidden is None else hidden
            ctx.union(hidden, units)
            cols = ctx.module_tensor(f"weight_ih_{tag}", 1, "in")
            if layer == 0:
                ctx.link(features, cols, "recurrent input features untracked")
            else:
                ctx.union(cols, np.tile(hidden, dirs))
    for axis, units in dims.items():
        ctx.pin(units, "recurrence mixes this dim")
    state = {len(out_shape[1][0] if isinstance(out_shape[1][0], tuple) else out_shape[1]) - 1: hidden}
    out = {last: np.tile(hidden, dirs)}
    ctx.set((out, (state, dict(state)) if isinstance(m, nn.LSTM) else state))


@contractions(nn.RNN, nn.GRU, nn.LSTM)
def recurrent_contractions(ctx: MacContext) -> Contractions:
    """Input features with the layer-0 ih columns; the hidden units are consumed inside
    (the recurrence, later layers), so they are gated on their rows."""
    return [((ctx.arg(0, "input"), -1),)]


def _tree_of_empty(shape):
    if shape is None:
        return None
    if all(isinstance(s, int) for s in shape):
        return {}
    return tuple(_tree_of_empty(s) for s in shape)


@module_fixup(nn.RNN, nn.GRU, nn.LSTM)
def fix_recurrent(m: nn.Module) -> None:
    """``input_size`` / ``hidden_size`` from the sliced layer-0 weights."""
    m.input_size = m.weight_ih_l0.shape[1]
    m.hidden_size = m.weight_hh_l0.shape[1]
    m._flat_weights = [getattr(m, n) if hasattr(m, n) else None for n in m._flat_weights_names]


# -- MAC scaling (cost model) -------------------------------------------------------
@macs(nn.RNN, nn.GRU, nn.LSTM)
def recurrent_macs(ctx: MacContext) -> Terms:
    """Per step, each weight matrix costs rows x columns: MACs split over the ih / hh
    matrices by size, each shrinking with its kept rows and columns."""
    m = ctx.module
    terms: Terms = []
    for name in m._flat_weights_names:
        w = getattr(m, name, None)
        if name.startswith("weight_") and w is not None:
            fqn = f"{ctx.node.target}.{name}"
            axes = [a for a in (ctx.param_axis(fqn, 0), ctx.param_axis(fqn, 1)) if a is not None]
            terms.append((float(w.numel()), axes))
    return terms or [(1.0, ctx.out_axes())]
