"""Dense FLOP counts per FX node, as ``torch.utils.flop_counter.FlopCounterMode`` counts
them, on fake tensors (no compute; works on ``meta`` models).

Requires: a GraphModule and example inputs (real, meta or fake). Ensures: ``{node name:
FLOPs}`` for every call node; the module's ``training`` flags are restored.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from passes.shape_prop import eval_mode

__all__ = ["node_flops"]


# ----------------------------------------------------------------------------------
# Dense counts
# ----------------------------------------------------------------------------------
class _FlopRecorder(torch.fx.Interpreter):
    """Runs a graph on fake tensors and records ``FlopCounterMode``'s total per node."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.flops: dict[str, int] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op not in ("call_module", "call_function", "call_method"):
            return super().run_node(n)
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        self.flops[n.name] = int(counter.get_total_flops())
        return result


def node_flops(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, int]:
    """FLOPs of every call node as ``FlopCounterMode`` counts them (fake tensors, eval mode)."""
    device = next((t.device for t in gm.parameters()), None)
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            t = mode.from_tensor(x.to("meta") if device is not None and device.type == "meta"
                                 else x)
            return t.requires_grad_(True) if t.is_floating_point() else t
        return x

    # Grad enabled and inputs requiring grad: inference fast paths (nn.MultiheadAttention's
    # fused kernel) would hide their matmuls from FlopCounterMode.
    recorder = _FlopRecorder(gm)
    with eval_mode(gm), torch.enable_grad(), mode:
        recorder.run(*[fake(x) for x in example_inputs])
    return recorder.flops
