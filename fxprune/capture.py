"""Capture: an ``nn.Module`` as an FX GraphModule (symbolic tracing or torch.export)."""
from __future__ import annotations

import os
import operator
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from fxprune.errors import TraceError

__all__ = ["trace", "FxpruneTracer"]


class FxpruneTracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` that keeps user-named leaf modules and records source lines.

    ``autowrap_functions`` are traced as single ``call_function`` nodes (leaf functions:
    timm's ``register_notrace_function`` helpers), as in ``torch.fx.Tracer``.
    """

    def __init__(self, leaf_modules: Sequence[type | str] = (),
                 autowrap_functions: Sequence[Callable] = ()) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.record_stack_traces = True
        self._leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self._leaf_names = {t for t in leaf_modules if isinstance(t, str)}

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or qualname in self._leaf_names \
                or type(m).__name__ in self._leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: torch.nn.Module, example_inputs: Sequence[Any] | None = None, *,
          leaf_modules: Sequence[type | str] = (), concrete_args: dict | None = None,
          frontend: str = "auto",
          autowrap_functions: Sequence[Callable] = ()) -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule.

    ``frontend``: "fx" (``torch.fx`` symbolic tracing with :class:`FxpruneTracer`),
    "export" (``torch.export``, ATen-level, needs ``example_inputs``), or "auto" (fx, then
    export when fx fails). ``leaf_modules`` / ``autowrap_functions`` are kept whole by
    the fx tracer; a timm model also gets timm's own (``timm.layers.get_notrace_modules``,
    ``get_notrace_functions``), which it needs to trace. The model itself is not modified.
    """
    if frontend not in ("auto", "fx", "export"):
        raise ValueError("frontend must be 'auto', 'fx' or 'export'")
    errors: list[str] = []
    if frontend in ("auto", "fx"):
        try:
            extra_leaves, extra_functions = library_leaves(model)
            tracer = FxpruneTracer(tuple(leaf_modules) + extra_leaves,
                                   tuple(autowrap_functions) + extra_functions)
            graph = tracer.trace(model, concrete_args=concrete_args)
            name = type(model).__name__
            gm = torch.fx.GraphModule(tracer.root, graph, name)
            gm.training = model.training  # the root only: submodules are the user's own
            gm.meta["fxprune_frontend"] = "fx"
            return gm
        except Exception as exc:  # symbolic tracing failures have many types
            errors.append(f"symbolic tracing failed: {_where(exc)}")
            if frontend == "fx":
                raise TraceError(errors[0] + _REMEDY) from exc
    if example_inputs is None:
        raise TraceError("; ".join(errors) + ". frontend='export' needs example_inputs" + _REMEDY)
    try:
        exported = torch.export.export(model, tuple(example_inputs), strict=False)
        gm = exported.module()
        _inline_grad_mode_regions(gm)
        gm.meta["fxprune_frontend"] = "export"
        return gm
    except Exception as exc:
        errors.append(f"torch.export failed: {_where(exc)}")
        raise TraceError("; ".join(errors) + _REMEDY) from exc


def library_leaves(model: torch.nn.Module) -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """Leaf modules and functions a model's library registers for fx tracing (timm: the
    model or one of its submodules comes from it)."""
    if not any(type(m).__module__.startswith("timm.") for m in model.modules()):
        return (), ()
    from timm.layers import get_notrace_functions, get_notrace_modules

    from passes.rules.timm import register

    register()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


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

