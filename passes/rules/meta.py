"""What rules read from ``node.meta``: the shapes recorded by ``propagate_shapes``.

Part of the op-rules layer so that rules (and the cost model's MAC rules) read shapes
without importing a pass.
"""
from __future__ import annotations

from typing import Any

import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata

__all__ = ["tensor_shapes"]


def tensor_shapes(node: torch.fx.Node) -> Any:
    """Shape (tuple) of a tensor node, a nested tuple of shapes, or None."""
    return _shapes(node.meta.get("tensor_meta"))


def _shapes(meta: Any) -> Any:
    if meta is None:
        return None
    if isinstance(meta, TensorMetadata):
        return tuple(int(s) for s in meta.shape)
    if isinstance(meta, (tuple, list)):
        return tuple(_shapes(m) for m in meta)
    return None
