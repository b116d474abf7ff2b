"""What fxprune records on a ``GraphModule`` it captured or rewrote: one dict,
``gm.meta["fxprune"]``, with a fixed set of keys (a misspelt key is a ``KeyError``,
not a silent miss). ``copy.deepcopy`` of a GraphModule copies it.

Keys:
    ``frontend``: ``"fx"``, ``"export"`` or ``"record"``, the front-end that captured the graph
    (``fxprune.capture``).
    ``specialised``: for ``"record"`` captures, one ``(kind, source line, value, node
    name)`` per point where Python read a traced value (``bool`` of a branch, ``.item()``,
    ``int``): the graph holds that one path (``fxprune.record``).
    ``fallback_reason``: why ``frontend="auto"`` fell back to export (the fx failure).
    ``masked_value``: ``{node name: name of its masked value}`` (``passes.mask``).
    ``tokens``: the ``TokenSchedule`` of a token-reduced graph (``passes.token_merge``).
    ``attention_scale``: ``"original"`` or ``"recompute"``, how ``slice_weights`` wrote
    softmax scales of pruned heads.
    ``bn_folds``: ``[(conv node, BatchNorm node)]`` that ``passes.fold_bn`` folded away
    (``fxprune.verify`` then checks the slicing on the unfolded graph and the fold with
    ``check_fold``).
    ``state_digest``: ``{tensor name: digest}`` of every parameter and buffer of a
    ``fxprune.compile`` result as compiled (``fxprune.core.digest``): verify names the
    tensors changed since (training, a train-mode forward updating BatchNorm statistics).
    ``other_modes``: ``{mode: {"modules", "analysed", "why"}}``, where the captured graph
    left parameterised submodules unrun: the submodules only that mode runs, whether its
    graph was analysed with the captured one (``fxprune.capture.capture_other_modes``)
    and, when not, why.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["META_KEY", "KEYS", "get_meta", "set_meta"]

META_KEY = "fxprune"
KEYS = frozenset({"frontend", "specialised", "fallback_reason", "masked_value", "tokens", "attention_scale",
                  "other_modes", "bn_folds", "state_digest"})


def _check(key: str) -> None:
    if key not in KEYS:
        raise KeyError(f"{key!r} is not an fxprune graph meta key (one of {sorted(KEYS)})")


def get_meta(gm: Any, key: str, default: Any = None) -> Any:
    """``gm.meta["fxprune"][key]``, or ``default`` when unset (or ``gm`` has no meta:
    a plain ``nn.Module``)."""
    _check(key)
    meta = getattr(gm, "meta", None)
    return (meta.get(META_KEY) or {}).get(key, default) if isinstance(meta, dict) else default


def set_meta(gm: torch.fx.GraphModule, key: str, value: Any) -> None:
    """Record ``value`` under ``gm.meta["fxprune"][key]``."""
    _check(key)
    gm.meta.setdefault(META_KEY, {})[key] = value
