"""Keeping a pruned model: save it so that torch alone loads it, or export it to ONNX.

    fxprune.save(small, "small.pt")                        # torch.load(path, weights_only=False)
    fxprune.save(small, "small.pt2", example_inputs=(x,))  # torch.export.load(path).module()
    fxprune.export_onnx(small, (x,), "small.onnx")         # onnxruntime.InferenceSession(path)

Every save goes to a temporary file in the target directory and is moved into place with
``os.replace`` only once it is complete: a failed save leaves no file behind (and an
existing file at ``path`` untouched). A pickle is checked before it is moved into place:
one that would need fxprune (or ``passes``) to load raises ``SaveError`` naming the class.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import pickletools
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx

from fxprune.core.errors import OnnxExportError, SaveError

__all__ = ["save", "portable", "fxprune_references", "export_onnx", "onnx_exporter",
           "atomic_write"]

#: packages a saved model must not need (the project's own)
OWN_PACKAGES = ("fxprune", "passes")


# ----------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; moved onto ``path`` when the block exits
    cleanly, deleted when it raises. Raises ``SaveError`` when the directory is not
    writable."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fxprune-", suffix=os.path.basename(path),
                                   dir=folder)
    except OSError as exc:
        raise SaveError(f"cannot write {path!r}: {exc.strerror or exc}; choose a "
                        "writable directory") from exc
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------------
# Pickles that load with torch alone
# ----------------------------------------------------------------------------------
def fxprune_references(pickle_bytes: bytes) -> list[str]:
    """``module.qualname`` of every global in a pickle stream that lives in fxprune or
    ``passes`` (what loading it would import). Empty: torch alone loads it."""
    found, strings = [], []
    for op, arg, _ in pickletools.genops(pickle_bytes):
        if op.name in ("GLOBAL", "INST"):
            name = str(arg).replace(" ", ".")
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            name = f"{strings[-2]}.{strings[-1]}"
        else:
            if isinstance(arg, str):
                strings.append(arg)
            continue
        if name.split(".")[0] in OWN_PACKAGES:
            found.append(name)
    return sorted(set(found))


def _torch_save_references(path: str) -> list[str]:
    """The fxprune globals in every pickle of a ``torch.save`` zip file."""
    refs: list[str] = []
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith(".pkl"):
                refs += fxprune_references(zf.read(name))
    return sorted(set(refs))


def portable(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` that pickles (``torch.save``) and loads with torch alone.

    A GraphModule from ``torch.export(...).module()`` (fxprune's export front-end) holds a
    ``_guards_fn`` submodule whose ``forward`` is a local function (unpicklable): the copy
    drops that call (it only re-checks the example input shapes; the pruned model was
    verified already). The tracer class is reset to ``torch.fx.Tracer`` (torch re-traces
    the generated code on load with it). ``model`` itself is never modified.
    """
    new = copy.deepcopy(model)
    for gm in (m for m in new.modules() if isinstance(m, torch.fx.GraphModule)):
        gm._tracer_cls = gm.graph._tracer_cls = None
        guards = [n for n in gm.graph.nodes
                  if n.op == "call_module" and n.target == "_guards_fn" and not n.users]
        for node in guards:
            gm.graph.erase_node(node)
        if guards and hasattr(gm, "_guards_fn"):
            delattr(gm, "_guards_fn")
        if guards:
            gm.graph.lint()
            gm.recompile()
    return new


def save(model: torch.nn.Module, path: str | os.PathLike, *,
         example_inputs: Sequence[Any] | None = None) -> str:
    """Save a (pruned) model so that it loads without fxprune; return ``path``.

    Without ``example_inputs``: ``torch.save`` of :func:`portable` (load with
    ``torch.load(path, weights_only=False)``; the classes of the model's own modules must
    be importable, fxprune's need not be). With ``example_inputs``: a ``torch.export``
    program (``torch.export.load(path).module()``), batch dim dynamic where the model
    allows it; it needs neither fxprune nor the model's classes.

    Raises ``SaveError`` (nothing written, an existing ``path`` untouched) when the pickle
    would reference fxprune (e.g. a model holding ``fxprune.nn.PrunedMultiheadAttention``:
    save it with ``example_inputs`` instead), when pickling fails, or when the directory
    is not writable.
    """
    path = os.fspath(path)
    with atomic_write(path) as tmp:
        if example_inputs is not None:
            _save_program(model, _as_inputs(example_inputs), tmp)
            return path
        try:
            torch.save(portable(model), tmp)
        except Exception as exc:
            raise SaveError(f"cannot pickle {type(model).__name__}: "
                            f"{type(exc).__name__}: {exc}; save it as a torch.export "
                            "program: fxprune.save(model, path, example_inputs=...)") from exc
        refs = _torch_save_references(tmp)
        if refs:
            raise SaveError(f"{path}: the pickle would need fxprune to load ({refs[0]}"
                            f"{f' and {len(refs) - 1} more' if len(refs) > 1 else ''}); "
                            "save it as a torch.export program instead: "
                            "fxprune.save(model, path, example_inputs=...)")
    return path


def _save_program(model: torch.nn.Module, inputs: tuple, path: str) -> None:
    """``torch.export`` with a dynamic batch dim where the model allows it (traced at
    batch 2: torch specialises a size of 1), else static at the example shapes."""
    with torch.no_grad():
        try:
            doubled = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim()
                            else x for x in inputs)
            dims = tuple({0: torch.export.Dim.AUTO}
                         if isinstance(x, torch.Tensor) and x.dim() else None
                         for x in inputs)
            program = torch.export.export(model, doubled, dynamic_shapes=dims)
        except Exception:  # not batch-polymorphic: a static program still runs everywhere
            try:
                program = torch.export.export(model, inputs)
            except Exception as exc:
                raise SaveError(f"torch.export failed on {type(model).__name__}: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0]}; save "
                                "without example_inputs (a pickle)") from exc
    torch.export.save(program, path)


# ----------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------
def onnx_exporter() -> str:
    """``"dynamo"`` when ``onnxscript`` is importable (``torch.onnx.export(dynamo=True)``
    needs it, and nothing else: it works offline), else ``"legacy"`` (TorchScript-based,
    in torch itself). Raises ``OnnxExportError`` when ``onnx`` itself is missing."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise OnnxExportError("ONNX export needs the onnx package: "
                              "pip install 'fxprune[onnx]'")
    return "dynamo" if importlib.util.find_spec("onnxscript") is not None else "legacy"


def _as_inputs(example_inputs: Any) -> tuple:
    """One tensor is one input, as ``fxprune.analyze`` reads it (``tuple(x)`` would pass
    its batch rows as inputs: a 3-D input where the model wants 4-D)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def export_onnx(model: torch.nn.Module, example_inputs: Sequence[Any],
                path: str | os.PathLike, *, exporter: str = "auto",
                opset_version: int | None = None, dynamic_batch: bool = True) -> str:
    """Export a (pruned) model to ONNX at ``path`` (atomically); return ``path``.

    ``exporter``: ``"auto"`` (:func:`onnx_exporter`, then the other one when it fails),
    ``"dynamo"`` or ``"legacy"``. A GraphModule is first given
    ``passes.bake_constants``: placeholders the caller does not pass (a traced timm ViT's
    ``attn_mask=None, is_causal=False``) become constants, which the legacy exporter needs.
    ``dynamic_batch``: dim 0 of every tensor input (and output) is a dynamic axis.
    The model is exported in eval mode; ``model`` itself is never modified.

    Raises ``OnnxExportError`` naming the graph node the exporter failed on (when it can
    be found) and the exporter's first message line; nothing is written then.
    """
    inputs = _as_inputs(example_inputs)
    chosen = onnx_exporter() if exporter == "auto" else exporter
    if chosen not in ("dynamo", "legacy"):
        raise OnnxExportError(f"unknown exporter {exporter!r}: use auto, dynamo or legacy")
    order = [chosen] + ([{"dynamo": "legacy", "legacy": "dynamo"}[chosen]]
                        if exporter == "auto" and chosen == "dynamo" else [])
    target = _onnx_ready(model, len(inputs))
    path = os.fspath(path)
    failures: list[tuple[str, BaseException]] = []
    for name in order:
        try:
            with atomic_write(path) as tmp:
                _EXPORTERS[name](target, inputs, tmp, opset_version, dynamic_batch)
            return path
        except SaveError:
            raise
        except Exception as exc:
            failures.append((name, exc))
    name, exc = failures[0]
    node = _failing_node(target, failures)
    where = f" at node {node.name!r} ({node.format_node()})" if node is not None else ""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    raise OnnxExportError(f"ONNX export ({', '.join(n for n, _ in failures)}) failed{where}: "
                          f"{type(exc).__name__}: {first}; export the un-pruned model to "
                          "check the op is supported, or report it") from exc


def _onnx_ready(model: torch.nn.Module, n_inputs: int) -> torch.nn.Module:
    from passes.bake_constants import bake_constants

    if isinstance(model, torch.fx.GraphModule):
        return bake_constants(portable(model), n_inputs).eval()
    return copy.deepcopy(model).eval()


def _names(model: torch.nn.Module, inputs: tuple
           ) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """Input and output names, and the batch axes: dim 0 of every tensor input, and of
    every output whose dim 0 is the batch size (names are required for dynamic axes)."""
    with torch.no_grad():
        outs = torch.utils._pytree.tree_leaves(model(*inputs))
    names = [f"input_{i}" for i in range(len(inputs))]
    out_names = [f"output_{i}" for i in range(len(outs))]
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim()]
    batch = tensors[0].shape[0] if tensors else None
    axes = {n: {0: "batch"} for n, x in zip(names, inputs)
            if isinstance(x, torch.Tensor) and x.dim()}
    axes.update({n: {0: "batch"} for n, y in zip(out_names, outs)
                 if isinstance(y, torch.Tensor) and y.dim() and y.shape[0] == batch})
    return names, out_names, axes


def _export_legacy(model: torch.nn.Module, inputs: tuple, path: str,
                   opset: int | None, dynamic_batch: bool) -> None:
    names, out_names, axes = _names(model, inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # chosen on purpose (no onnxscript)
        torch.onnx.export(model, inputs, path, dynamo=False, input_names=names,
                          output_names=out_names, opset_version=opset or 17,
                          dynamic_axes=axes if dynamic_batch else None)


def _export_dynamo(model: torch.nn.Module, inputs: tuple, path: str,
                   opset: int | None, dynamic_batch: bool) -> None:
    names, out_names, axes = _names(model, inputs)
    # the batch as torch.export's dynamic_shapes (dynamic_axes under dynamo=True warns);
    # AUTO: dynamic where the graph allows it, so a batch-1 example does not fail export
    shapes = tuple({0: torch.export.Dim.AUTO} if n in axes else None
                   for n in names) if dynamic_batch else None
    with torch.no_grad():
        program = torch.onnx.export(model, inputs, dynamo=True, input_names=names,
                                    output_names=out_names, verbose=False,
                                    opset_version=opset, report=False, verify=False,
                                    dynamic_shapes=shapes)
        if dynamic_batch:
            _name_batch_dim(program.model, names)
        program.save(path, external_data=False)


def _name_batch_dim(model: Any, names: list[str]) -> None:
    """Call the exported batch symbol "batch" everywhere (``Dim.AUTO`` names it ``s77``)."""
    import onnx_ir as ir

    graph = model.graph
    inputs = [v for v in graph.inputs if v.name in names and v.shape is not None]
    symbols = {str(v.shape[0]) for v in inputs if isinstance(v.shape[0], ir.SymbolicDim)}
    if len(symbols) != 1:
        return  # no dynamic batch, or several: leave the exporter's names
    old = symbols.pop()
    values = list(graph.inputs) + list(graph.outputs) + [o for n in graph.all_nodes()
                                                         for o in n.outputs]
    for v in values:
        if v.shape is not None and any(isinstance(d, ir.SymbolicDim) and str(d) == old
                                       for d in v.shape):
            v.shape = ir.Shape(["batch" if isinstance(d, ir.SymbolicDim) and str(d) == old
                                else d for d in v.shape])


_EXPORTERS: dict[str, Callable[..., None]] = {"legacy": _export_legacy,
                                              "dynamo": _export_dynamo}


def _failing_node(model: torch.nn.Module,
                  failures: list[tuple[str, BaseException]]) -> torch.fx.Node | None:
    """The graph node an exporter's message points at: the generated-code line marked
    ``<--- HERE`` (TorchScript), else the first node name the message mentions."""
    if not isinstance(model, torch.fx.GraphModule):
        return None
    nodes = {n.name: n for n in model.graph.nodes if n.op not in ("placeholder", "output")}
    for _, exc in failures:
        text = "".join(str(e) for e in _chain(exc))
        marked = text.split("<--- HERE")[0] if "<--- HERE" in text else ""
        for line in reversed(marked.splitlines()):
            m = re.match(r"\s*(\w+)\s*=", line)
            if m and m.group(1) in nodes:
                return nodes[m.group(1)]
        for word in re.findall(r"(?:%|node[ `'\"]+|`|')([A-Za-z_]\w*)", text):
            if word in nodes:
                return nodes[word]
    return None


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen = 0
    while exc is not None and seen < 8:
        yield exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
