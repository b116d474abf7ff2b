"""``frontend="record"``: capture ONE path of a model with data-dependent control flow.

``torch.fx`` symbolic tracing cannot decide ``if x.sum() > 0:`` and ``torch.export``
refuses a data-dependent guard. ``record_trace`` traces with :class:`RecordingTracer`,
an ``FxpruneTracer`` whose proxies also carry the real value computed on the example
inputs: where Python reads a traced value (``bool`` of a branch or a ``while`` test,
``int``/``float``/``len`` of a traced value, ``.item()`` / ``.tolist()``), the real value
is used and the point is recorded with its source line in ``gm.meta["fxprune"]
["specialised"]``. The graph therefore holds the one path the example inputs took; it is
analysed and planned as any fx graph.

The only result that keeps the model's control flow is the user's own module
(``compile(..., output="module")``); ``output="graph"`` on a specialised capture raises
``ControlFlowError``. :func:`check_paths` proves the pruned module on further inputs: an
input that takes the recorded path is compared with the pruned graph; an input that takes
another path is recorded again, the plan is carried over to that path's analysis by
parameter indices, that path's graph is compiled (checked slice == mask) and the module
must equal it; any disagreement raises ``ControlFlowError``.
"""
from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
from torch.fx.node import map_aggregate

from fxprune.capture import FallbackWarning, FxpruneTracer, _Proxy, _is_user_frame, \
    _user_stacklevel, library_leaves
from fxprune.errors import ControlFlowError, FxpruneError, TraceError
from fxprune.graph_meta import get_meta, set_meta

__all__ = ["RecordingTracer", "record_trace", "check_paths", "specialised"]

# methods whose result Python receives as a plain value: specialised, not traced
_TO_PYTHON = ("item", "tolist")


def _source() -> str:
    """The innermost user frame (outside torch and fxprune) of the current stack."""
    for f in reversed(traceback.extract_stack()[:-2]):
        if _is_user_frame(f.filename) and "/fxprune/" not in f.filename:
            return f"{f.filename}:{f.lineno}: {f.line}"
    return "<unknown>"


def _real(a: Any) -> Any:
    return map_aggregate(a, lambda v: v.value if isinstance(v, _RecordProxy) else v)


class _RecordProxy(_Proxy):
    """A proxy holding the real value of its node on the example inputs."""

    value: Any = None

    def __len__(self) -> int:
        if isinstance(self.value, torch.Tensor) or self.node.op == "placeholder":
            self.tracer.record("len", self.value.__len__())
        return len(self.value)

    def __int__(self) -> int:
        return self.tracer.record("int", int(self.value))

    def __index__(self) -> int:
        return self.tracer.record("int", int(self.value))

    def __float__(self) -> float:
        return self.tracer.record("float", float(self.value))


class RecordingTracer(FxpruneTracer):
    """``FxpruneTracer`` that computes every node on ``example_inputs`` as it traces and
    answers Python's questions about traced values with the real ones (recorded)."""

    def __init__(self, example_inputs: Sequence[Any], leaf_modules: Sequence = (),
                 autowrap_functions: Sequence[Callable] = ()) -> None:
        super().__init__(leaf_modules, autowrap_functions)
        self._inputs = list(example_inputs)
        self._placeholders = 0
        self.specialised: list[tuple[str, str, Any]] = []

    def record(self, kind: str, value: Any) -> Any:
        self.specialised.append((kind, _source(), value))
        return value

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _RecordProxy(node, self)

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        return self.record("bool", bool(obj.value))

    def iter(self, obj: torch.fx.Proxy):
        return iter([obj[i] for i in range(len(obj.value))])

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict,
                     name: str | None = None, type_expr: Any = None,
                     proxy_factory_fn: Any = None) -> Any:
        value = self._value(kind, target, args, kwargs)
        if kind == "call_method" and target in _TO_PYTHON:
            return self.record(target, value)  # Python gets the number: specialised
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


def record_trace(model: torch.nn.Module, example_inputs: Sequence[Any], *,
                 leaf_modules: Sequence = (), autowrap_functions: Sequence[Callable] = (),
                 warn: bool = True) -> torch.fx.GraphModule:
    """A GraphModule of the one path ``model`` takes on ``example_inputs``; when Python
    read a traced value, a ``FallbackWarning`` names every such source line."""
    if example_inputs is None:
        raise TraceError("frontend='record' needs example_inputs (it runs the model on "
                         "them). Remedy: pass example inputs.")
    extra_leaves, extra_functions = library_leaves(model)
    tracer = RecordingTracer(tuple(example_inputs), tuple(leaf_modules) + extra_leaves,
                             tuple(autowrap_functions) + extra_functions)
    was_training = model.training
    try:
        graph = tracer.trace(model)
    except FxpruneError:
        raise
    except Exception as exc:
        from fxprune.capture import _where
        raise TraceError(f"recording one path failed: {_where(exc)}") from exc
    finally:
        model.train(was_training)
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.training = model.training
    gm._tracer_cls = gm.graph._tracer_cls = None
    set_meta(gm, "frontend", "record")
    set_meta(gm, "specialised", tuple(tracer.specialised))
    if tracer.specialised and warn:
        warnings.warn(f"fxprune: {type(model).__name__}'s control flow was specialised to "
                      f"the path the example inputs take: {describe(tracer.specialised)}. "
                      "Only compile(..., output='module') keeps the model's own control "
                      "flow; prove it on inputs that take other paths with "
                      "fxprune.check_paths(model, small, plan, [inputs, ...]).",
                      FallbackWarning, stacklevel=_user_stacklevel())
    return gm


def specialised(gm: Any) -> tuple:
    """The recorded specialisation points of a ``"record"`` capture (empty otherwise)."""
    return tuple(get_meta(gm, "specialised", ()) or ())


def describe(points: Sequence[tuple[str, str, Any]], limit: int = 4) -> str:
    seen: dict[str, list] = {}
    for kind, where, value in points:
        seen.setdefault(f"{kind} at {where}", []).append(value)
    items = [f"{k} -> {v[0] if len(v) == 1 else v}" for k, v in seen.items()]
    return "; ".join(items[:limit]) + (f"; ... ({len(items) - limit} more)"
                                       if len(items) > limit else "")


def _same_path(a: Sequence, b: Sequence) -> bool:
    if len(a) != len(b):
        return False
    for (ka, wa, va), (kb, wb, vb) in zip(a, b):
        if ka != kb or wa != wb or va != vb:
            return False
    return True


def check_paths(model: torch.nn.Module, small: torch.nn.Module, plan: Any,
                inputs: Sequence[Any], *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Prove ``small`` (``compile(model, plan, output="module")`` of a ``"record"``
    capture) on each input tuple of ``inputs``: against the pruned recorded graph when
    the input takes the recorded path, against that path's own pruned graph otherwise.
    Raises ``ControlFlowError`` naming the branch lines where they disagree."""
    from fxprune.api import analyze
    from passes.slice_weights import check_sliced, slice_weights
    from fxprune.plan import Plan
    from fxprune.errors import PlanError

    analysis = plan.analysis
    recorded = specialised(analysis.gm)
    kept = plan.kept_labels(analysis)
    keep = {}
    for (fqn, dim), labels in analysis.tensor_labels.items():
        inside = labels >= 0
        if inside.any() and not kept[labels[inside]].all():
            keep[(fqn, dim)] = np.flatnonzero(~inside | kept[np.maximum(labels, 0)])
    for n, x in enumerate(inputs):
        x = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        gm2 = record_trace(model, x, warn=False)
        path = specialised(gm2)
        where = (f"check input {n}: it takes another path ({describe(path)}) than the "
                 f"example inputs ({describe(recorded)})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            analysis2 = analyze(gm2, x)
            mine = {k: v for k, v in keep.items() if k in analysis2.tensor_labels}
            try:
                plan2 = Plan.from_tensor_indices(analysis2, mine)
                kept2 = plan2.kept_labels(analysis2)
                pruned2 = slice_weights(analysis2, kept2)
                check_sliced(pruned2, analysis2, kept2, x)  # slice == mask on this path
            except PlanError as exc:
                raise ControlFlowError(f"{where}, and the plan does not carry over to it: "
                                       f"{exc}. Remedy: ignore= the modules of that "
                                       "branch, or prune with output='graph' on a model "
                                       "without the branch.") from exc
        small.eval()
        with torch.no_grad():
            try:
                got = small(*x)
            except Exception as exc:
                raise ControlFlowError(f"{where}, on which the pruned module fails "
                                       f"({type(exc).__name__}: {exc}): that path uses "
                                       "pruned channels where the recorded one did not. "
                                       "Remedy: ignore= the modules of that branch.") from exc
            want = pruned2(*x)
        from fxprune.api import flat_tensors
        for i, (g, w) in enumerate(zip(flat_tensors(got), flat_tensors(want))):
            if g.shape != w.shape or not torch.allclose(g.double(), w.double(), rtol=rtol,
                                                        atol=atol):
                err = (g.double() - w.double()).abs().max().item() \
                    if g.shape == w.shape else f"shape {tuple(g.shape)} vs {tuple(w.shape)}"
                same = "the recorded path" if _same_path(path, recorded) else "another path"
                raise ControlFlowError(
                    f"check input {n} (taking {same}: {describe(path)}): the pruned module's "
                    f"output {i} differs from that path's pruned graph (max |err| {err}). "
                    "Remedy: ignore= the modules of the branch, or do not prune this model "
                    "through a recorded path.")
