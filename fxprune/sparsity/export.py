"""Export of sparse models: dense-with-zeros always; 2:4 to cuSPARSELt/CUTLASS on GPUs.

* Dense with zeros: :func:`fxprune.sparsify` already returns a plain module whose weights
  hold exact zeros, so ``state_dict()``, ``torch.export`` and ONNX export work unchanged
  (and give no speedup: dense kernels multiply the zeros).
* 2:4: :func:`to_semi_structured` swaps each planned ``nn.Linear`` weight for
  ``torch.sparse.to_sparse_semi_structured(weight)`` (half the values plus 2-bit
  indices). This runs on CUDA GPUs of compute capability >= 8.0 with fp16/bf16 weights.
* CSR/BSR: :func:`storage_bytes` reports the memory of compressed storage; on CPU
  ``torch.sparse`` CSR matmul is slower than dense matmul at 50-90% sparsity
  (``benchmarks/sparsity.py`` measures it), so fxprune does not convert to CSR.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from fxprune.core.errors import SparsityError
from fxprune.sparsity.plan import SparsityPlan

__all__ = ["semi_structured_support", "to_semi_structured", "storage_bytes"]


def semi_structured_support() -> str | None:
    """None when 2:4 kernels can run here, else the reason they cannot."""
    if not torch.cuda.is_available():
        return "2:4 semi-structured kernels need a CUDA GPU; torch sees none"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        return (f"2:4 semi-structured kernels need compute capability >= 8.0; this GPU has "
                f"{major}.{minor}")
    return None


def to_semi_structured(model: nn.Module, plan: SparsityPlan) -> nn.Module:
    """A copy of ``model`` (CUDA, fp16/bf16) with 2:4 linear weights stored semi-structured.

    Requires: ``plan`` is a ``"2:4"`` plan already applied to ``model``; a CUDA GPU of
    compute capability >= 8.0. Raises :class:`SparsityError` naming what is missing.
    """
    why = semi_structured_support()
    if why is not None:
        raise SparsityError(f"{why}: export dense-with-zeros instead (state_dict / "
                            "torch.export), or run on an Ampere-or-newer GPU")
    if plan.pattern_nm != (2, 4):
        raise SparsityError(f"to_semi_structured needs a 2:4 plan, not "
                            f"{plan.meta.get('pattern')!r}: sparsify(..., pattern='2:4')")
    from torch.sparse import to_sparse_semi_structured

    out = copy.deepcopy(model)
    for fqn in plan.masks:
        path, _, name = fqn.rpartition(".")
        module = out.get_submodule(path) if path else out
        w = getattr(module, name)
        if not isinstance(module, nn.Linear):
            raise SparsityError(f"{fqn!r} belongs to {type(module).__name__}; semi-structured "
                                "kernels serve nn.Linear only: ignore=[...] it when planning")
        if not w.is_cuda or w.dtype not in (torch.float16, torch.bfloat16):
            raise SparsityError(f"{fqn!r} is {w.dtype} on {w.device}: move the model to CUDA "
                                "in float16 or bfloat16 first (model.half().cuda())")
        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(w.detach()),
                                         requires_grad=False)
        except (RuntimeError, ValueError) as exc:
            raise SparsityError(f"{fqn!r} of shape {tuple(w.shape)} cannot be stored 2:4: "
                                f"{exc}") from exc
    return out


def storage_bytes(model: nn.Module, plan: SparsityPlan) -> dict[str, int]:
    """Bytes of the planned weights: dense, CSR (torch's layout), 2:4 compressed (formula).

    CSR: values + int64 column indices + int64 row pointers of ``w.reshape(out, -1)``.
    2:4: half the values plus 2 bits of index per kept value (cuSPARSELt metadata).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    dense = csr = semi = 0
    for fqn in plan.masks:
        w = params[fqn].detach()
        item = w.element_size()
        dense += w.numel() * item
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
            m = w.reshape(w.shape[0], -1).to_sparse_csr()
        csr += (m.values().numel() * item + m.col_indices().numel() * 8
                + m.crow_indices().numel() * 8)
        semi += w.numel() // 2 * item + w.numel() // 2 * 2 // 8
    return {"dense": dense, "csr": csr, "semi_structured_2_4": semi}
