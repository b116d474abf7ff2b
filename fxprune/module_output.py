"""``compile(..., output="module")``: the user's own class, and its Hugging Face config.

The steps appended to ``fxprune.compile``'s pipeline: ``slice_module`` (a deep copy of
the user's model holding the GraphModule's sliced tensors, proven equal to it in float64)
and, for Hugging Face models, ``update_config``: attention modules' size attributes
(``num_heads``, ``head_dim``, ``split_size``, ``all_head_size``...) and the model's
``config`` (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``intermediate_size``, ``hidden_size``) follow the sliced weights. A plan that keeps
different sizes in different layers cannot be written into one config: such a model
runs, but its ``save_pretrained`` raises ``NonUniformPlanError``.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from fxprune.errors import NonUniformPlanError
from fxprune.graph_meta import get_meta
from fxprune.groups import GroupAnalysis
from fxprune.pipeline import Step
from fxprune.plan import Plan
from passes.slice_module import check_module_output, slice_module

__all__ = ["module_steps", "update_hf_config", "hf_sizes"]

# (query, key, value) projection names of the attention families we know; a fused qkv
# projection (GPT-2's c_attn) is split in thirds.
_QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
_FUSED = ("c_attn",)
_MLP_UP = ("up_proj", "fc1", "c_fc", "wi", "dense_h_to_4h")


def module_steps(model: torch.nn.Module, analysis: GroupAnalysis, kept: np.ndarray,
                 plan: Plan, *, check: bool = True) -> list[Step]:
    """The pipeline steps that turn the pruned GraphModule into the user's class."""

    def sliced_module(pruned: torch.fx.GraphModule) -> torch.nn.Module:
        small = slice_module(model, analysis, kept, pruned, check=False)
        if _is_hf(small):
            update_hf_config(small, model)
        if check:
            if get_meta(analysis.gm, "specialised"):  # one recorded path: small must take it
                from fxprune.record import check_recorded_path
                check_recorded_path(model, small, analysis, kept)
            check_module_output(small, pruned, analysis)
        return small

    return [Step("slice_module", sliced_module)]


def _is_hf(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "to_dict") and hasattr(model, "save_pretrained")


def _linear_out(m: torch.nn.Module) -> int:
    """Output features of an ``nn.Linear`` or of transformers' ``Conv1D`` (weight in x out)."""
    w = m.weight
    return w.shape[0] if isinstance(m, torch.nn.Linear) else w.shape[1]


def hf_sizes(model: torch.nn.Module, original: torch.nn.Module) -> list[dict[str, int]]:
    """Per attention layer of ``model``: query heads, kv heads, head_dim and the path,
    read from the sliced projections; the unit (heads or head_dim) that shrank is found
    by comparing with the same layer of ``original``."""
    cfg = original.config
    heads0 = cfg.num_attention_heads
    kv0 = getattr(cfg, "num_key_value_heads", None) or heads0
    hd0 = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads0
    out = []
    for path, m in model.named_modules():
        names = next((t for t in _QKV if all(hasattr(m, n) for n in t)), None)
        if names is not None:
            q, k = _linear_out(getattr(m, names[0])), _linear_out(getattr(m, names[1]))
        elif any(isinstance(getattr(m, n, None), torch.nn.Module) for n in _FUSED) and \
                hasattr(m, "num_heads"):
            q = k = _linear_out(getattr(m, _FUSED[0])) // 3
        else:
            continue
        if q % hd0 == 0 and k % hd0 == 0:
            heads, kv, hd = q // hd0, k // hd0, hd0  # whole heads removed (or none)
        else:
            heads, kv, hd = heads0, kv0, q // heads0  # head_dim shrank in every head
        # an ambiguous reading (q a multiple of both) is caught by check_module_output
        out.append({"path": path, "heads": heads, "kv_heads": kv, "head_dim": hd})
    return out


def update_hf_config(small: torch.nn.Module, original: torch.nn.Module) -> None:
    """Size attributes of ``small``'s attention modules and its ``config`` follow its
    sliced weights; a config that cannot describe every layer disables ``save_pretrained``
    (``NonUniformPlanError``)."""
    layers = hf_sizes(small, original)
    for m in small.modules():  # transformers' Conv1D (GPT-2) reads its width ``nf``
        if type(getattr(m, "nf", None)) is int and getattr(m, "weight", None) is not None \
                and m.weight.dim() == 2:
            m.nf = m.weight.shape[1]
    for layer in layers:
        _set_attention_attributes(small.get_submodule(layer["path"]), layer)
    mlp = {_linear_out(m) for path, m in small.named_modules()
           if (path.rpartition(".")[2] in _MLP_UP or path.endswith("intermediate.dense"))
           and hasattr(m, "weight")}  # BERT-family MLPs are ``intermediate.dense``
    emb = small.get_input_embeddings() if hasattr(small, "get_input_embeddings") else None
    values = {"num_attention_heads": {l["heads"] for l in layers},
              "num_key_value_heads": {l["kv_heads"] for l in layers},
              "head_dim": {l["head_dim"] for l in layers}, "intermediate_size": mlp,
              "hidden_size": {emb.weight.shape[1]} if emb is not None else set()}
    spread = {k: sorted(v) for k, v in values.items() if len(v) > 1}
    cfg = small.config
    derived = getattr(cfg, "head_dim", None) is None  # BERT, GPT-2: head_dim = hidden // heads
    if not spread and derived and all(len(v) == 1 for k, v in values.items()
                                      if k in ("head_dim", "num_attention_heads", "hidden_size")):
        (hd,), (h,), (hid,) = (values[k] for k in ("head_dim", "num_attention_heads",
                                                   "hidden_size"))
        if hd * h != hid:
            spread["head_dim x heads != hidden_size"] = [hd * h, hid]
    if spread:
        detail = ", ".join(f"{k} in {v}" for k, v in spread.items())
        small.save_pretrained = functools.partial(_refuse_save, detail)  # instance only
        return
    aliases = {"intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
               "num_attention_heads": ("num_attention_heads", "n_head"),
               "hidden_size": ("hidden_size", "n_embd", "d_model")}
    for key, (value,) in ((k, tuple(v)) for k, v in values.items() if v):
        if key == "num_key_value_heads" and not hasattr(cfg, key):
            continue
        if key == "head_dim" and derived:
            continue
        for name in aliases.get(key, (key,)):
            if name in cfg.to_dict() or hasattr(type(cfg), name):
                try:
                    setattr(cfg, name, value)
                except AttributeError:
                    continue


def _set_attention_attributes(m: torch.nn.Module, layer: dict[str, int]) -> None:
    heads, kv, hd = layer["heads"], layer["kv_heads"], layer["head_dim"]
    table = {"num_heads": heads, "num_attention_heads": heads, "n_head": heads,
             "num_key_value_heads": kv, "num_key_value_groups": heads // max(kv, 1),
             "head_dim": hd, "attention_head_size": hd, "all_head_size": heads * hd,
             "split_size": heads * hd, "inner_dim": heads * hd}
    for name, value in table.items():
        if type(getattr(m, name, None)) is int:
            setattr(m, name, value)


def _refuse_save(detail: str, *args: Any, **kwargs: Any) -> None:
    raise NonUniformPlanError(
        f"save_pretrained: this pruned model keeps different sizes in different layers "
        f"({detail}), which one Hugging Face config cannot describe. Make the plan uniform "
        f"(the same ratio in every layer's group, whole heads: analyze(..., "
        f"split_policy=\"heads\"), Plan.from_ratio), then compile(..., output=\"module\") "
        f"again; or save with torch.save.")
