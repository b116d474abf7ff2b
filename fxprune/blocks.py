"""Layer pruning: find residual blocks, score them, remove them, check the result.

    analysis = fxprune.analyze(model, x)
    blocks = fxprune.find_blocks(analysis)                 # y = x + f(x), identity skips
    scores = fxprune.block_similarity(analysis, blocks, x) # cos(x, y): 1 = f adds nothing
    drop = [b for _, b in sorted(zip(scores, blocks), key=lambda t: -t[0])[:2]]
    small = fxprune.remove_blocks(analysis, drop)          # new GraphModule, y -> x
    fxprune.verify_blocks(analysis, small, drop, x)        # == the model with f(x) zeroed
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx

from fxprune.api import flat_tensors, run_recording
from fxprune.core.errors import RewriteError, VerificationError
from fxprune.core.groups import GroupAnalysis
from passes.find_blocks import Block
from passes.find_blocks import find_blocks as _find_blocks
from passes.mask import mask_blocks
from passes.remove_blocks import remove_blocks as _remove_blocks
from passes.shape_prop import propagate_shapes
from passes.record import record_values

__all__ = ["Block", "find_blocks", "block_similarity", "remove_blocks", "verify_blocks"]


def _graph(model: GroupAnalysis | torch.fx.GraphModule) -> torch.fx.GraphModule:
    if isinstance(model, GroupAnalysis):
        return model.gm
    if isinstance(model, torch.fx.GraphModule):
        return model
    raise TypeError("pass a GroupAnalysis (fxprune.analyze) or a GraphModule with shapes "
                    f"propagated, not {type(model).__name__}")


def find_blocks(model: GroupAnalysis | torch.fx.GraphModule, *,
                level: str = "layer") -> tuple[Block, ...]:
    """Residual blocks ``y = x + f(x)`` with an identity skip and a private branch.

    ``level="layer"`` merges chained blocks of one module (a transformer layer's attention
    and MLP); ``"branch"`` gives one block per residual add. Downsampling blocks (a conv on
    the skip) and branches whose activations are used elsewhere are not blocks.
    """
    return _find_blocks(_graph(model), level=level)


def block_similarity(model: GroupAnalysis | torch.fx.GraphModule, blocks: Sequence[Block],
                     inputs: Any) -> np.ndarray:
    """Mean over samples of cos(x, y) for each block (x, y flattened per sample).

    Close to 1: the block barely changes its input, removing it costs little (the
    "block influence" of ShortGPT is ``1 - similarity``). Runs a copy in eval mode.
    """
    gm = copy.deepcopy(_graph(model)).eval()
    wanted = {b.input for b in blocks} | {b.output for b in blocks}
    values = record_values(gm, _as_tuple(inputs), wanted)
    scores = []
    for b in blocks:
        x, y = values[b.input].double(), values[b.output].double()
        x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
        cos = torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-12)
        scores.append(float(cos.mean()))
    return np.asarray(scores)


def remove_blocks(model: GroupAnalysis | torch.fx.GraphModule, blocks: Sequence[Block], *,
                  example_inputs: Any = None) -> torch.fx.GraphModule:
    """A new GraphModule without ``blocks``; the source is untouched.

    With an analysis (or ``example_inputs``) shapes are re-propagated on the result: a
    block whose removal would change a shape raises ``RewriteError``.
    """
    gm = _graph(model)
    small = _remove_blocks(gm, blocks)
    inputs = example_inputs if example_inputs is not None else (
        model.example_inputs if isinstance(model, GroupAnalysis) else None)
    if inputs is not None:
        try:
            propagate_shapes(small, _as_tuple(inputs))
        except Exception as exc:
            raise RewriteError(f"the graph without blocks {[b.name for b in blocks]} does "
                               f"not run: {exc}") from exc
    return small


def verify_blocks(model: GroupAnalysis | torch.fx.GraphModule, pruned: torch.nn.Module,
                  blocks: Sequence[Block], inputs: Any, *, rtol: float = 1e-6) -> float:
    """``pruned(x)`` == the original with every removed branch zeroed, in float64.

    Returns the relative error; raises ``VerificationError`` above ``rtol``.
    """
    inputs = _as_tuple(inputs)
    oracle = mask_blocks(_graph(model), blocks)
    want, got = _run64(oracle, inputs), _run64(pruned, inputs)
    if [t.shape for t in want] != [t.shape for t in got]:
        raise VerificationError(f"output shapes differ: {[tuple(t.shape) for t in got]} vs "
                                f"{[tuple(t.shape) for t in want]} (blocks removed)")
    scale = max((float(t.abs().max()) for t in want if t.numel()), default=0.0) or 1.0
    err = max((float((a - b).abs().max()) for a, b in zip(got, want) if a.numel()),
              default=0.0) / scale
    if err > rtol:
        raise VerificationError(f"removing blocks {[b.name for b in blocks]}: relative error "
                                f"{err:.3g} against the model with their branches zeroed "
                                f"(tol {rtol:.3g}). This is an fxprune bug: please report it.")
    return err


# ----------------------------------------------------------------------------------
def _as_tuple(x: Any) -> tuple:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _run64(gm: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """Outputs of a float64 copy (dtype literals too: exported graphs cast explicitly)."""
    return flat_tensors(run_recording(gm, inputs, record=False)[0])

