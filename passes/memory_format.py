"""Channels-last weights for the convolutions (a layout rewrite: values are unchanged).

PyTorch's CPU convolution (oneDNN) computes in channels-last (NHWC) when its input *or*
its weight is channels-last, and then returns a channels-last output, which the next
convolution, BatchNorm, activation and add take as they are. So storing the weight of
every 2-D / 3-D convolution as ``torch.channels_last`` / ``torch.channels_last_3d``
moves the whole conv trunk to NHWC without touching the graph or the inputs (PyTorch's
"channels last memory format" tutorial: ``model.to(memory_format=torch.channels_last)``,
restricted here to conv weights, so that other 4-D tensors keep the strides the code
may ``view``). Shapes, dtypes and values are those of the source; only strides change.

Whether it is faster depends on the model and the backend (measured in
``benchmarks/latency.py --channels-last``; ``fxprune.bench.faster_memory_format``
measures it for one model). onnxruntime chooses its own layout, so this changes nothing
there.

Requires: an ``nn.Module``. Ensures: a new module (no tensor shared with the source)
whose conv weights are channels-last; ``check_memory_format`` proves that it computes
the source's outputs, in float64 and in the source's own dtype (a ``.view`` of a
channels-last activation that cannot be viewed raises there, naming the line).
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from fxprune.core.errors import RewriteError, VerificationError, exception_line
from passes.fold_bn import compare_outputs

__all__ = ["to_channels_last", "check_memory_format", "MEMORY_FORMATS"]

MEMORY_FORMATS = ("contiguous", "channels_last")
_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
_CONVS = (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


_CONV_FNS = {torch.conv2d, torch.conv3d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
             torch.convolution, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
             torch.ops.aten.convolution.default}


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` with every conv weight in channels-last strides.

    Conv weights are those of ``nn.Conv2d/3d`` (and transposed) modules and, in a
    GraphModule (a torch.export graph, a traced ``F.conv2d``), the parameters a conv node
    reads. ``module`` is not modified. Warns (``UserWarning``) when nothing was converted
    (no 2-D/3-D conv found: a 1-D conv has no channels-last layout; an eager module's
    ``F.conv2d`` on its own parameters is not seen). Raises ``RewriteError`` for a
    non-module."""
    if not isinstance(module, torch.nn.Module):
        raise RewriteError(f"to_channels_last needs an nn.Module, got {type(module).__name__}")
    out = copy.deepcopy(module)
    weights = {id(sub.weight): sub.weight for sub in out.modules()
               if isinstance(sub, _CONVS) and isinstance(getattr(sub, "weight", None),
                                                          torch.nn.Parameter)}
    if isinstance(out, torch.fx.GraphModule):
        for node in out.graph.nodes:
            if node.op == "call_function" and node.target in _CONV_FNS and len(node.args) > 1 \
                    and isinstance(node.args[1], torch.fx.Node) and node.args[1].op == "get_attr":
                t = _attr(out, node.args[1].target)
                if isinstance(t, torch.Tensor):
                    weights[id(t)] = t
    converted = 0
    for w in weights.values():
        if w.dim() in _FORMATS:
            # empty_like + copy_: canonical NHWC strides, also for 1x1 kernels (which
            # .contiguous(memory_format=) leaves as they are: both layouts at once)
            w.data = torch.empty_like(w.data, memory_format=_FORMATS[w.dim()]).copy_(w.data)
            converted += 1
    if not converted:
        warnings.warn(f"memory_format='channels_last' changed nothing in "
                      f"{type(module).__name__}: no 2-D/3-D conv weight found (nn.Conv2d/3d "
                      "modules, conv nodes of a GraphModule; 1-D convs have no channels-last "
                      "layout)", stacklevel=2)
    return out


def _attr(gm: torch.nn.Module, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def check_memory_format(source: torch.nn.Module, converted: torch.nn.Module, inputs: tuple,
                        *, rtol: float = 1e-9, atol: float = 1e-9) -> float:
    """Prove the layout rewrite: the max abs output difference in float64.

    Runs float64 copies of both models (neither is modified) on ``inputs`` and requires
    ``allclose(rtol, atol)``; then runs ``converted`` itself in its own dtype, on the
    inputs and on the batch doubled where the source takes it (a kernel or ``view`` that
    rejects the strides fails here, not in deployment; NHWC allows some views at batch 1
    only). Raises
    ``VerificationError`` naming the output, the difference, or the failing source line."""
    xs64 = tuple(x.double() if torch.is_tensor(x) and x.is_floating_point() else x
                 for x in inputs)
    a, b = copy.deepcopy(source).double(), copy.deepcopy(converted).double()  # keeps strides
    try:
        with torch.no_grad():
            try:
                ya, yb = a(*xs64), b(*xs64)
            except RuntimeError:  # a torch.export graph is specialised to its dtype
                rtol, atol = max(rtol, 1e-4), max(atol, 1e-5)
                ya, yb = source(*inputs), converted(*inputs)
            converted(*inputs)
            doubled = tuple(torch.cat([x, x]) if torch.is_tensor(x) and x.dim() else x
                            for x in inputs)
            if any(d is not x for d, x in zip(doubled, inputs)):
                try:  # NHWC strides allow some views at batch 1 only
                    source(*doubled)
                except Exception:  # noqa: BLE001 - the model itself takes one batch size
                    pass
                else:
                    converted(*doubled)
    except Exception as e:  # noqa: BLE001 - reported with the user's line
        raise VerificationError(
            f"memory_format='channels_last': the converted model does not run "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            f"{' at ' + exception_line(e) if exception_line(e) else ''}; remedy: "
            "memory_format=None (contiguous), or .contiguous() before that line") from e
    return compare_outputs(ya, yb, "memory_format='channels_last': output {i} differs from "
                           "the contiguous model", rtol=rtol, atol=atol)


def describe_formats(module: torch.nn.Module) -> dict[str, int]:
    """How many conv weights of ``module`` are channels-last vs contiguous."""
    out = {"channels_last": 0, "contiguous": 0}
    for sub in module.modules():
        w = getattr(sub, "weight", None)
        if isinstance(sub, _CONVS) and torch.is_tensor(w) and w.dim() in _FORMATS:
            nhwc = torch.empty_like(w, device="meta", memory_format=_FORMATS[w.dim()])
            key = "channels_last" if w.stride() == nhwc.stride() else "contiguous"
            out[key] += 1
    return out
