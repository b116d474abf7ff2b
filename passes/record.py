"""Measurement helper: the values of chosen nodes on real inputs.

Requires: a GraphModule and inputs it runs on.
Ensures: ``{node name: detached tensor}`` for every wanted node whose value is a tensor,
computed under ``torch.no_grad()`` by ``torch.fx.Interpreter``; the module is not changed.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx

__all__ = ["record_values"]


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out


def record_values(gm: torch.fx.GraphModule, inputs: tuple, wanted: set[str]) -> dict:
    """Run ``gm`` on ``inputs`` and keep the tensor values of the ``wanted`` node names."""
    rec = _Recorder(gm, wanted)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.values
