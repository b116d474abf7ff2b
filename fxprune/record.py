"""``frontend="record"``: capture ONE path of a model with data-dependent control flow.

``torch.fx`` symbolic tracing cannot decide ``if x.sum() > 0:`` and ``torch.export``
refuses a data-dependent guard. ``record_trace`` traces with :class:`RecordingTracer`,
an ``FxpruneTracer`` whose proxies also carry the real value computed on the example
inputs: where Python reads a traced value (``bool`` of an ``if`` or a ``while`` test,
``int``/``float``/``len`` of a traced value, ``.item()`` / ``.tolist()``), the real value
is used and the point is recorded with its source line and the node it read in
``gm.meta["fxprune"]["specialised"]``. The graph therefore holds the one path the example
inputs took; it is analysed and planned as any fx graph. The model is not modified (its
buffers are restored after the real computation; the example inputs are copied).

The only result that keeps the model's control flow is the user's own module
(``compile(..., output="module")``); ``output="graph"`` on a specialised capture raises
``ControlFlowError``. ``compile`` checks that the pruned module takes the recorded path
on the example inputs (:func:`check_recorded_path`: a condition that reads pruned
channels can flip) before comparing its outputs with the pruned graph.
:func:`check_paths` proves the pruned module on further inputs: each is recorded again
(on the original model), the plan is carried over to that path's analysis by parameter
indices, that path's graph is sliced and checked slice == mask, the pruned module must
keep every parameter that path reads at that path's sliced shape, take the same path, and
compute the same outputs (float64); any disagreement raises ``ControlFlowError``.
"""
from __future__ import annotations

import copy
import math
import os
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
from torch.fx.node import map_aggregate

from fxprune.capture import FallbackWarning, FxpruneTracer, _Proxy, _user_stacklevel, \
    library_leaves
from fxprune.core.errors import ControlFlowError, FxpruneError, TraceError
from fxprune.core.graph_meta import get_meta, set_meta

__all__ = ["RecordingTracer", "record_trace", "check_paths", "check_recorded_path",
           "path_of", "specialised", "describe"]

# methods whose result Python receives as a plain value: specialised, not traced
_TO_PYTHON = ("item", "tolist")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN = (os.path.join(_ROOT, "fxprune") + os.sep, os.path.join(_ROOT, "passes") + os.sep)


def _source() -> str:
    """The innermost user frame (outside torch, fxprune and passes) of the stack."""
    for f in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(f.filename)
        if "/torch/" not in path and not path.startswith(_OWN) and "<" not in f.filename:
            return f"{f.filename}:{f.lineno}: {f.line}"
    return "<unknown>"


def _real(a: Any) -> Any:
    return map_aggregate(a, lambda v: v.value if isinstance(v, _RecordProxy) else v)


def _read(obj: torch.fx.Proxy) -> Any:
    """The real value Python asks for; one that could not be computed fails loudly (a
    guessed ``False`` would record a path the model never takes)."""
    value = _real(obj)
    if value is None or isinstance(value, torch.fx.Proxy):
        raise TraceError(f"frontend='record': the value of {obj.node.format_node()} at "
                         f"{_source()} is not known on the example inputs (it was made "
                         "outside the recording tracer). Remedy: mark the module that makes "
                         "it as a leaf (leaf_modules=...), or use frontend='fx'/'export'.")
    return value


class _RecordProxy(_Proxy):
    """A proxy holding the real value of its node on the example inputs."""

    value: Any = None

    def __len__(self) -> int:
        if isinstance(self.value, torch.Tensor):
            return self.tracer.record("len", len(_read(self)), self.node)
        return len(_read(self))  # a tuple's length is structure, not data

    def __int__(self) -> int:
        return self.tracer.record("int", int(_read(self)), self.node)

    def __index__(self) -> int:
        return self.tracer.record("int", int(_read(self)), self.node)

    def __float__(self) -> float:
        return self.tracer.record("float", float(_read(self)), self.node)

    def __getattr__(self, k: str) -> "_RecordAttribute":
        return _RecordAttribute(self, k)  # x.shape, x.dtype...: they carry values too


class _RecordAttribute(torch.fx.proxy.Attribute, _RecordProxy):
    """``proxy.attr``: its node is made lazily (most attributes are method calls), its
    value is the attribute of the real value."""

    @property
    def value(self) -> Any:  # type: ignore[override]
        return getattr(_real(self.root), self.attr)


class RecordingTracer(FxpruneTracer):
    """``FxpruneTracer`` that computes every node on ``example_inputs`` as it traces and
    answers Python's questions about traced values with the real ones (recorded)."""

    def __init__(self, example_inputs: Sequence[Any], leaf_modules: Sequence = (),
                 autowrap_functions: Sequence[Callable] = ()) -> None:
        super().__init__(leaf_modules, autowrap_functions)
        self._inputs = list(example_inputs)
        self._placeholders = 0
        self.specialised: list[tuple[str, str, Any, str]] = []

    def record(self, kind: str, value: Any, node: torch.fx.Node | None = None) -> Any:
        self.specialised.append((kind, _source(), value, node.name if node else ""))
        return value

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _RecordProxy(node, self)

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        return self.record("bool", bool(_read(obj)), obj.node)

    def iter(self, obj: torch.fx.Proxy):
        return iter([obj[i] for i in range(len(obj))])

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict,
                     name: str | None = None, type_expr: Any = None,
                     proxy_factory_fn: Any = None) -> Any:
        value = self._value(kind, target, args, kwargs)
        if kind == "call_method" and target in _TO_PYTHON:  # Python gets the number
            read = args[0].node if isinstance(args[0], torch.fx.Proxy) else None
            return self.record(target, value, read)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        proxy.value = value
        return proxy

    # Module.__call__ / __getattr__ are patched while tracing: computing a real value
    # must not trace, so the patched hooks pass through while ``_computing``.
    _computing = False

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: torch.nn.Module, forward: Callable[..., Any],
                    args: tuple, kwargs: dict) -> Any:
        if self._computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def _value(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if self._computing:
            return None
        self._computing = True
        try:
            return self._compute(kind, target, _real(args), _real(kwargs))
        finally:
            self._computing = False

    def _compute(self, kind: str, target: Any, a: Any, kw: Any) -> Any:
        with torch.no_grad():
            if kind == "placeholder":
                i, self._placeholders = self._placeholders, self._placeholders + 1
                if i < len(self._inputs):
                    return self._inputs[i]
                return a[0] if a else None  # the parameter's default
            if kind == "get_attr":
                obj = self.root
                for part in target.split("."):
                    obj = getattr(obj, part)
                return obj
            if kind == "call_function":
                return target(*a, **kw)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **kw)
            if kind == "call_module":
                return self.root.get_submodule(target)(*a, **kw)
        return None


def _copy_input(x: Any) -> Any:
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def record_trace(model: torch.nn.Module, example_inputs: Sequence[Any], *,
                 leaf_modules: Sequence = (), autowrap_functions: Sequence[Callable] = (),
                 warn: bool = True, reason: str = "") -> torch.fx.GraphModule:
    """A GraphModule of the one path ``model`` takes on ``example_inputs``; when Python
    read a traced value, a ``FallbackWarning`` names every such source line (``reason``:
    why ``frontend="auto"`` came here). ``model`` is not modified."""
    if example_inputs is None:
        raise TraceError("frontend='record' needs example_inputs (it runs the model on "
                         "them). Remedy: pass example inputs.")
    extra_leaves, extra_functions = library_leaves(model)
    tracer = RecordingTracer(tuple(_copy_input(x) for x in example_inputs),
                             tuple(leaf_modules) + extra_leaves,
                             tuple(autowrap_functions) + extra_functions)
    was_training = model.training
    # the real computation runs the user's modules: train-mode BatchNorm would update
    # its running statistics
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        graph = tracer.trace(model)
    except FxpruneError:
        raise
    except Exception as exc:
        from fxprune.capture import _where
        raise TraceError(f"recording one path failed: {_where(exc)}. Remedy: mark the "
                         "module as a leaf (leaf_modules=...)") from exc
    finally:
        model.train(was_training)
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved and b.shape == saved[n].shape:
                    b.copy_(saved[n])
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.training = model.training
    gm._tracer_cls = gm.graph._tracer_cls = None
    set_meta(gm, "frontend", "record")
    set_meta(gm, "specialised", tuple(tracer.specialised))
    if tracer.specialised and warn:
        why = f"frontend='auto' recorded one path because {reason}. " if reason else ""
        warnings.warn(f"fxprune: {why}{type(model).__name__}'s control flow was specialised "
                      f"to the path the example inputs take: {describe(tracer.specialised)}. "
                      "Only compile(..., output='module') keeps the model's own control "
                      "flow; prove it on inputs that take other paths with "
                      "fxprune.check_paths(model, small, plan, [inputs, ...]).",
                      FallbackWarning, stacklevel=_user_stacklevel())
    return gm


def specialised(gm: Any) -> tuple:
    """The recorded specialisation points of a ``"record"`` capture (empty otherwise)."""
    return tuple(get_meta(gm, "specialised", ()) or ())


def describe(points: Sequence[tuple], limit: int = 4) -> str:
    """``kind at file:line: code -> value`` per source line (values of a loop listed)."""
    seen: dict[str, list] = {}
    for kind, where, value, *_ in points:
        seen.setdefault(f"{kind} at {where}", []).append(value)
    items = [f"{k} -> {v[0] if len(v) == 1 else v}" for k, v in seen.items()]
    return "; ".join(items[:limit]) + (f"; ... ({len(items) - limit} more)"
                                       if len(items) > limit else "")


def _same_value(u: Any, v: Any) -> bool:
    if isinstance(u, float) or isinstance(v, float):
        return isinstance(u, (int, float)) and isinstance(v, (int, float)) and \
            math.isclose(u, v, rel_tol=1e-4, abs_tol=1e-6)
    if isinstance(u, list) or isinstance(v, list):
        a, b = np.asarray(u, dtype=float), np.asarray(v, dtype=float)
        return a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=1e-6)
    return u == v


def _parting(a: Sequence[tuple], b: Sequence[tuple]) -> int:
    """The index of the first point where paths ``a`` and ``b`` differ (-1: none)."""
    for i in range(max(len(a), len(b))):
        pa = a[i] if i < len(a) else None
        pb = b[i] if i < len(b) else None
        if pa is None or pb is None or pa[0] != pb[0] or pa[1] != pb[1] \
                or not _same_value(pa[2], pb[2]):
            return i
    return -1


def _divergence(a: Sequence[tuple], b: Sequence[tuple]) -> str | None:
    """Where path ``b`` leaves path ``a`` (``"a: ...; b: ..."``), None when they agree."""
    i = _parting(a, b)
    if i >= 0:
        pa = a[i] if i < len(a) else None
        pb = b[i] if i < len(b) else None
        first = f"{pa[0]} at {pa[1]} -> {pa[2]}" if pa else "no further read"
        second = f"{pb[0]} at {pb[1]} -> {pb[2]}" if pb else "no further read"
        return f"{first}, but {second}"
    return None


def _eval64(m: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(m).eval().to(torch.float64)


def _inputs64(x: Sequence[Any]) -> tuple:
    return tuple(t.detach().to(torch.float64) if isinstance(t, torch.Tensor)
                 and t.is_floating_point() else t for t in x)


def path_of(model: torch.nn.Module, inputs: Sequence[Any]) -> tuple:
    """The points Python reads when ``model`` runs on ``inputs`` (eval mode, float64, on
    a copy: the model is not touched)."""
    gm = record_trace(_eval64(model), _inputs64(inputs), warn=False)
    return specialised(gm)


def _cut(analysis: Any, kept: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
    """``{(fqn, dim): kept indices}`` of every parameter dim the plan cuts."""
    keep = {}
    for (fqn, dim), labels in analysis.tensor_labels.items():
        inside = labels >= 0
        if inside.any() and not kept[labels[inside]].all():
            keep[(fqn, dim)] = np.flatnonzero(~inside | kept[np.maximum(labels, 0)])
    return keep


def _feeding(gm: torch.fx.GraphModule, node_name: str, cut: dict) -> list[str]:
    """Modules (or parameters) the plan cuts that the node ``node_name`` reads from."""
    nodes = {n.name: n for n in gm.graph.nodes}
    todo, seen, found = [nodes.get(node_name)], set(), []
    cut_owners = {fqn.rpartition(".")[0] or fqn for fqn, _ in cut}
    while todo:
        n = todo.pop()
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        owner = n.target if n.op == "call_module" else \
            (n.target.rpartition(".")[0] or n.target) if n.op == "get_attr" else None
        if owner in cut_owners and owner not in found:
            found.append(owner)
        todo.extend(n.all_input_nodes)
    return found


def check_recorded_path(model: torch.nn.Module, small: torch.nn.Module, analysis: Any,
                        kept: np.ndarray) -> None:
    """``compile(..., output="module")`` of a ``"record"`` capture: on the example
    inputs, the model (eval, float64) takes the recorded path and so does ``small``;
    otherwise ``ControlFlowError`` names the first branch line where they part."""
    recorded = specialised(analysis.gm)
    if not recorded:
        return
    x = analysis.example_inputs
    ref = path_of(model, x)
    where = _divergence(recorded, ref)
    if where is not None:
        raise ControlFlowError(
            f"the example inputs take another path in eval mode / float64 than the one "
            f"recorded ({where}), so the pruned module cannot be compared with the "
            "recorded graph. Remedy: analyse the model in eval mode (model.eval()) with "
            "example inputs that are not on a branch's edge.")
    got = path_of(small, x)
    where = _divergence(ref, got)
    if where is not None:
        feeding = sorted({m for p in recorded[:_parting(ref, got) + 1]
                          for m in _feeding(analysis.gm, p[3], _cut(analysis, kept))})
        fed = (f" it reads channels that the plan cuts in {feeding}" if feeding else
               " its value depends on what the plan cuts")
        raise ControlFlowError(
            f"on the example inputs the pruned {type(small).__name__} takes another path "
            f"than the model: the model reads {where} in the pruned module;{fed}. "
            f"Remedy: keep those channels whole (ignore={feeding or '[...]'} in the plan), "
            "or compute the condition from tensors that are not pruned.")


def check_paths(model: torch.nn.Module, small: torch.nn.Module, plan: Any,
                inputs: Sequence[Any], *, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    """Prove ``small`` (``compile(model, plan, output="module")`` of a ``"record"``
    capture) on each input tuple of ``inputs``: the model is recorded on it, the plan
    carried over to that path's analysis (slice == mask checked there), and ``small``
    must hold that path's sliced parameter shapes, take the same path and equal that
    path's pruned graph in float64. Raises ``ControlFlowError`` naming the branch lines
    and a remedy where they disagree. Neither ``model`` nor ``small`` is modified."""
    from fxprune.api import analyze, flat_tensors
    from fxprune.core.errors import PlanError
    from fxprune.core.plan import Plan
    from passes.slice_weights import check_sliced, slice_weights

    analysis = plan.analysis
    if analysis is None:
        raise ControlFlowError("check_paths needs the plan made on the recorded analysis "
                               "(a plan loaded from JSON carries none). Remedy: "
                               "Plan.load(path, analysis).")
    recorded = specialised(analysis.gm)
    keep = _cut(analysis, plan.kept_labels(analysis))
    for n, x in enumerate(inputs):
        x = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        ref = _eval64(model)
        gm2 = record_trace(ref, _inputs64(x), warn=False)
        path = specialised(gm2)
        other = _divergence(recorded, path)
        where = (f"check input {n} takes the recorded path" if other is None else
                 f"check input {n} leaves the recorded path ({other})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            analysis2 = analyze(gm2, _inputs64(x))
            mine = {k: v for k, v in keep.items() if k in analysis2.tensor_labels}
            try:
                plan2 = Plan.from_tensor_indices(analysis2, mine)
                kept2 = plan2.kept_labels(analysis2)
                pruned2 = slice_weights(analysis2, kept2)
                check_sliced(pruned2, analysis2, kept2, analysis2.example_inputs)
            except PlanError as exc:
                raise ControlFlowError(
                    f"{where}, and the plan does not carry over to that path: {exc}. "
                    "Remedy: keep the channels that reach the branch whole (ignore= their "
                    "modules), or analyse with example inputs that take this path.") from exc
        _check_shapes(small, pruned2, analysis, analysis2, keep, where)
        a = _eval64(small)
        mine_path = specialised(record_trace(copy.deepcopy(a), _inputs64(x), warn=False))
        parted = _divergence(path, mine_path)
        if parted is not None:
            raise ControlFlowError(
                f"{where}; there the pruned {type(small).__name__} takes another path than "
                f"the model ({parted}): its condition reads channels the plan cuts. "
                "Remedy: keep the channels the condition reads whole (ignore= their "
                "modules), or compute it from tensors that are not pruned.")
        with torch.no_grad():
            got, want = flat_tensors(a(*_inputs64(x))), flat_tensors(pruned2(*_inputs64(x)))
        if len(got) != len(want):
            raise ControlFlowError(f"{where}: the pruned module returns {len(got)} tensors, "
                                   f"that path's pruned graph {len(want)}.")
        for i, (g, w) in enumerate(zip(got, want)):
            if g.shape != w.shape or not torch.allclose(g, w.to(g.dtype), rtol=rtol,
                                                        atol=atol):
                err = (g - w).abs().max().item() if g.shape == w.shape else \
                    f"shape {tuple(g.shape)} vs {tuple(w.shape)}"
                raise ControlFlowError(
                    f"{where}: the pruned module's output {i} differs from that path's "
                    f"pruned graph (max |err| {err}, float64). Remedy: ignore= the modules "
                    "of the branch, or do not prune this model through a recorded path.")


def _producers(analysis: Any, cut: Sequence[tuple[str, int]]) -> list[str]:
    """The modules whose output channels start the recorded groups of ``cut``'s dims (a
    name for ``ignore=``); the owners of ``cut`` when a group has no producer."""
    found = set()
    for fqn, dim in cut:
        labels = analysis.tensor_labels.get((fqn, dim))
        gids = set(analysis.group_of[labels[labels >= 0]].tolist()) if labels is not None \
            else set()
        outs = [m.fqn for g in gids for m in analysis.groups[g].members if m.role == "out"]
        found.update(f.rpartition(".")[0] for f in (outs or [fqn]))
    return sorted(found)


def _check_shapes(small: torch.nn.Module, pruned2: torch.fx.GraphModule, analysis: Any,
                  analysis2: Any, keep: dict, where: str) -> None:
    """Every tensor the other path reads has, in ``small``, that path's sliced shape."""
    own = dict(small.named_parameters())
    own.update(small.named_buffers())
    theirs = dict(pruned2.named_parameters())
    theirs.update(pruned2.named_buffers())
    for fqn, t in theirs.items():
        if fqn not in own or own[fqn].shape == t.shape:
            continue
        dim = next(d for d in range(t.dim()) if own[fqn].shape[d] != t.shape[d])
        labels = analysis2.tensor_labels.get((fqn, dim))
        groups = set(analysis2.group_of[labels[labels >= 0]].tolist()) if labels is not None \
            else set()
        cut = [(m.fqn, m.dim) for g in groups for m in analysis2.groups[g].members
               if (m.fqn, m.dim) in keep]
        cutters = _producers(analysis, cut)
        raise ControlFlowError(
            f"{where}: that path reads {fqn} (dim {dim}: {t.shape[dim]} kept there, "
            f"{own[fqn].shape[dim]} in the pruned module), coupled with channels the plan "
            f"cuts in {cutters}; the recorded path never couples them. Remedy: keep those "
            f"channels whole (ignore={cutters} in the plan), or analyse with example "
            "inputs that take this path.")
