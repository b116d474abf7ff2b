"""Capture: an ``nn.Module`` as an FX GraphModule (symbolic tracing or torch.export)."""
from __future__ import annotations

import copy
import logging
import os
import sys
import operator
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from fxprune.core.errors import OtherModeWarning, TraceError
from fxprune.core.graph_meta import get_meta, set_meta

__all__ = ["trace", "FxpruneTracer", "FallbackWarning", "OtherModeWarning",
           "capture_other_modes"]


class FallbackWarning(UserWarning):
    """``frontend="auto"`` captured the model with torch.export because fx could not."""


class FxpruneTracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` that keeps user-named leaf modules and records source lines.

    ``autowrap_functions`` are traced as single ``call_function`` nodes (leaf functions:
    timm's ``register_notrace_function`` helpers), as in ``torch.fx.Tracer``.

    Beyond ``torch.fx.Tracer`` it handles three idioms that would otherwise need the
    export fallback: iterating the result of ``chunk`` / ``split`` with explicit sizes
    (``list(x.chunk(2, 1))``, ``for y in x.split([2, 6], 1)``: the piece count is known
    from the arguments), calling a container that is not installed but whose children
    are (``self.f[1:](x)`` on an ``nn.Sequential``: traced through, each child a
    call_module), and, with ``proxy_buffers=True``, buffers as graph values (so that
    ``self.pe[:, :x.size(1)]`` slices a ``get_attr`` by a traced size).
    """

    def __init__(self, leaf_modules: Sequence[type | str] = (),
                 autowrap_functions: Sequence[Callable] = (), *,
                 proxy_buffers: bool = False) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.record_stack_traces = True
        self.proxy_buffer_attributes = proxy_buffers
        self._leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self._leaf_names = {t for t in leaf_modules if isinstance(t, str)}

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or qualname in self._leaf_names \
                or type(m).__name__ in self._leaf_names:
            return True
        if type(m) in _TRACED_COMPOSITES:  # made of layers that have rules: trace inside
            return False
        return super().is_leaf_module(m, qualname)

    def trace(self, root: Any, concrete_args: dict | None = None) -> torch.fx.Graph:
        """``torch.fx.Tracer.trace`` with the MHA fast path off: the Transformer layers'
        fast-path checks (``src.dim() == 3``, devices...) are Python control flow on
        proxies, and the slow path computes the same thing from traceable layers."""
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return super().trace(root, concrete_args)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _Proxy(node, self)

    def iter(self, obj: torch.fx.Proxy):
        """Iterate a ``chunk`` / ``split``-with-sizes result: its pieces are getitems."""
        count = _piece_count(obj.node)
        if count is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(count)])

    def call_module(self, m: torch.nn.Module, forward: Callable[..., Any],
                    args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A container made in forward (``self.f[1:]``) is traced through: its children
        are installed, it is not."""
        if isinstance(m, (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)) \
                and not self._installed(m):
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def _installed(self, m: torch.nn.Module) -> bool:
        """``m`` is in the root's module tree: a set of ids built once per trace (a scan
        of the tree per container call was 15% of a MobileNetV3 trace), the full scan
        only on a miss (a module installed during forward is still found)."""
        seen = getattr(self, "_installed_ids", None)
        if seen is None or seen[0] is not self.root:
            seen = self._installed_ids = (self.root, {id(x): x for x in self.root.modules()})
        return seen[1].get(id(m)) is m or any(m is mod for mod in self.root.modules())


# torch.nn composites with no rule of their own, built from modules that have one: the
# tracer goes inside (as torch.export does) instead of leaving them whole barriers.
_TRACED_COMPOSITES = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer,
                      torch.nn.TransformerEncoder, torch.nn.TransformerDecoder,
                      torch.nn.Transformer)


class _Proxy(torch.fx.Proxy):
    """A Proxy whose ``len()`` is known for ``chunk`` / ``split``-with-sizes results
    (``list(proxy)`` asks for it before iterating)."""

    def __len__(self) -> int:
        count = _piece_count(self.node)
        if count is None:
            return super().__len__()
        return count


_CHUNKS = ("chunk", "split", "split_with_sizes", "tensor_split")


def _piece_count(node: torch.fx.Node) -> int | None:
    """How many tensors a ``chunk(n)`` / ``split([sizes])`` / ``tensor_split([idx])`` node
    returns, when its arguments say so; None otherwise (``split(int)`` depends on shapes).

    ``chunk(n)`` returns fewer than ``n`` pieces when the dim is too short to fill them
    (size 5 in 4 chunks: 3); ``trace`` then checks the pieces on the example inputs.
    """
    if node.op not in ("call_method", "call_function"):
        return None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name not in _CHUNKS:
        return None
    rest = node.args[1:]
    second = rest[0] if rest else node.kwargs.get(
        {"chunk": "chunks", "split": "split_size_or_sections",
         "split_with_sizes": "split_sizes", "tensor_split": "indices_or_sections"}[name],
        node.kwargs.get("split_size"))
    if name == "chunk":
        return second if isinstance(second, int) else None
    if isinstance(second, (list, tuple)) and all(isinstance(v, int) for v in second):
        return len(second) + (1 if name == "tensor_split" else 0)
    if name == "tensor_split" and isinstance(second, int):
        return second
    return None


def trace(model: torch.nn.Module, example_inputs: Sequence[Any] | None = None, *,
          leaf_modules: Sequence[type | str] = (), concrete_args: dict | None = None,
          frontend: str = "auto", autowrap_functions: Sequence[Callable] = (),
          dynamic: bool = True) -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule.

    ``frontend``: "fx" (``torch.fx`` symbolic tracing with :class:`FxpruneTracer`),
    "export" (``torch.export``, ATen-level, needs ``example_inputs``), "record" (fx
    tracing that runs ``example_inputs`` and specialises data-dependent control flow to
    the path they take, ``fxprune.record``), or "auto" (fx, then export when fx fails,
    then record when export fails on data-dependent control flow; each fallback warns). ``leaf_modules`` / ``autowrap_functions`` are kept whole by
    the fx tracer; a timm model also gets timm's own (``timm.layers.get_notrace_modules``,
    ``get_notrace_functions``), which it needs to trace. ``dynamic`` (export only): keep
    the batch and sequence dims dynamic where the model allows (default); ``False``
    specialises every size to the example inputs (passes that need a static token count).
    The model itself is not modified.
    """
    if frontend not in ("auto", "fx", "export", "record"):
        raise ValueError("frontend must be 'auto', 'fx', 'export' or 'record'")
    if frontend == "record":
        from fxprune.record import record_trace
        return record_trace(model, example_inputs, leaf_modules=leaf_modules,
                            autowrap_functions=autowrap_functions)
    errors: list[str] = []
    if frontend in ("auto", "fx"):
        try:
            return _fx_trace(model, example_inputs, leaf_modules, concrete_args,
                             autowrap_functions)
        except Exception as exc:  # symbolic tracing failures have many types
            errors.append(f"symbolic tracing failed: {_where(exc)}")
            if frontend == "fx":
                raise TraceError(errors[0] + _REMEDY) from exc
    if example_inputs is None:
        raise TraceError("; ".join(errors) + ". frontend='export' needs example_inputs" + _REMEDY)
    try:
        exported = _export(model, tuple(example_inputs), dynamic=dynamic)
        gm = exported.module()
        _inline_grad_mode_regions(gm)
        set_meta(gm, "frontend", "export")
    except Exception as exc:
        errors.append(f"torch.export failed: {_where(exc)}")
        if frontend == "export" or not _data_dependent(exc):
            raise TraceError("; ".join(errors) + _REMEDY) from exc
        from fxprune.record import record_trace  # third fallback: one recorded path
        try:
            gm = record_trace(model, example_inputs, leaf_modules=leaf_modules,
                              autowrap_functions=autowrap_functions,
                              reason=" and ".join(errors) + " (data-dependent control flow)")
        except TraceError as exc2:
            raise TraceError("; ".join(errors) + f"; {exc2}" + _REMEDY) from exc
        set_meta(gm, "fallback_reason", "; ".join(errors))
        return gm
    if errors:  # auto fell back: say why, once, where the user called from
        warnings.warn(f"fxprune: captured {type(model).__name__} with torch.export (ATen "
                      f"level) because {errors[0]}. Batch and sequence dims stay dynamic "
                      "where the model allows; pass frontend='export' to silence this, or "
                      "fix the fx failure to analyse at the torch level.",
                      FallbackWarning, stacklevel=_user_stacklevel())
        set_meta(gm, "fallback_reason", errors[0])
    return gm


_CONSTANT_DEFAULTS = (type(None), bool, int, float, str)


def _none_args(model: torch.nn.Module, example_inputs: Sequence[Any] | None) -> dict:
    """Optional parameters the example inputs leave at a constant: passed as None, or not
    passed with a None/bool/int/float/str default (timm's ``attn_mask=None,
    is_causal=False``). They are fixed to that value while tracing, as the inputs say,
    rather than traced as tensors (``if mask is not None`` would be taken for every
    input), so the graph takes only the inputs given (and the ONNX exporters see no
    ``None`` inputs)."""
    if example_inputs is None:
        return {}
    import inspect

    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return {}
    inputs = tuple(example_inputs)
    if len(inputs) > len(params):
        return {}
    out = {}
    for i, p in enumerate(params):
        if i < len(inputs):
            if inputs[i] is None:
                out[p.name] = None
        elif p.default is not p.empty and type(p.default) in _CONSTANT_DEFAULTS:
            out[p.name] = p.default
    return out


def _fx_trace(model: torch.nn.Module, example_inputs: Sequence[Any] | None,
              leaf_modules: Sequence[type | str], concrete_args: dict | None,
              autowrap_functions: Sequence[Callable]) -> torch.fx.GraphModule:
    """Symbolic tracing; retried once with buffers as graph values (a buffer sliced by a
    traced size). A trace that iterated a ``chunk`` is checked on the example inputs."""
    extra_leaves, extra_functions = library_leaves(model)
    concrete_args = {**_none_args(model, example_inputs), **(concrete_args or {})} or None
    first: Exception | None = None
    for proxy_buffers in (False, True):
        tracer = FxpruneTracer(tuple(leaf_modules) + extra_leaves,
                               tuple(autowrap_functions) + extra_functions,
                               proxy_buffers=proxy_buffers)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as exc:
            first = first or exc
            if not any(True for _ in model.buffers()):
                break
            continue
        gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
        gm.training = model.training  # the root only: submodules are the user's own
        set_meta(gm, "frontend", "fx")
        # torch pickles a GraphModule with its tracer class: the plain one keeps every
        # result (and its deep copies) loadable without fxprune (re-tracing the generated
        # code needs no custom leaves: every submodule is a leaf then).
        gm._tracer_cls = gm.graph._tracer_cls = None
        if example_inputs is not None and any(
                n.op in ("call_method", "call_function") and _piece_count(n) is not None
                and n.target in ("chunk", torch.chunk) for n in graph.nodes):
            _check_runs(gm, example_inputs)
        return gm
    raise first  # the first failure is the informative one


def _user_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first caller outside fxprune and torch."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    own = (os.path.join(here, "fxprune") + os.sep, os.path.join(here, "passes") + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and (os.path.abspath(frame.f_code.co_filename).startswith(own)
                                 or "/torch/" in frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _check_runs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Run ``gm`` on fake copies of the inputs (no compute): a ``chunk`` that yields fewer
    pieces than it was asked for fails here, and ``auto`` falls back to export."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    args = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    with torch.no_grad(), mode:
        gm(*args)


def _data_dependent(exc: BaseException) -> bool:
    """Whether export failed on a guard or value that depends on tensor data."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt in chain:
            break
        chain.append(nxt)
    return any(isinstance(e, GuardOnDataDependentSymNode) or "data-dependent" in str(e)
               or "DataDependent" in type(e).__name__ for e in chain)


def _export(model: torch.nn.Module, inputs: tuple, *, dynamic: bool = True) -> Any:
    """``torch.export.export`` with the batch dim (dim 0) of every tensor input and the
    sequence dim (dim 1) of token-shaped inputs (rank 2 or 3) marked ``Dim.AUTO``: they
    stay dynamic where the model allows it, and are specialised silently where it does
    not (a size-1 example dim is always specialised). Falls back to static shapes when
    export rejects the dynamic ones."""
    if not dynamic:
        return torch.export.export(model, inputs, strict=False)
    auto = torch.export.Dim.AUTO

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        dims = {0: auto}
        if x.dim() in (2, 3):
            dims[1] = auto
        return dims

    try:
        return torch.export.export(model, inputs, strict=False,
                                   dynamic_shapes=tuple(spec(x) for x in inputs))
    except Exception:  # dynamic shapes unsupported here: static export still prunes
        return torch.export.export(model, inputs, strict=False)


def library_leaves(model: torch.nn.Module) -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """Leaf modules and functions a model's library registers for fx tracing (timm: the
    model or one of its submodules comes from it)."""
    if not any(type(m).__module__.startswith("timm.") for m in model.modules()):
        return (), ()
    from timm.layers import get_notrace_functions, get_notrace_modules

    from passes.rules.timm import LEAF_MODULES, register

    register()
    return tuple(get_notrace_modules()) + tuple(LEAF_MODULES), tuple(get_notrace_functions())


def _inline_grad_mode_regions(gm: torch.fx.GraphModule) -> None:
    """Inline export's ``wrap_with_set_grad_enabled`` regions between explicit grad-mode
    switches, so that their ops are analysed (rotary tables are computed under no_grad:
    their frequencies are what pair rotary dims)."""
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is hop]:
        enabled, body_attr, *args = node.args
        body = getattr(gm, body_attr.target)
        if not isinstance(body, torch.fx.GraphModule) or any(
                n.op in ("get_attr", "call_module") for n in body.graph.nodes):
            continue  # bodies that read their own attributes stay wrapped (a barrier)
        _inline_grad_mode_regions(body)
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(node):
            previous = graph.call_function(torch.is_grad_enabled)
            graph.call_function(torch._C._set_grad_enabled, (enabled,))
            result = graph.graph_copy(body.graph, dict(zip(placeholders, args)))
            graph.call_function(torch._C._set_grad_enabled, (previous,))
        for user in list(node.users):
            if user.target is operator.getitem and isinstance(result, (tuple, list)):
                user.replace_all_uses_with(result[user.args[1]])
                graph.erase_node(user)
        if node.users:
            node.replace_all_uses_with(result)
        graph.erase_node(node)
        if not body_attr.users:
            graph.erase_node(body_attr)
            gm.delete_submodule(body_attr.target)
    graph.lint()
    gm.recompile()


_REMEDY = (". Remedy: mark the offending module as a leaf (leaf_modules=(ModuleClass,)), "
           "pass concrete_args for Python control flow on inputs, or try frontend='export'.")


_OWN_FILES = (os.path.abspath(__file__),)


def _is_user_frame(path: str) -> bool:
    return "/torch/" not in path and os.path.abspath(path) not in _OWN_FILES


def _where(exc: BaseException) -> str:
    """The exception and the innermost frame outside torch: file, line and module class."""
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    frames = traceback.extract_tb(exc.__traceback__)
    tb = exc.__traceback__
    owner = None
    while tb is not None:
        frame = tb.tb_frame
        path = frame.f_code.co_filename
        if _is_user_frame(path):
            self_obj = frame.f_locals.get("self")
            if isinstance(self_obj, torch.nn.Module):
                owner = type(self_obj).__name__
        tb = tb.tb_next
    user = [f for f in frames if _is_user_frame(f.filename)]
    if user:
        f = user[-1]
        text += f" (at {f.filename}:{f.lineno}: {f.line}"
        text += f", in module {owner})" if owner else ")"
    return text


def capture_other_modes(model: torch.nn.Module, gm: torch.fx.GraphModule, inputs: tuple, *,
                        leaf_modules: Sequence[type | str] = (), concrete_args: dict | None = None,
                        autowrap_functions: Sequence[Callable] = ()) -> dict:
    """``{mode: passes.find_groups.OtherMode}`` for ``model`` captured in its other mode
    (train when it was captured in eval), where ``gm`` left parameterised submodules
    unrun and that mode runs them; ``{}`` otherwise.

    The other capture traces a deep copy (``model`` and its mode are untouched), with fx
    only, and propagates shapes on ``inputs``. Merged or not, it is announced
    (``OtherModeWarning``) and recorded in ``gm``'s meta (``other_modes``: per mode the
    modules only it runs and, where it could not be analysed, why)."""
    from passes.slice_module import unrun_modules

    unrun = tuple(unrun_modules(model, gm))
    frontend = get_meta(gm, "frontend")
    if not unrun or frontend == "record":  # a recorded path handles its own branches
        return {}
    mode = "eval" if model.training else "train"
    shown = ", ".join(unrun[:4]) + (" ..." if len(unrun) > 4 else "")
    if frontend != "fx":  # recorded for the module output's refusal; no warning here
        set_meta(gm, "other_modes", {mode: {"modules": unrun, "analysed": False, "why": (
            f"the graph was captured by the {frontend} front-end; only fx captures are "
            f"merged across modes")}})
        return {}
    try:
        other, runs = _capture_in_mode(model, inputs, mode == "train", leaf_modules,
                                       concrete_args, autowrap_functions, unrun)
    except Exception as exc:  # tracing and shape propagation fail in many ways
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        set_meta(gm, "other_modes", {mode: {"modules": unrun, "analysed": False, "why": why}})
        warnings.warn(f"fxprune: {type(model).__name__}'s {shown} never ran in the captured "
                      f"graph and its {mode}-mode path could not be analysed on the example "
                      f"inputs ({why}); compile(output=\"module\") will refuse where their "
                      f"input is pruned. Remedy: example inputs the model accepts in {mode} "
                      f"mode, ignore=[...] for the channels they read, or output=\"graph\".",
                      OtherModeWarning, stacklevel=_user_stacklevel())
        return {}
    if not runs:  # dead in both modes: nothing to merge
        return {}
    from passes.find_groups import OtherMode

    set_meta(gm, "other_modes", {mode: {"modules": runs, "analysed": True, "why": ""}})
    warnings.warn(f"fxprune: {type(model).__name__}'s {', '.join(runs[:4])} run only in "
                  f"{mode} mode: the {mode}-mode path was captured and analysed too (the "
                  f"channels they read are coupled with the groups, their own are kept "
                  f"whole; analysis.notes).", OtherModeWarning, stacklevel=_user_stacklevel())
    return {mode: OtherMode(other, tuple(inputs), runs)}


def _capture_in_mode(model: torch.nn.Module, inputs: tuple, train: bool,
                     leaf_modules: Sequence[type | str], concrete_args: dict | None,
                     autowrap_functions: Sequence[Callable], unrun: tuple[str, ...]
                     ) -> tuple[torch.fx.GraphModule, tuple[str, ...]]:
    """The fx graph of a deep copy of ``model`` in mode ``train``, shapes propagated on
    ``inputs``, and which of ``unrun`` it runs."""
    from passes.shape_prop import propagate_shapes

    copy_ = copy.deepcopy(model).train(train)
    other = _fx_trace(copy_, inputs, leaf_modules, concrete_args, autowrap_functions)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # a failure here is reported once, as a warning
    try:
        propagate_shapes(other, inputs)
    finally:
        fake_log.setLevel(level)
    held = {f for f, _ in other.named_parameters(remove_duplicate=False)}
    runs = tuple(p for p in unrun if any(f.startswith(p + ".") for f in held))
    return other, runs
