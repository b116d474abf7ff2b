"""A digest of a module's parameters and buffers: which tensors changed since it was taken.

``fxprune.compile`` records one on its result (``gm.meta["fxprune"]["state_digest"]``, or
``DIGESTS`` for a module output, which has no graph meta); ``fxprune.verify`` compares it
on failure, so that a model trained or run in train mode after compile (BatchNorm running
statistics, ``num_batches_tracked``) is reported as changed, not as an fxprune bug.
Per tensor: shape, dtype and ``torch.hash_tensor`` (xor of the values' bits: ~4 ms per
10M parameters on one thread; a float64 sum as well tripled that): a change that keeps
the xor is possible in principle, not from a training step.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

__all__ = ["DIGESTS", "state_digest", "changed_tensors"]

DIGESTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _digest(t: torch.Tensor) -> tuple:
    t = t.detach()
    if t.is_meta:
        return (tuple(t.shape), str(t.dtype))
    if not t.numel():
        return (tuple(t.shape), str(t.dtype))
    if t.is_complex():
        t = torch.view_as_real(t)
    bits = int(torch.hash_tensor(t).view(torch.int64))  # uint64: no int() of its own
    return (tuple(t.shape), str(t.dtype), bits)


def state_digest(module: torch.nn.Module) -> dict[str, tuple]:
    """``{name: digest}`` of every parameter and buffer of ``module``."""
    named: dict[str, Any] = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return {n: _digest(t) for n, t in named.items() if isinstance(t, torch.Tensor)}


def changed_tensors(module: torch.nn.Module, recorded: dict[str, tuple] | None) -> list[str]:
    """Names whose digest differs from ``recorded`` (added or gone ones too); [] when none
    was recorded."""
    if not recorded:
        return []
    now = state_digest(module)
    return sorted(n for n in now.keys() | recorded.keys() if now.get(n) != recorded.get(n))
