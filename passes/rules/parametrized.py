"""Parametrized weights: a module attribute computed from other tensors at every call.

``torch.nn.utils.parametrize`` (``weight_norm``, ``spectral_norm``, ``orthogonal``, user
parametrizations) makes ``module.weight`` a property over
``module.parametrizations.weight.original*``; ``torch.nn.utils.prune`` recomputes
``module.weight`` from ``weight_orig * weight_mask`` in a forward pre-hook. The derived
tensor is not what must be sliced: the tensors it is computed from are.

- ``weight_norm`` (``_WeightNorm``, w = g * v / ||v|| over every dim but ``dim``): slicing
  ``dim`` slices ``v`` and ``g`` together and commutes with the norm (exact); slicing any
  other dim changes ``||v||`` (inexact, kind "statistics").
- anything else (spectral_norm: sigma of the whole matrix; user parametrizations; the
  prune hook, whose stale ``weight`` attribute the hook overwrites): the dims are pinned
  with a reason naming the remedy, and the rest of the model prunes.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

NOT_DERIVED = object()  # ``derived_units`` result for an ordinary tensor


def derived_units(ctx: Any, fqn: str, dim: int, role: str) -> Any:
    """Units for dim ``dim`` of a derived tensor ``fqn``, or ``NOT_DERIVED``."""
    owner_path, _, name = fqn.rpartition(".")
    try:
        owner = ctx.state.gm.get_submodule(owner_path)
    except AttributeError:
        return NOT_DERIVED
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(owner, name):
        return _parametrized(ctx, owner, owner_path, name, dim, role)
    if isinstance(getattr(owner, name + "_orig", None), torch.nn.Parameter) and \
            isinstance(getattr(owner, name + "_mask", None), torch.Tensor):
        return _pinned(ctx, f"{owner_path}.{name}_orig", getattr(owner, name + "_orig"), dim,
                       f"{fqn} is recomputed by a torch.nn.utils.prune hook; remedy: "
                       f"torch.nn.utils.prune.remove(module, {name!r}) before fxprune")
    return NOT_DERIVED


def _parametrized(ctx: Any, owner: torch.nn.Module, path: str, name: str, dim: int,
                  role: str) -> np.ndarray:
    from torch.nn.utils.parametrizations import _WeightNorm

    plist = owner.parametrizations[name]
    base = f"{path}.parametrizations.{name}"
    if len(plist) == 1 and isinstance(plist[0], _WeightNorm):
        v = ctx.tensor_units(f"{base}.original1", dim, role)
        norm_dim = plist[0].dim
        if norm_dim is not None and norm_dim != -1 and dim == norm_dim % plist.original1.dim():
            ctx.union(v, ctx.tensor_units(f"{base}.original0", dim, "dep"))
        else:
            ctx.inexact(v, f"weight_norm of {path}.{name} normalises over this dim")
        return v
    kinds = ", ".join(type(p).__name__ for p in plist)
    original = getattr(plist, "original", None)
    return _pinned(ctx, f"{base}.original", original, dim,
                   f"{path}.{name} is parametrized ({kinds}), which fxprune cannot slice "
                   "through; remedy: torch.nn.utils.parametrize.remove_parametrizations("
                   f"module, {name!r})")


def _pinned(ctx: Any, fqn: str, tensor: torch.Tensor | None, dim: int,
            reason: str) -> np.ndarray | None:
    """Units of the underlying tensor's dim, pinned with ``reason`` (shown by pins())."""
    if tensor is None or tensor.dim() <= dim:
        return None
    units = ctx.tensor_units(fqn, dim, "dep")
    ctx.pin(units, reason)
    return units
