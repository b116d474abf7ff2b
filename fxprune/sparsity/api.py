"""``sparsify``: zero single weights (unstructured or N:M) of a copy of a model, with a plan.

    sparse, plan = fxprune.sparsify(model, x, 0.5, criterion="wanda", data=calib)
    fxprune.verify_sparsity(model, sparse, plan, x)     # sparse == dense * masks (float64)

Which weights (``kinds``): ``"linear"`` and ``"conv"`` (``nn.Linear``, ``nn.Conv1d/2d/3d``)
by default; ``"head"`` (a linear/conv whose output reaches the model output through
reshapes, dropout and indexing only), ``"embedding"`` and ``"norm"`` on request.
``ignore`` / ``include``: ``fnmatch`` patterns of parameter FQNs, applied after/over kinds.
"""
from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn as nn

from fxprune.core.errors import ImportanceError, SharedWeightError, SparsityError, VerificationError
from fxprune.planning.importance import CRITERIA, Importance
from fxprune.sparsity.criteria import WeightContext, weight_criteria, weight_scores
from fxprune.sparsity.masks import (check_fraction, check_nm, nm_mask, parse_pattern,
                                    unstructured_masks)
from fxprune.sparsity.plan import PackedMask, SparsityPlan

__all__ = ["sparsify", "plan_sparsity", "apply_sparsity", "verify_sparsity",
           "sparsity_table", "select_weights", "WeightSite", "Sparsified", "SparsityReport", "LayerCheck",
           "DEFAULT_KINDS"]

DEFAULT_KINDS = ("linear", "conv")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_FORWARD_ONLY = {"wanda"}  # data-driven rules that need inputs, not a loss


class Sparsified(NamedTuple):
    """``sparsify``'s result: the new module (exact zeros) and its plan."""

    model: nn.Module
    plan: SparsityPlan


@dataclass(frozen=True)
class WeightSite:
    """Where a weight is consumed: its kind, the node reading its input, conv groups."""

    kind: str                 # linear | conv | head | embedding | norm
    node: str                 # the node that consumes the weight (first use)
    input_node: str | None    # the node whose value is the layer's input (linear/conv)
    groups: int = 1

    is_conv: bool = False


def _fn_name(target: Any) -> str:
    """``aten.view.default`` / ``torch.reshape`` / ``F.linear`` -> ``view`` / ``reshape``..."""
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(target, "__name__", str(target))
    return name.rsplit(".", 1)[-1]


_TRANSPARENT = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose",
                "contiguous", "dropout", "clone", "getitem", "_to_copy", "to", "alias",
                "detach", "float", "type_as", "_unsafe_view"}
# function name -> (kind, index of the weight argument, index of `groups` or None)
_WEIGHT_FUNCTIONS = {"linear": ("linear", 1, None), "conv1d": ("conv", 1, 6),
                     "conv2d": ("conv", 1, 6), "conv3d": ("conv", 1, 6),
                     "convolution": ("conv", 1, 8), "embedding": ("embedding", None, None),
                     "layer_norm": ("norm", 2, None), "rms_norm": ("norm", 2, None),
                     "group_norm": ("norm", 2, None), "native_layer_norm": ("norm", 2, None)}


def _module_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _CONV):
        return "conv"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(module, _NORMS):
        return "norm"
    return None


def _site(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str, WeightSite] | None:
    """(weight FQN, site) when ``node`` consumes a weight of a known kind, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = _module_kind(module)
        if kind is None or not isinstance(getattr(module, "weight", None), nn.Parameter):
            return None
        x = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        return f"{node.target}.weight", WeightSite(kind, node.name, x and x.name,
                                                   getattr(module, "groups", 1), kind == "conv")
    if node.op != "call_function":
        return None
    name = _fn_name(node.target)
    if name not in _WEIGHT_FUNCTIONS:
        return None
    kind, w_at, g_at = _WEIGHT_FUNCTIONS[name]
    if name == "embedding":  # F.embedding(input, weight) / aten.embedding(weight, input)
        w_at = 0 if hasattr(node.target, "overloadpacket") else 1
    if name == "convolution" and len(node.args) > 6 and node.args[6]:
        return None  # transposed convolution: reduction dim is not dim 1
    w = node.args[w_at] if len(node.args) > w_at else node.kwargs.get("weight")
    if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
        return None
    groups = node.args[g_at] if g_at is not None and len(node.args) > g_at else \
        node.kwargs.get("groups", 1)
    x = node.args[0] if kind in ("linear", "conv") else None
    return w.target, WeightSite(kind, node.name, x.name if isinstance(x, torch.fx.Node) else None,
                                int(groups) if isinstance(groups, int) else 1, kind == "conv")


def _heads(gm: torch.fx.GraphModule) -> set[str]:
    """Linear/conv nodes whose output reaches the graph output through transparent ops."""
    out, seen, todo = set(), set(), [n for n in gm.graph.nodes if n.op == "output"]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        site = _site(gm, node)
        if site is not None and site[1].kind in ("linear", "conv"):
            out.add(node.name)
            continue
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        transparent = (node.op == "output"
                       or (node.op in ("call_method", "call_function")
                           and _fn_name(node.target) in _TRANSPARENT)
                       or isinstance(module, (nn.Dropout, nn.Identity, nn.Flatten)))
        if transparent:
            todo.extend(node.all_input_nodes)
    return out


def select_weights(gm: torch.fx.GraphModule, *, kinds: Sequence[str] = DEFAULT_KINDS,
                   include: Iterable[str] = (), ignore: Iterable[str] = ()
                   ) -> dict[str, WeightSite]:
    """Parameter FQN -> :class:`WeightSite` of every weight to sparsify, in graph order.

    Weights are found on the graph: ``nn.Linear``/``nn.Conv*d``/``nn.Embedding``/norm
    modules and their functional or ATen forms (``F.linear``, ``aten.linear``,
    ``aten.conv2d``, ``aten.layer_norm``...) reading a ``get_attr`` weight, so fx-traced
    and ``torch.export``-ed graphs are covered alike.
    """
    unknown = set(kinds) - {"linear", "conv", "head", "embedding", "norm"}
    if unknown:
        raise SparsityError(f"unknown weight kinds {sorted(unknown)}; known: linear, conv, "
                            "head, embedding, norm")
    heads = _heads(gm)
    include, ignore = tuple(include), tuple(ignore)
    chosen: dict[str, WeightSite] = {}
    for node in gm.graph.nodes:
        found = _site(gm, node)
        if found is None or found[0] in chosen:
            continue
        fqn, site = found
        kind = "head" if node.name in heads else site.kind
        wanted = kind in kinds or any(fnmatch.fnmatchcase(fqn, p) for p in include)
        if wanted and not any(fnmatch.fnmatchcase(fqn, p) for p in ignore):
            chosen[fqn] = site
    return chosen


def _check_shared(model: nn.Module, chosen: Iterable[str]) -> None:
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    params = dict(model.named_parameters(remove_duplicate=False))
    for fqn in chosen:
        if fqn not in params:
            raise SparsityError(f"weight {fqn!r} of the traced graph is not a parameter of the "
                                "model: sparsify the module you traced, or ignore=[...] it")
        aliases = names[id(params[fqn])]
        if len(aliases) > 1:
            raise SharedWeightError(
                f"weight {fqn!r} is shared as {aliases}: one mask would zero it in every use "
                f"(tied embeddings/heads...); untie it (clone the parameter) or exclude every "
                f"name: ignore={aliases!r}")


def _settings(name: str, data: Any, loss_fn: Any, closure: Any, batches: int, probes: int,
              eps: float, seed: int) -> Importance:
    if not isinstance(name, str) or name not in CRITERIA:
        raise ImportanceError(f"unknown criterion {name!r}; weight criteria: "
                              f"{weight_criteria()} and the solver 'sparsegpt'")
    spec = CRITERIA[name]
    if spec.weight_fn is None:
        raise ImportanceError(f"criterion {name!r} scores channels, not single weights; "
                              f"weight criteria: {weight_criteria()}")
    if spec.needs_data and data is None and closure is None:
        needs = "data=<(inputs, None) batches>" if name in _FORWARD_ONLY else \
            "data=<(inputs, target) batches> and loss_fn=<fn(output, target)>"
        raise ImportanceError(f"criterion {name!r} is data-driven: pass {needs}, or "
                              "closure=<fn(model, i) -> loss>")
    if name in _FORWARD_ONLY and loss_fn is None:
        loss_fn = _no_loss
    return Importance(name, data=data, loss_fn=loss_fn, closure=closure, batches=batches,
                      probes=probes, eps=eps, seed=seed, normalize=None)


def _no_loss(output: Any, target: Any) -> torch.Tensor:
    raise ImportanceError("this criterion reads activations only; no loss is defined")


def plan_sparsity(model: nn.Module, example_inputs: Any, sparsity: float | None = None, *,
                  pattern: str = "unstructured", scope: str = "layer",
                  criterion: str = "magnitude", data: Any = None,
                  loss_fn: Callable | None = None, closure: Callable | None = None,
                  kinds: Sequence[str] = DEFAULT_KINDS, include: Iterable[str] = (),
                  ignore: Iterable[str] = (), batches: int = 4, probes: int = 2,
                  eps: float = 1e-3, seed: int = 0, analysis: Any = None,
                  previous: SparsityPlan | None = None) -> SparsityPlan:
    """The :class:`SparsityPlan` of :func:`sparsify`, without building the model.

    ``previous``: masks that must stay (a weight zeroed there is zeroed again: gradual
    pruning never revives a weight).
    """
    nm = parse_pattern(pattern)
    if nm is not None:
        implied = 1.0 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-12:
            raise SparsityError(f"pattern {pattern!r} zeroes exactly {implied:g} of the "
                                f"weights; drop sparsity={sparsity!r} or pass {implied:g}")
        sparsity = implied
    sparsity = 0.5 if sparsity is None else sparsity
    check_fraction(sparsity)
    if scope not in ("layer", "row", "global"):
        raise SparsityError(f"scope must be 'layer', 'row' (per output row) or 'global', "
                            f"not {scope!r}")
    settings = _settings(criterion, data, loss_fn, closure, batches, probes, eps, seed)
    if analysis is None:
        from fxprune.api import analyze

        analysis = analyze(model, example_inputs)
    chosen = select_weights(analysis.gm, kinds=kinds, include=include, ignore=ignore)
    if not chosen:
        raise SparsityError(f"no weight selected (kinds={tuple(kinds)}, ignore="
                            f"{tuple(ignore)}): the model has no nn.Linear/nn.Conv weight of "
                            "those kinds; add kinds or include=[fqn patterns]")
    _check_shared(model, chosen)
    params = dict(analysis.gm.named_parameters(remove_duplicate=False))
    for fqn in chosen:
        w = params[fqn]
        if not w.is_floating_point():
            raise SparsityError(f"weight {fqn!r} has dtype {w.dtype}, not a float: quantised "
                                "weights cannot be masked here; sparsify before quantising "
                                f"or ignore=[{fqn!r}]")
        if w.is_meta:
            raise SparsityError(f"weight {fqn!r} is on 'meta': load real weights first")
    ctx = WeightContext(analysis, settings, chosen)
    def scored(fqn: str) -> torch.Tensor:
        s = weight_scores(ctx, criterion, fqn, params[fqn])
        if previous is not None and fqn in previous.masks:
            s.masked_fill_(~previous.mask(fqn), float("-inf"))  # zeroed stays zeroed
        return s

    if nm is None and scope == "global":
        masks = unstructured_masks({fqn: scored(fqn) for fqn in chosen}, sparsity, scope)
    else:  # one weight's scores at a time: peak memory of one float64 copy of a weight
        masks = {}
        for fqn, site in chosen.items():
            s = scored(fqn)
            masks[fqn] = (unstructured_masks({fqn: s}, sparsity, scope)[fqn] if nm is None
                          else nm_mask(s, nm[0], nm[1], site.is_conv, fqn))
            del s
    meta = {"sparsity": sparsity, "pattern": pattern if nm else "unstructured",
            "scope": scope if nm is None else "run", "criterion": criterion,
            "conv": sorted(f for f, site in chosen.items() if site.is_conv)}
    return SparsityPlan(analysis.fingerprint,
                        {f: PackedMask.from_tensor(m) for f, m in masks.items()}, meta)


def apply_sparsity(model: nn.Module, plan: SparsityPlan, example_inputs: Any = None) -> nn.Module:
    """A deep copy of ``model`` whose planned weights are exactly +0.0 (others untouched).

    With ``example_inputs`` the model's graph fingerprint is checked against the plan's.
    """
    if plan.meta.get("reconstruction"):
        raise SparsityError(
            f"this plan was made by {plan.meta['reconstruction'].get('method')!r}, which also "
            "updated the kept weights: its masks alone do not rebuild the model. Use the model "
            "fxprune.sparsify returned (or its state_dict), or a score criterion such as "
            "'wanda' for a plan that applies to the dense weights")
    if example_inputs is not None:
        from fxprune.api import analyze

        plan.check(analyze(model, example_inputs).fingerprint)
    out = copy.deepcopy(model)
    params = dict(out.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for fqn, packed in plan.masks.items():
            if fqn not in params:
                raise SparsityError(f"the plan masks {fqn!r}, which this model lacks")
            w = params[fqn]
            if tuple(w.shape) != packed.shape:
                raise SparsityError(f"mask of {fqn!r} has shape {packed.shape}, the weight "
                                    f"{tuple(w.shape)}")
            w.masked_fill_(~packed.tensor().to(w.device), 0.0)
    return out


def sparsify(model: nn.Module, example_inputs: Any, sparsity: float | None = None, *,
             pattern: str = "unstructured", scope: str = "layer",
             criterion: str = "magnitude", **options: Any) -> Sparsified:
    """Zero single weights of a copy of ``model``; returns ``(new_model, plan)``.

    ``sparsity``: fraction in [0, 1) of the selected weights to zero (default 0.5; for
    ``pattern="N:M"`` it is ``1 - N/M``). ``pattern``: ``"unstructured"`` or ``"N:M"``
    (``"2:4"``): at most N kept in every M consecutive weights of the reduction dim.
    ``scope``: ``"layer"`` (each weight its own budget), ``"row"`` (each output row,
    Wanda's default) or ``"global"`` (one budget, all selected weights). ``criterion``: a
    name in ``fxprune.importance.CRITERIA`` with a weight rule (``magnitude``, ``taylor``,
    ``fisher``, ``obd``, ``wanda``, ``random``...), or ``"sparsegpt"``: not a score but a
    solver that also updates the kept weights (Frantar & Alistarh 2023; see
    :mod:`fxprune.sparsity.sparsegpt`, options ``blocksize``, ``damp``). ``options``: ``data``, ``loss_fn``,
    ``closure``, ``batches``, ``probes``, ``eps``, ``seed`` (as in :class:`Importance`),
    ``kinds``, ``include``, ``ignore``, ``analysis``.

    Errors: :class:`SparsityError` (fraction, scope, weight dtype, nothing selected),
    :class:`PatternError` (N >= M, M not dividing a reduction dim: names the layer),
    :class:`SharedWeightError`, :class:`ImportanceError` (unknown criterion, no data).
    ``model`` is not modified.
    """
    if criterion == "sparsegpt":
        from fxprune.sparsity.sparsegpt import sparsegpt

        return sparsegpt(model, example_inputs, sparsity, pattern=pattern, scope=scope,
                         **options)
    plan = plan_sparsity(model, example_inputs, sparsity, pattern=pattern, scope=scope,
                         criterion=criterion, **options)
    return Sparsified(apply_sparsity(model, plan), plan)


# ----------------------------------------------------------------------------------
# Proof: sparse == dense with the masks applied, per-layer table
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCheck:
    """One sparsified weight: planned and realised zeros, N:M runs violated, leaks."""

    fqn: str
    shape: tuple[int, ...]
    numel: int
    planned: float         # fraction the mask zeroes
    realised: float        # fraction of exact zeros in the sparse weight
    masked_nonzero: int    # masked positions that are not 0 (must be 0)
    nm_violations: int     # runs with more than N non-zeros (N:M plans; 0 otherwise)


@dataclass(frozen=True)
class SparsityReport:
    """``verify_sparsity``'s outcome: the output check and one row per weight."""

    ok: bool
    max_abs_error: float
    tolerance: float
    layers: tuple[LayerCheck, ...]
    pattern: str
    reconstruction: str | None = None   # "sparsegpt": kept weights were updated
    changed_outside: tuple[str, ...] = ()  # tensors outside the plan that differ (must be none)

    @property
    def sparsity(self) -> float:
        total = sum(r.numel for r in self.layers)
        return sum(r.realised * r.numel for r in self.layers) / total if total else 0.0

    def table(self) -> str:
        from tabulate import tabulate

        rows = [(r.fqn, "x".join(map(str, r.shape)), f"{r.planned:.4f}", f"{r.realised:.4f}",
                 r.masked_nonzero, r.nm_violations if self.pattern != "unstructured" else "-")
                for r in self.layers]
        if self.reconstruction:
            head = (f"{self.reconstruction}: masked zeros, pattern and untouched tensors: "
                    f"{'OK' if self.ok else 'FAILED'} ({len(self.changed_outside)} changed "
                    f"outside the plan); output max |sparse - dense| {self.max_abs_error:.3g} "
                    f"(not an error: the kept weights were re-fitted); pattern "
                    f"{self.pattern}; overall sparsity {self.sparsity:.4f}\n")
        else:
            head = (f"sparse == dense*mask: {'OK' if self.ok else 'FAILED'} (max |err| "
                    f"{self.max_abs_error:.3g}, tol {self.tolerance:.3g}); pattern "
                    f"{self.pattern}; overall sparsity {self.sparsity:.4f}\n")
        return head + tabulate(rows, headers=["weight", "shape", "planned", "realised",
                                              "masked != 0", f"{self.pattern} violations"])


def sparsity_table(sparse: nn.Module, plan: SparsityPlan) -> tuple[LayerCheck, ...]:
    """Per planned weight of ``sparse``: realised zeros, leaks through the mask, N:M runs."""
    params = dict(sparse.named_parameters(remove_duplicate=False))
    nm, conv = plan.pattern_nm, set(plan.meta.get("conv", ()))
    rows = []
    for fqn, packed in plan.masks.items():
        if fqn not in params:
            raise SparsityError(f"the plan masks {fqn!r}, which the sparse model lacks")
        w = params[fqn].detach()
        keep = packed.tensor().to(w.device)
        leaks = int((w[~keep] != 0).sum())
        viol = check_nm(w, nm[0], nm[1], fqn in conv, fqn) if nm else 0
        rows.append(LayerCheck(fqn, packed.shape, packed.numel, packed.sparsity,
                               float((w == 0).sum()) / max(w.numel(), 1), leaks, viol))
    return tuple(rows)


def verify_sparsity(model: nn.Module, sparse: nn.Module, plan: SparsityPlan, inputs: Any, *,
                    rtol: float = 1e-9, raise_on_failure: bool = True,
                    check_fingerprint: bool = True) -> SparsityReport:
    """``sparse(x) == (model with weights * masks)(x)`` in float64, and the per-layer table.

    The reference is built independently of ``apply_sparsity``: a float64 copy of ``model``
    whose planned weights are multiplied by their 0/1 masks. Fails (``VerificationError``)
    when outputs differ beyond ``rtol`` times the output scale, a masked weight is not 0,
    or an N:M run holds more than N non-zeros.
    """
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if check_fingerprint:
        from fxprune.api import analyze

        plan.check(analyze(model, inputs).fingerprint)
    layers = sparsity_table(sparse, plan)
    method = (plan.meta.get("reconstruction") or {}).get("method")
    pattern_ok = all(r.masked_nonzero == 0 and r.nm_violations == 0 for r in layers)
    bad = [r.fqn for r in layers if r.masked_nonzero or r.nm_violations]
    reference = copy.deepcopy(model).double().eval()
    ref_params = dict(reference.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        if not method:  # SparseGPT re-fitted the kept weights: no dense*mask reference
            for fqn, packed in plan.masks.items():
                ref_params[fqn].mul_(packed.tensor().to(ref_params[fqn].device).double())
        candidate = copy.deepcopy(sparse).double().eval()
        as64 = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                     for x in inputs)
        want, got = _flat(reference(*as64)), _flat(candidate(*as64))
    err = max((float((a - b).abs().max()) for a, b in zip(got, want) if a.numel()), default=0.0)
    pattern = plan.meta.get("pattern", "unstructured")
    if method:
        # masked weights exactly 0, the pattern, every tensor outside the plan untouched
        dense = model.state_dict()
        changed = tuple(k for k, v in sparse.state_dict().items()
                        if k not in plan.masks and (k not in dense or v.shape != dense[k].shape
                                                    or not torch.equal(v, dense[k])))
        ok = not changed and len(got) == len(want) and pattern_ok
        report = SparsityReport(ok, err, float("inf"), layers, pattern, method, changed)
        if raise_on_failure and not ok:
            raise VerificationError(f"{method} result: weights with masked non-zeros or N:M "
                                    f"violations {bad[:8]}; tensors changed outside the plan "
                                    f"{list(changed)[:8]}. Re-run fxprune.sparsify; do not "
                                    "train it without the masks attached (attach_masks).")
        return report
    scale = max((float(b.abs().max()) for b in want if b.numel()), default=1.0)
    tol = rtol * max(scale, 1.0)
    ok = len(got) == len(want) and err <= tol and pattern_ok
    report = SparsityReport(ok, err, tol, layers, pattern)
    if raise_on_failure and not ok:
        raise VerificationError(f"sparse != dense*mask: output max |err| {err:.3g} (tol "
                                f"{tol:.3g}); weights with masked non-zeros or N:M violations: "
                                f"{bad[:8]}. Re-apply the plan (apply_sparsity) or, after "
                                "training, keep the masks attached (attach_masks).")
    return report


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values") and not isinstance(out, torch.Tensor):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat(v)]
    return []
