"""Keep-masks from scores: unstructured (per layer, per output row, global) and N:M.

Unstructured: in every *scope* (one parameter, one output row, or all selected
parameters together) exactly ``round(sparsity * n)`` weights with the lowest scores are
zeroed; ties go to the lower flat index (stable sort), so the realised fraction is the
requested one to within half an element per scope.

N:M: the *reduction dim* is the one a matrix product sums over: dim 1 of a linear weight
``[out, in]``; for a convolution ``[out, in/groups, *kernel]`` the input channels, one run
of ``M`` consecutive channels for each output and kernel position (NVIDIA ASP's layout
for cuDNN); dim 0 of a 1-D weight; the last dim otherwise (an embedding's features). In
each run the ``N`` highest scores are kept.
"""
from __future__ import annotations

import math

import torch

from fxprune.core.errors import PatternError, SparsityError

__all__ = ["parse_pattern", "unstructured_masks", "nm_mask", "runs_view", "check_nm",
           "reduction_dim"]


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> ``(N, M)`` with 0 < N < M."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in str(pattern).split(":"))
    except ValueError:
        raise PatternError(f"pattern {pattern!r} is neither 'unstructured' nor 'N:M' with "
                           "integers, e.g. '2:4'") from None
    if not 0 < n < m:
        raise PatternError(f"pattern {pattern!r}: need 0 < N < M (N kept of every M); "
                           "e.g. '2:4' keeps 2 of 4")
    return n, m


def reduction_dim(w: torch.Tensor, is_conv: bool) -> int:
    if w.dim() == 1:
        return 0
    return 1 if (is_conv or w.dim() == 2) else w.dim() - 1


def runs_view(t: torch.Tensor, m: int, is_conv: bool, fqn: str) -> torch.Tensor:
    """``t`` as ``[..., runs, M]`` with each run M consecutive weights of the reduction dim."""
    dim = reduction_dim(t, is_conv)
    if t.shape[dim] % m:
        raise PatternError(
            f"layer {fqn!r}: reduction dim {dim} has {t.shape[dim]} weights, not a multiple "
            f"of M={m}; exclude it (ignore=[{fqn!r}]) or use pattern='unstructured'")
    moved = t.movedim(dim, -1)
    return moved.reshape(moved.shape[:-1] + (t.shape[dim] // m, m))


def _from_runs(runs: torch.Tensor, like: torch.Tensor, is_conv: bool) -> torch.Tensor:
    dim = reduction_dim(like, is_conv)
    moved_shape = like.movedim(dim, -1).shape
    return runs.reshape(moved_shape).movedim(-1, dim)


def nm_mask(scores: torch.Tensor, n: int, m: int, is_conv: bool, fqn: str) -> torch.Tensor:
    """Keep the ``n`` highest scores of every run of ``m`` (ties: the earlier weight)."""
    runs = runs_view(scores, m, is_conv, fqn)
    order = torch.argsort(-runs, dim=-1, stable=True)
    keep = torch.zeros_like(runs, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return _from_runs(keep, scores, is_conv)


def check_nm(weight: torch.Tensor, n: int, m: int, is_conv: bool, fqn: str) -> int:
    """Number of runs of ``weight`` with more than ``n`` non-zeros (0: the pattern holds)."""
    runs = runs_view(weight != 0, m, is_conv, fqn)
    return int((runs.sum(-1) > n).sum())


def _lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep


def unstructured_masks(scores: dict[str, torch.Tensor], sparsity: float,
                       scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks zeroing ``round(sparsity * n)`` lowest scores per scope."""
    if scope == "layer":
        return {k: _lowest(s.reshape(-1), round(sparsity * s.numel())).reshape(s.shape)
                for k, s in scores.items()}
    if scope == "row":
        out = {}
        for k, s in scores.items():
            rows = s.reshape(s.shape[0], -1) if s.dim() > 1 else s.reshape(1, -1)
            kk = round(sparsity * rows.shape[1])
            keep = torch.ones_like(rows, dtype=torch.bool)
            if kk:
                keep.scatter_(1, torch.argsort(rows, dim=1, stable=True)[:, :kk], False)
            out[k] = keep.reshape(s.shape)
        return out
    if scope == "global":
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        keep = _lowest(flat, round(sparsity * flat.numel()))
        out, start = {}, 0
        for k, s in scores.items():
            out[k] = keep[start:start + s.numel()].reshape(s.shape)
            start += s.numel()
        return out
    raise SparsityError(f"scope must be 'layer', 'row' or 'global', not {scope!r}")


def check_fraction(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and math.isfinite(sparsity)
            and 0.0 <= sparsity < 1.0):
        raise SparsityError(f"sparsity {sparsity!r} must be in [0, 1): the fraction of the "
                            "selected weights to zero (1.0 would zero every weight)")
