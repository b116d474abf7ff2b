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
import math
from typing import Any

import numpy as np
import torch

from fxprune.core.errors import ModuleOutputError, NonUniformPlanError, source_line
from fxprune.core.graph_meta import get_meta
from fxprune.core.groups import GroupAnalysis
from fxprune.core.pipeline import Step
from fxprune.core.plan import Plan
from passes.rules.registry import RewriteOptions
from passes.slice_weights import keep_mask
from passes.slice_module import (check_module_output, check_other_modes, check_unrun_modules,
                                 head_reading, refuse_uneven_chunks, slice_module)

__all__ = ["module_steps", "update_hf_config", "hf_sizes", "uniform_constraints"]

# (query, key, value) projection names of the attention families we know (T5: q/k/v); a fused qkv
# projection (GPT-2's c_attn) is split in thirds.
_QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"))
_FUSED = ("c_attn",)
_MLP_UP = ("up_proj", "fc1", "c_fc", "wi", "dense_h_to_4h")


def module_steps(model: torch.nn.Module, analysis: GroupAnalysis, kept: np.ndarray,
                 plan: Plan, *, check: bool = True) -> list[Step]:
    """The pipeline steps that turn the pruned GraphModule into the user's class."""

    def sliced_module(pruned: torch.fx.GraphModule) -> torch.nn.Module:
        small = slice_module(model, analysis, kept, pruned, check=False)
        if check:  # before the config reads head counts from the (uneven) widths
            refuse_uneven_chunks(analysis, pruned)
        if _is_hf(small):
            update_hf_config(small, model, analysis, kept,
                             attention_scale=get_meta(pruned, "attention_scale", "original"))
        if check:
            if get_meta(analysis.gm, "specialised"):  # one recorded path: small must take it
                from fxprune.record import check_recorded_path
                check_recorded_path(model, small, analysis, kept)
            check_module_output(small, pruned, analysis)
            check_unrun_modules(model, small, analysis, pruned)
            check_other_modes(small, analysis, kept)  # train-only heads: slice == mask
        return small

    return [Step("slice_module", sliced_module)]


def _is_hf(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "to_dict") and hasattr(model, "save_pretrained")


def uniform_constraints(model: torch.nn.Module, analysis: GroupAnalysis
                        ) -> tuple[dict[str, str], dict[str, tuple[str, int]]]:
    """What a uniform plan of a Hugging Face ``model`` must respect so that its config can
    describe it: ``(group name -> why it stays whole, group name -> (leader group,
    units per leader unit))``.

    A config without its own ``head_dim`` (BERT, GPT-2: ``head_dim = hidden_size //
    num_attention_heads``) describes fewer heads only with a hidden size smaller by as
    many heads: where each layer's heads are one whole-head group, the hidden-size group
    (the input embedding's columns) follows them, head_dim units per head; otherwise
    (GQA, head_dim units) hidden and attention stay whole. A config whose validators
    reject another hidden size (LlamaConfig: a multiple of the head count) keeps it
    whole. Attention whose q.k and v fall in different groups (``split_policy=
    "head_dim"``) stays whole: one config head_dim covers both. Other models: nothing."""
    cfg = getattr(model, "config", None)
    if not _is_hf(model) or not getattr(cfg, "num_attention_heads", None) or \
            not isinstance(getattr(cfg, "hidden_size", None), int):
        return {}, {}  # a config without these numbers describes no heads to tie
    derived = getattr(cfg, "head_dim", None) is None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hidden = {f"{path}.weight" for path, m in model.named_modules() if m is emb and path}
    owner = {m.fqn: g.name for g in analysis.groups for m in g.members if m.role == "out"}
    qkv = [[f"{path}.{n}.weight" for n in names] for path, m in model.named_modules()
           for names in _QKV + (_FUSED,) if all(hasattr(m, n) for n in names)]
    split = {g for fqns in qkv if len({owner.get(f) for f in fqns}) > 1
             for g in (owner.get(f) for f in fqns) if g is not None}
    attention = {f for fqns in qkv for f in fqns} if derived else set()
    whole = {g: ("one head_dim in the config covers q.k and v, which split_policy="
                 "\"head_dim\" prunes apart: the attention groups stay whole (whole heads: "
                 "analyze(..., split_policy=\"heads\"))") for g in sorted(split)}
    if derived:
        why = (f"{type(cfg).__name__} has no head_dim of its own (head_dim = hidden_size // "
               "num_attention_heads), so")
    else:  # e.g. LlamaConfig: hidden_size must stay a multiple of the head count
        why = _config_rejects(cfg, hidden_size=cfg.hidden_size - 1)
        if not why:
            return whole, {}
        why = f"{type(cfg).__name__} rejects other hidden sizes ({why}), so"
    if derived and not split:
        links = _hidden_follows_heads(analysis, cfg, hidden, owner, qkv)
        if links:
            return whole, links
    for g in analysis.groups:
        columns = {m.fqn for m in g.members if m.dim == 1}  # a tied embedding is "in"
        fqns = {m.fqn for m in g.members if m.role in ("out", "dep")}
        if (columns | {a for f in columns for a in analysis.tensor_aliases.get(f, ())}) & hidden:
            whole[g.name] = f"{why} the hidden size stays whole"
        elif fqns & attention:
            whole[g.name] = f"{why} the attention heads and head_dim stay whole"
    return whole, {}


def _hidden_follows_heads(analysis: GroupAnalysis, cfg: Any, hidden: set[str],
                          owner: dict[str, str], qkv: list[list[str]]
                          ) -> dict[str, tuple[str, int]]:
    """Where head_dim = hidden_size // heads and each layer's heads are one whole-head
    group: the hidden-size group loses head_dim units per head removed (BERT, GPT-2)."""
    heads, size = cfg.num_attention_heads, cfg.hidden_size
    attention = {owner.get(fqns[0]) for fqns in qkv}
    groups = [g for g in analysis.groups if g.name in attention]
    stream = [g for g in analysis.groups
              if ({m.fqn for m in g.members if m.dim == 1}
                  | {a for m in g.members if m.dim == 1
                     for a in analysis.tensor_aliases.get(m.fqn, ())}) & hidden]
    if None in attention or not groups or len(stream) != 1 or stream[0].size != size or \
            any(g.size != heads for g in groups) or size % heads:
        return {}
    return {stream[0].name: (groups[0].name, size // heads)}


def _config_rejects(cfg: Any, **changes: Any) -> str:
    """Why ``cfg``'s class refuses ``changes`` (its validators), or "" when it accepts."""
    try:
        trial = type(cfg).from_dict({**cfg.to_dict(), **changes})
        if hasattr(trial, "validate"):
            trial.validate()
    except Exception as exc:  # transformers' validators raise several types
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        return lines[-1] if lines else type(exc).__name__
    return ""


def _linear_out(m: torch.nn.Module) -> int:
    """Output features of an ``nn.Linear`` or of transformers' ``Conv1D`` (weight in x out)."""
    w = m.weight
    return w.shape[0] if isinstance(m, torch.nn.Linear) else w.shape[1]


def hf_sizes(model: torch.nn.Module, original: torch.nn.Module,
             analysis: GroupAnalysis | None = None, kept: np.ndarray | None = None
             ) -> list[dict[str, int]]:
    """Per attention layer of ``model``: query heads, kv heads, head_dim and the path,
    read from the kept rows of the query / key projections where ``analysis`` and ``kept``
    are given (the widths alone are ambiguous: 4 heads x 6 kept features read as 3 whole
    heads of 8); else from the sliced widths compared with ``original``'s."""
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
            q, k, v, read = _fused_widths(m, path, analysis, kept, heads0, hd0)
            if v != q:  # GPT-2: c_attn(x).split(self.split_size), one head_dim for all
                raise ModuleOutputError(
                    f"compile(output=\"module\"): {path} ({type(m).__name__}) would keep "
                    f"{q} query/key but {v} value features of its fused "
                    f"{_FUSED[0]} ({heads0} heads): its forward splits q, k, v in equal "
                    f"pieces and views them with one head_dim, which cannot describe "
                    f"both. Use output=\"graph\" (the GraphModule), a plan that keeps as "
                    f"many value as query/key features (Plan.from_indices), whole heads "
                    f"(analyze(..., split_policy=\"heads\")), or keep the layer whole "
                    f"(ignore=[\"{path}\"])." + _split_line(analysis, path))
        else:
            continue
        if names is not None:
            read = _read_heads(analysis, kept, path, names, heads0, kv0, hd0)
        if read is not None:
            heads, kv, hd = read
        elif q % hd0 == 0 and k % hd0 == 0:
            heads, kv, hd = q // hd0, k // hd0, hd0  # whole heads removed (or none)
        elif q % heads0 or k % kv0:  # head_dim units kept unevenly across the heads
            raise ModuleOutputError(
                f"compile(output=\"module\"): {path} ({type(m).__name__}) would keep {q} "
                f"query / {k} key features over {heads0} / {kv0} heads: a different "
                f"head_dim in different heads, which its one head_dim cannot describe. Use "
                f"output=\"graph\" (the GraphModule), or prune whole heads "
                f"(analyze(..., split_policy=\"heads\")).")
        else:
            heads, kv, hd = heads0, kv0, q // heads0  # head_dim shrank in every head
        # an ambiguous reading (q a multiple of both) is caught by check_module_output
        out.append({"path": path, "heads": heads, "kv_heads": kv, "head_dim": hd})
    return out


def _split_line(analysis: GroupAnalysis | None, path: str) -> str:
    """" The split: <source line>" of the module at ``path``'s split node, or ""."""
    for node in analysis.gm.graph.nodes if analysis is not None else ():
        stack = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
        if stack and stack[-1] == path and "split" in str(node.target) and source_line(node):
            return f" The split: {source_line(node)}"
    return ""


def _fused_widths(m: torch.nn.Module, path: str, analysis: GroupAnalysis | None,
                  kept: np.ndarray | None, heads0: int, hd0: int
                  ) -> tuple[int, int, int, tuple[int, int, int] | None]:
    """Kept (q, k, v) widths of a fused qkv projection and its (heads, kv heads, head_dim)
    reading: from the kept rows of each third of its output dim where ``analysis``
    labels them (q.k and v are separate spaces, so the plan may keep different counts;
    24 kept rows of 4 heads x 8 are 4 x 6, not 3 x 8), else thirds of its sliced width
    and no reading."""
    proj = getattr(m, _FUSED[0])
    dim = 0 if isinstance(proj, torch.nn.Linear) else 1  # transformers' Conv1D: in x out
    fqn = f"{path}.{_FUSED[0]}.weight" if path else f"{_FUSED[0]}.weight"
    labels = None if analysis is None or kept is None else analysis.tensor_labels.get((fqn, dim))
    if labels is None or len(labels) % 3:
        q = _linear_out(proj) // 3
        return q, q, q, None
    rows = keep_mask(np.asarray(labels), kept).reshape(3, -1).sum(axis=1)
    reading = head_reading(analysis, kept, fqn, heads0, hd0, dim=dim)
    read = None if reading is None else (reading[1], reading[1], reading[2])
    return int(rows[0]), int(rows[1]), int(rows[2]), read


def _read_heads(analysis: GroupAnalysis | None, kept: np.ndarray | None, path: str,
                names: tuple[str, ...] | None, heads0: int, kv0: int, hd0: int
                ) -> tuple[int, int, int] | None:
    """(query heads, kv heads, head_dim) from the kept rows of separate q and k projections
    (``head_reading``), or None (no analysis, a fused projection, an uneven reading)."""
    if analysis is None or kept is None or names is None:
        return None
    prefix = f"{path}." if path else ""
    q = head_reading(analysis, kept, f"{prefix}{names[0]}.weight", heads0, hd0)
    k = head_reading(analysis, kept, f"{prefix}{names[1]}.weight", kv0, hd0)
    if q is None or k is None or q[2] != k[2]:
        return None
    return q[1], k[1], q[2]


def update_hf_config(small: torch.nn.Module, original: torch.nn.Module,
                     analysis: GroupAnalysis | None = None,
                     kept: np.ndarray | None = None, *,
                     attention_scale: str = "original") -> None:
    """Size attributes of ``small``'s attention modules and its ``config`` follow its
    sliced weights (read as heads x head_dim from ``analysis``'s labels where given); a
    config that cannot describe every layer disables ``save_pretrained``
    (``NonUniformPlanError``)."""
    layers = hf_sizes(small, original, analysis, kept)
    for m in small.modules():  # transformers' Conv1D (GPT-2) reads its width ``nf``
        if type(getattr(m, "nf", None)) is int and getattr(m, "weight", None) is not None \
                and m.weight.dim() == 2:
            m.nf = m.weight.shape[1]
    cfg0 = original.config
    hd0 = getattr(cfg0, "head_dim", None) or cfg0.hidden_size // cfg0.num_attention_heads
    kept_scale = []  # layers whose softmax scale a reloaded config would recompute
    for layer in layers:
        _set_attention_attributes(small.get_submodule(layer["path"]), layer)
        if _set_attention_scale(small.get_submodule(layer["path"]), hd0, layer["head_dim"],
                                RewriteOptions(attention_scale)):
            kept_scale.append(f"{layer['path']} (head_dim {hd0} -> {layer['head_dim']})")
    mlp = {_linear_out(m) for path, m in small.named_modules()
           if (path.rpartition(".")[2] in _MLP_UP or path.endswith("intermediate.dense"))
           and hasattr(m, "weight")}  # BERT-family MLPs are ``intermediate.dense``
    emb = small.get_input_embeddings() if hasattr(small, "get_input_embeddings") else None
    values = {"num_attention_heads": {l["heads"] for l in layers},
              "num_key_value_heads": {l["kv_heads"] for l in layers},
              "head_dim": {l["head_dim"] for l in layers}, "intermediate_size": mlp,
              "hidden_size": _embedding_width(emb)}
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
        detail = "different sizes in different layers: " + \
            ", ".join(f"{k} in {v}" for k, v in spread.items())
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
            if name in cfg.to_dict() or hasattr(type(cfg), name) or \
                    name in getattr(cfg, "attribute_map", {}):  # T5: head_dim -> d_kv
                try:
                    setattr(cfg, name, value)
                except AttributeError:
                    continue
    rejected = _config_rejects(cfg)
    if rejected:  # e.g. a hidden size that is no multiple of the head count
        small.save_pretrained = functools.partial(
            _refuse_save, f"{type(cfg).__name__} rejects the pruned sizes: {rejected}")
    elif kept_scale:  # from_pretrained would compute 1/sqrt(new head_dim): another model
        small.save_pretrained = functools.partial(_refuse_save_scale, hd0, kept_scale)
    elif rotary := _sliced_rotary(small, original):  # from_pretrained recomputes them
        small.save_pretrained = functools.partial(
            _refuse_save, f"the rotary frequencies keep {rotary} of "
            f"the original head_dim's (inv_freq sliced); a config recomputes them from the "
            f"pruned head_dim, another model. Prune whole heads instead")


def _embedding_width(emb: torch.nn.Module | None) -> set[int]:
    """The hidden size an input embedding produces: ``nn.Embedding``'s columns, or the
    output features of a patch embedding's projection (HF ViT's ``ViTPatchEmbeddings``
    holds no ``weight`` of its own); nothing for other modules."""
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return {weight.shape[1]}
    proj = getattr(emb, "projection", None)
    if isinstance(proj, (torch.nn.Conv2d, torch.nn.Linear)):
        return {proj.weight.shape[0]}
    return set()


def _set_attention_attributes(m: torch.nn.Module, layer: dict[str, int]) -> None:
    heads, kv, hd = layer["heads"], layer["kv_heads"], layer["head_dim"]
    table = {"num_heads": heads, "num_attention_heads": heads, "n_head": heads,
             "n_heads": heads, "num_key_value_heads": kv,
             "num_key_value_groups": heads // max(kv, 1), "head_dim": hd,
             "attention_head_size": hd, "key_value_proj_dim": hd, "all_head_size": heads * hd,
             "split_size": heads * hd, "inner_dim": heads * hd}
    for name, value in table.items():
        if type(getattr(m, name, None)) is int:
            setattr(m, name, value)


def _set_attention_scale(m: torch.nn.Module, hd0: int, hd: int,
                         options: RewriteOptions) -> bool:
    """The ``scaling`` the forward passes to SDPA (1/sqrt(head_dim)) becomes the scale
    ``slice_weights`` wrote into the graph (recomputed or kept, ``attention_scale``);
    True where the original scale was kept for a changed head_dim."""
    value = getattr(m, "scaling", None)
    if hd != hd0 and isinstance(value, float) and math.isclose(value, hd0 ** -0.5):
        m.scaling = options.softmax_scale(hd0, hd)
        return not math.isclose(m.scaling, hd ** -0.5)  # kept: no config says so
    return False


def _sliced_rotary(small: torch.nn.Module, original: torch.nn.Module) -> str:
    """'a of b' where a rotary ``inv_freq`` buffer lost entries (head_dim pairs pruned),
    else ''."""
    before = {n: b.numel() for n, b in original.named_buffers() if n.endswith("inv_freq")}
    for name, buf in small.named_buffers():
        if name in before and buf.numel() != before[name]:
            return f"{buf.numel()} of {before[name]}"
    return ""


def _refuse_save_scale(hd0: int, layers: list[str], *args: Any, **kwargs: Any) -> None:
    raise NonUniformPlanError(
        f"save_pretrained: the pruned attention keeps the original softmax scale "
        f"1/sqrt({hd0}) (attention_scale=\"original\") in {len(layers)} layers "
        f"({', '.join(layers[:2])}{', ...' if len(layers) > 2 else ''}), but a model loaded "
        f"from the config computes 1/sqrt(head_dim) of the pruned head_dim, so it would not "
        f"reproduce this one. Compile with attention_scale=\"recompute\" (CLI: "
        f"--attention-scale recompute), prune whole heads (analyze(..., "
        f"split_policy=\"heads\")), or save with torch.save.")


def _refuse_save(detail: str, *args: Any, **kwargs: Any) -> None:
    raise NonUniformPlanError(
        f"save_pretrained: one Hugging Face config cannot describe this pruned model "
        f"({detail}). Make the plan uniform: "
        f"fxprune.plan(analysis, ..., uniform=True) (CLI: fxprune prune --uniform; whole "
        f"heads: analyze(..., split_policy=\"heads\")), then compile(..., "
        f"output=\"module\") again; or save with torch.save.")
