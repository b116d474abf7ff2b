"""``SparsityPlan``: which single weights are zero, bit-packed, bound to one graph.

A plan maps each sparsified parameter FQN to a keep-mask (``True``: the weight stays),
stored as ``numpy.packbits`` of the flattened mask (one bit per weight, little bit order)
and base64 in JSON. Like :class:`fxprune.Plan` it carries the fingerprint of the graph it
was made on (``passes.find_groups.graph_fingerprint``) and ``check(analysis)`` refuses
another graph.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fxprune.core.errors import PlanError, SparsityError

__all__ = ["PackedMask", "SparsityPlan", "SPARSITY_PLAN_VERSION"]

SPARSITY_PLAN_VERSION = 1


@dataclass(frozen=True)
class PackedMask:
    """A keep-mask of ``shape`` as packed bits (``numel / 8`` bytes, rounded up)."""

    shape: tuple[int, ...]
    bits: bytes = field(repr=False)

    @classmethod
    def from_tensor(cls, keep: torch.Tensor) -> "PackedMask":
        flat = keep.detach().reshape(-1).to(torch.bool).cpu().numpy()
        return cls(tuple(keep.shape), np.packbits(flat, bitorder="little").tobytes())

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def tensor(self) -> torch.Tensor:
        """The keep-mask as a ``torch.bool`` tensor of ``shape``."""
        flat = np.unpackbits(np.frombuffer(self.bits, dtype=np.uint8), count=self.numel,
                             bitorder="little").astype(bool)
        return torch.from_numpy(flat).reshape(self.shape)

    @property
    def kept(self) -> int:
        return int(self.tensor().sum())

    @property
    def sparsity(self) -> float:
        """Fraction of the weights the mask zeroes."""
        return 1.0 - self.kept / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityPlan:
    """Per-parameter keep-masks for ``fingerprint``'s graph, with how they were made.

    ``meta`` holds ``sparsity`` (requested), ``pattern`` (``"unstructured"`` or
    ``"N:M"``), ``scope``, ``criterion`` and, for N:M, the run layout. ``pattern_nm``
    is ``(N, M)`` or None.
    """

    fingerprint: str
    masks: dict[str, PackedMask]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def pattern_nm(self) -> tuple[int, int] | None:
        p = self.meta.get("pattern", "unstructured")
        if p == "unstructured":
            return None
        n, m = p.split(":")
        return int(n), int(m)

    def mask(self, fqn: str) -> torch.Tensor:
        if fqn not in self.masks:
            raise SparsityError(f"the plan has no mask for {fqn!r}; it covers "
                                f"{sorted(self.masks)[:8]}")
        return self.masks[fqn].tensor()

    @property
    def num_weights(self) -> int:
        return sum(m.numel for m in self.masks.values())

    @property
    def sparsity(self) -> float:
        """Realised fraction of zeroed weights over all sparsified parameters."""
        total = self.num_weights
        return sum(m.numel - m.kept for m in self.masks.values()) / total if total else 0.0

    def check(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise PlanError(f"sparsity plan was made for graph {self.fingerprint}, not "
                            f"{fingerprint}: make a new plan for this model (fxprune.sparsify)")

    def to_json(self) -> str:
        return json.dumps({
            "version": SPARSITY_PLAN_VERSION, "fingerprint": self.fingerprint,
            "meta": self.meta,
            "masks": {k: {"shape": list(m.shape), "bits": base64.b64encode(m.bits).decode()}
                      for k, m in self.masks.items()}})

    @classmethod
    def from_json(cls, text: str) -> "SparsityPlan":
        data = json.loads(text)
        if data.get("version") != SPARSITY_PLAN_VERSION:
            raise PlanError(f"sparsity plan version {data.get('version')!r} is not "
                            f"{SPARSITY_PLAN_VERSION}: re-create it with this fxprune")
        masks = {k: PackedMask(tuple(v["shape"]), base64.b64decode(v["bits"]))
                 for k, v in data["masks"].items()}
        for k, m in masks.items():
            if len(m.bits) != (m.numel + 7) // 8:
                raise PlanError(f"mask of {k!r}: {len(m.bits)} bytes for {m.numel} weights")
        return cls(data["fingerprint"], masks, data.get("meta", {}))
