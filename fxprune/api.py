"""The public pipeline: analyze -> Plan -> compile -> verify."""
from __future__ import annotations

import copy
from collections import Counter
import math
import dataclasses
import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


import torch
import torch.fx

from fxprune.capture import capture_other_modes, trace
from fxprune.core.errors import (ControlFlowError, PlanError, RewriteError, ShapePropagationError,
                            VerificationError)
from fxprune.core.digest import DIGESTS, changed_tensors, state_digest
from fxprune.core.graph_meta import get_meta, set_meta
from fxprune.core.pipeline import Step, run_steps
from fxprune.core.groups import GroupAnalysis
from fxprune.core.plan import Plan
from passes.find_groups import find_groups
from passes.mask import insert_masks, insert_masks_shared, zero_slices
from passes.fold_bn import check_fold, fold_bn as fold_batchnorm
from passes.memory_format import MEMORY_FORMATS, to_channels_last
from passes.rules.registry import check_attention_scale
from passes.shape_prop import eval_mode, output_shape, propagate_shapes
from passes.slice_weights import check_sliced, slice_weights

__all__ = ["analyze", "compile", "verify", "VerifyReport", "GroupCheck"]


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def analyze(model: torch.nn.Module, example_inputs: Any, *, leaf_modules: Sequence = (),
            concrete_args: dict | None = None, frontend: str = "auto", strict: bool = False,
            split_policy: str = "inner", autowrap_functions: Sequence = ()) -> GroupAnalysis:
    """Trace ``model``, propagate shapes (fake tensors) and find its coupled groups.

    ``split_policy`` decides the unit where a channel dim is split into several (attention
    heads, channel shuffle): "head_dim" (alias "inner", default) makes one index of every
    head a unit; "heads" (alias "outer") makes one whole head a unit. ``strict=True``
    raises ``UnsupportedOpError`` instead of treating an unknown op as a barrier.
    Works on models whose weights live on ``meta``. The model is not modified.

    Where the captured graph leaves submodules with parameters unrun because they run only
    in the other mode (GoogLeNet's ``aux1``/``aux2``, Inception-v3's ``AuxLogits``: train
    only), a deep copy is captured in that mode too (fx) and its couplings and pins are
    merged (``find_groups(..., other_modes=)``): plans are valid for both paths and
    ``compile(output="module")`` slices those heads. Announced by ``OtherModeWarning``
    and ``analysis.notes``; where that mode cannot be analysed on ``example_inputs``
    (Inception-v3's head below 299x299) the warning says why and the module output is
    refused where the heads' input is pruned.
    """
    inputs = _as_tuple(example_inputs)
    pre_traced = isinstance(model, torch.fx.GraphModule) and \
        get_meta(model, "frontend") is not None

    def capture(_: Any) -> torch.fx.GraphModule:
        if pre_traced:
            return model
        return trace(model, inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                     frontend=frontend, autowrap_functions=autowrap_functions)

    def shapes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        propagate_shapes(gm, inputs)
        return gm

    def groups(gm: torch.fx.GraphModule) -> GroupAnalysis:
        others = {} if pre_traced else capture_other_modes(
            model, gm, inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
            autowrap_functions=autowrap_functions)  # train-only heads: merged
        return find_groups(gm, strict=strict, split_policy=split_policy, example_inputs=inputs,
                           other_modes=others)

    steps = [Step("trace", capture), Step("propagate_shapes", shapes, _lint),
             Step("find_groups", groups)]
    analysis = run_steps("fxprune.analyze", steps, None)
    if pre_traced:
        return analysis
    from fxprune.module_output import uniform_constraints  # API layer, Hugging Face only

    whole, links = uniform_constraints(model, analysis)
    if not (whole or links):
        return analysis
    return dataclasses.replace(analysis, uniform_whole=whole, uniform_links=links)


def _lint(gm: torch.fx.GraphModule) -> None:
    gm.graph.lint()


def compile(model: torch.nn.Module | GroupAnalysis, plan: Plan, *,
            example_inputs: Any = None, check: bool = True,
            attention_scale: str = "original", output: str = "graph",
            fold_bn: bool = False, memory_format: str | None = None) -> torch.nn.Module:
    """A new, smaller GraphModule that applies ``plan``; ``model`` is left untouched.

    ``output="module"``: instead, a deep copy of ``model`` keeping its own class (its
    methods, submodule access, train mode, other shapes), holding the GraphModule's
    sliced tensors, with torch module attributes and a Hugging Face ``config`` updated
    (``passes.slice_module``, ``fxprune.hf``). It is checked against the GraphModule in
    float64 on the example inputs and a doubled batch: ``ModuleOutputError`` (or
    ``LiteralSizeError``, naming the source line of a literal size) when they differ.

    ``fold_bn=True`` folds eval-mode BatchNorm into the conv/linear before it after
    slicing (``passes.fold_bn``; ``passes.fold_bn.check_fold`` proves it in float64);
    graph output only.

    ``memory_format="channels_last"`` stores every conv weight channels-last, so CPU
    convolutions run NHWC (``passes.memory_format``; values unchanged, proven in float64
    by ``check_memory_format`` when ``check``). Whether that is faster is measured, not
    assumed: ``fxprune.bench.faster_memory_format``; ``None`` / ``"contiguous"`` keep the
    layout.

    A capture that specialised data-dependent control flow (``frontend="record"``)
    compiles only with ``output="module"``; ``"graph"`` raises ``ControlFlowError``.

    ``model`` may be the analysed model (the plan's own analysis is reused when it was
    made for this model), a ``GroupAnalysis``, or a model plus ``example_inputs`` to
    re-analyse (for a plan loaded from JSON).

    ``attention_scale``: when head_dim is pruned, the softmax scale stays
    1/sqrt(original head_dim) (``"original"``: the pruned model equals the masked one);
    ``"recompute"`` gives 1/sqrt(kept head_dim) where fxprune sets the scale (SDPA with
    the default or a 1/sqrt(head_dim) scale, ``nn.MultiheadAttention``, Swin window
    attention). A scale the model multiplies in itself (``q * self.scale``) is a literal
    and stays. ``verify`` then checks the slicing on an original-scale copy and this
    model by shapes.
    """
    check_attention_scale(attention_scale)  # a ValueError here, not inside the pipeline
    if output not in ("graph", "module"):
        raise ValueError(f"output must be 'graph' or 'module', got {output!r}")
    if fold_bn and output == "module":
        raise ValueError("fold_bn=True rewrites the graph (BatchNorm folded away): use it "
                         "with output='graph'")
    if memory_format not in (None, *MEMORY_FORMATS):
        raise ValueError(f"memory_format must be None, 'contiguous' or 'channels_last', "
                         f"got {memory_format!r}")
    if not isinstance(plan, Plan):
        raise PlanError(f"compile takes a fxprune.Plan, not {type(plan).__name__}: "
                        "Plan.from_indices(analysis, {group: kept units}) or fxprune.plan(...)")
    if not isinstance(model, (torch.nn.Module, GroupAnalysis)):
        raise PlanError(f"compile takes the model (an nn.Module) or its GroupAnalysis, not "
                        f"{type(model).__name__}")
    analysis = _analysis_for(model, plan, example_inputs)
    kept = plan.kept_labels(analysis)
    points = get_meta(analysis.gm, "specialised")
    if points and output == "graph":
        from fxprune.record import describe
        raise ControlFlowError(
            f"compile: the graph of {type(model).__name__} holds the one path its example "
            f"inputs took ({describe(points)}); as the result it would silently drop the "
            "model's other branches. Remedy: compile(..., output='module') (the model's "
            "own forward keeps its control flow), then fxprune.check_paths(model, small, "
            "plan, [inputs, ...]) on inputs that take the other paths.")

    def checked(pruned: torch.fx.GraphModule) -> torch.fx.GraphModule:
        check_sliced(pruned, analysis, kept, analysis.example_inputs)
        return pruned

    def checked_layout(converted: torch.nn.Module) -> torch.nn.Module:
        from passes.memory_format import check_memory_format
        contiguous = copy.deepcopy(converted)
        for p in (*contiguous.parameters(), *contiguous.buffers()):
            p.data = p.data.contiguous()
        check_memory_format(contiguous, converted, analysis.example_inputs)
        return converted

    def sliced(_: Any) -> torch.fx.GraphModule:
        return slice_weights(analysis, kept, attention_scale=attention_scale)

    steps = [Step("slice_weights", sliced)]
    if check:
        steps.append(Step("check_sliced", checked))
    if fold_bn:
        steps.append(Step("fold_bn", fold_batchnorm))
    if output == "module":
        from fxprune.module_output import module_steps  # API layer, imported when asked
        steps += module_steps(model, analysis, kept, plan, check=check)
    if memory_format == "channels_last":
        steps.append(Step("channels_last", to_channels_last))
        if check:
            steps.append(Step("check_memory_format", checked_layout))
    return _record_state(run_steps("fxprune.compile", steps, None, error_type=RewriteError))


def _record_state(result: torch.nn.Module) -> torch.nn.Module:
    """``result`` with a digest of its tensors as compiled, for ``verify`` to tell a model
    changed after compile (trained, run in train mode) from a wrong slice."""
    digest = state_digest(result)
    if isinstance(result, torch.fx.GraphModule):
        set_meta(result, "state_digest", digest)
    else:
        DIGESTS[result] = digest
    return result


def _analysis_for(model: Any, plan: Plan, example_inputs: Any) -> GroupAnalysis:
    if isinstance(model, GroupAnalysis):
        return model
    cached = plan.analysis
    if cached is not None and example_inputs is None and _same_model(cached.gm, model):
        return cached
    if example_inputs is None:
        if cached is None:
            raise PlanError("this plan carries no analysis (loaded from JSON?): pass "
                            "example_inputs=... so the model can be re-analysed")
        example_inputs = cached.example_inputs
    return analyze(model, example_inputs)


def _same_model(gm: torch.fx.GraphModule, model: torch.nn.Module) -> bool:
    if gm is model:
        return True
    own = {id(p) for p in model.parameters()}
    theirs = {id(p) for p in gm.parameters()}
    if bool(own) and own == theirs or (not own and not theirs):
        return True
    modes = get_meta(gm, "other_modes")
    if modes and theirs and theirs < own:  # the rest: submodules only another mode runs
        only = tuple(f"{p}." for info in modes.values() for p in info["modules"])
        return all(n.startswith(only) for n, p in model.named_parameters() if id(p) not in theirs)
    # a graph that does not read every parameter (a recorded path skips a branch's
    # modules): the same model when each of its tensors is the model's under that name
    named = dict(model.named_parameters())
    return bool(theirs) and get_meta(gm, "frontend") == "record" and \
        all(named.get(n) is p for n, p in gm.named_parameters())


# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupCheck:
    group: str
    removed: int
    size: int
    check: str  # "exact" (slice == mask numerically) | "shape" | "untouched"


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of ``verify``: per-group checks and the numbers behind them."""

    ok: bool
    max_abs_error: float
    tolerance: float
    output_shapes_equal: bool
    params_before: int
    params_after: int
    groups: tuple[GroupCheck, ...] = field(repr=False)
    nodes_checked: int = 0
    max_node_rel_error: float = 0.0
    worst_node: str = ""
    nonfinite: str = ""  # where the masked reference is nan/inf at kept units ("output")
    fold_error: float | None = None  # check_fold's float64 error when BatchNorm was folded
    changed: tuple[str, ...] = ()  # tensors of ``pruned`` changed since compile (on failure)
    failure: str = ""  # why it failed, with the remedy ("" when ok): what verify raises
    # slice == mask at one more sample than the example batch: "ok at batch N", "failed
    # at batch N: ...", "not checked: ..." (a literal right at the example batch only)
    other_batch: str = ""

    def table(self) -> str:
        from tabulate import tabulate

        rows = [(g.group, g.size, g.removed, g.check) for g in self.groups if g.removed]
        head = (f"slice == mask: {'OK' if self.ok else 'FAILED'} (output max |err| "
                f"{self.max_abs_error:.3g}, tol {self.tolerance:.3g}; {self.nodes_checked} "
                f"activations, worst relative err {self.max_node_rel_error:.3g}); params "
                f"{self.params_before:,} -> {self.params_after:,}\n")
        if self.fold_error is not None:
            head += (f"BatchNorm fold (check_fold, float64): max |err| {self.fold_error:.3g}"
                     f"{'' if self.ok or self.fold_error < float('inf') else ' FAILED'}\n")
        if self.failure:
            head += self.failure + "\n"
        return head + tabulate(rows, headers=["group", "size", "removed", "check"])


def verify(model: torch.nn.Module | GroupAnalysis, pruned: torch.nn.Module, plan: Plan,
           inputs: Any, *, rtol: float = 1e-6, raise_on_failure: bool = True,
           other_batch: bool = True) -> VerifyReport:
    """Slice == mask on ``inputs``, in float64: exact groups numerically, others by shape.

    ``other_batch``: the outputs are compared a second time at one more sample than the
    batch of ``inputs`` (their first sample appended along dim 0), so that a size the
    rewrite made right at the example batch only fails here; skipped, and said so in
    ``VerifyReport.other_batch``, where the model itself does not run at that batch or its
    samples are not independent.

    When the plan touches inexact groups (channel mixers), or ``pruned`` was compiled
    with ``attention_scale="recompute"``, the numerical check runs on a second compile
    of the plan restricted to exact groups (original scales); ``pruned`` itself is
    checked for output shapes and runs. A graph compiled with ``fold_bn=True`` (BatchNorm
    folded into its convs) is checked the same way on the unfolded slice, and the fold by
    ``passes.fold_bn.check_fold`` (float64 algebra on ``inputs``; the folded weights are
    the float64 fold of the sliced ones rounded once): ``VerifyReport.fold_error``.

    A failure names what it can tell apart from a slicing bug: nan/inf at kept units of
    the masked reference itself (``nonfinite``: the model computes them on ``inputs``), and
    tensors of ``pruned`` changed since ``compile`` recorded them (``changed``: trained,
    or run in train mode, which updates BatchNorm running statistics).

    Streams: the masked and sliced models run in lockstep, node by node, each activation
    compared as soon as both values exist and freed after its last user; the masked
    model shares the analysed weights (removed slices are zeroed in each op's float64
    copy). Peak memory is the live activations plus one op's float64 weights, not
    float64 copies of the model (LLaMA 1.1B: see docs/latency.md).
    """
    analysis, sliced, exact_kept = _verify_inputs(model, pruned, plan)
    inputs = _as_tuple(inputs)
    fold = _check_folds(analysis, pruned, plan, sliced, inputs)
    masked, zeroed = insert_masks_shared(analysis, exact_kept)
    if isinstance(sliced, torch.fx.GraphModule):
        compare = _StreamCompare(analysis, exact_kept, get_meta(masked, "masked_value", {}))
        want, got = _run_lockstep(masked, zeroed, sliced, inputs, compare)
        node_err, worst, checked = compare.worst, compare.worst_name, compare.checked
        nonfinite = compare.nonfinite
    else:  # compile(output="module"): no graph to walk, outputs only
        want = _run_checked(masked, inputs, "the masked reference model", zeroed=zeroed)
        got = _run_checked(sliced, inputs, "the pruned model")
        node_err, worst, checked, nonfinite = 0.0, "", 0, ""
    batch_note = _check_other_batch(analysis.gm, sliced, inputs, got, rtol) \
        if other_batch else ""
    del masked, zeroed
    pruned_out = (flat_tensors(_run_checked(pruned, inputs, "the pruned model"))
                  if sliced is not pruned else flat_tensors(got))
    del sliced
    report = _verdict(model, analysis, pruned, plan, inputs, flat_tensors(want),
                      flat_tensors(got), pruned_out, (node_err, worst, checked), rtol,
                      raise_on_failure, nonfinite=nonfinite, fold=fold)
    return _with_other_batch(report, batch_note, raise_on_failure)


def _with_other_batch(report: VerifyReport, batch_note: str,
                      raise_on_failure: bool) -> VerifyReport:
    """``report`` with the second-batch check's outcome (a failure fails it)."""
    if not batch_note.startswith("failed"):
        return dataclasses.replace(report, other_batch=batch_note)
    failure = (f"slice != mask {batch_note}, though equal at the example batch: a size in "
               "the pruned graph holds at the example batch only. This is an fxprune bug: "
               "please report it; meanwhile keep those channels (ignore=[...]).")
    if raise_on_failure:
        raise VerificationError(failure)
    return dataclasses.replace(report, ok=False, other_batch=batch_note,
                               failure=report.failure or failure)


def _grown_batch(inputs: tuple) -> tuple | None:
    """``inputs`` with their first sample appended along dim 0, when every tensor input
    has the same dim-0 size (else None: no batch dim to grow)."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    if not tensors or any(t.dim() == 0 or t.shape[0] != tensors[0].shape[0] for t in tensors):
        return None
    return tuple(torch.cat([t, t[:1]]) if isinstance(t, torch.Tensor) else t for t in inputs)


def _check_other_batch(original: torch.fx.GraphModule, sliced: torch.nn.Module,
                       inputs: tuple, got: Any, rtol: float) -> str:
    """At one more sample than the example, each sample's output of the sliced model must
    be what it is at the example batch, where the original model's is (its samples are
    independent: the masked model cannot be the reference, its masks have the example's
    batch where a dim merges batch and channels). Run in the models' own dtype (four
    plain forwards, no float64 copies: the exactness proof is the float64 slice == mask
    above; this one catches a size right at the example batch only, which is off by whole
    samples, or does not run), compared to 1e-4 of each output's largest magnitude."""
    del got, rtol  # float64 at the example batch; this check compares in the own dtype
    grown = _grown_batch(inputs)
    if grown is None:
        return "not checked: the inputs have no common batch dim"
    b = next(t for t in inputs if isinstance(t, torch.Tensor)).shape[0]
    try:
        o1 = flat_tensors(_run_plain(original, inputs, "the model"))
        o2 = flat_tensors(_run_plain(original, grown, "the model"))
    except ShapePropagationError:  # an export specialised to its batch: batch-bound
        return f"not checked: the model does not run at batch {b + 1}"
    if not _same_per_sample(o1, o2, b, _OWN_DTYPE_RTOL):
        return "not checked: the model's samples are not independent"
    s1 = flat_tensors(_run_plain(sliced, inputs, "the pruned model"))
    try:
        s2 = flat_tensors(_run_plain(sliced, grown, "the pruned model"))
    except ShapePropagationError as exc:
        return f"failed at batch {b + 1}: {exc}"
    if not _same_per_sample(s1, s2, b, _OWN_DTYPE_RTOL):
        return f"failed at batch {b + 1}: a sample's output differs from the example batch's"
    return f"ok at batch {b + 1}"


_OWN_DTYPE_RTOL = 1e-4


def _run_plain(gm: torch.nn.Module, inputs: tuple, what: str) -> Any:
    """``gm(*inputs)`` in eval mode (flags restored), no grad, its own dtype; a failure
    raised as a typed error. Buffers are put back as they were afterwards: a torch.export
    graph captured in train mode updates BatchNorm statistics whatever its flags say, and
    the analysed graph shares the user's tensors (which verify must never change)."""
    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        with torch.no_grad(), eval_mode(gm):
            return gm(*inputs)
    except Exception as exc:
        raise _run_error(what, getattr(exc, "fxprune_node", None), inputs, exc) from exc
    finally:
        with torch.no_grad():
            for b, value in saved:
                if not torch.equal(b, value):
                    b.copy_(value)


def _same_per_sample(small: list, grown: list, b: int, rtol: float) -> bool:
    """``grown`` (batch b + 1, the first sample appended) repeats ``small`` (batch b)."""
    if len(small) != len(grown) or any(t.dim() == 0 or t.shape[0] != b for t in small) \
            or any(g.shape != (b + 1,) + t.shape[1:] for t, g in zip(small, grown)):
        return False
    for t, g in zip(small, grown):
        tol = rtol * max(float(t.abs().max()) if t.numel() else 0.0, 1.0)
        if t.numel() and (float((g[:b] - t).abs().max()) > tol
                          or float((g[b:] - t[:1]).abs().max()) > tol):
            return False
    return True


def _verify_inputs(model: torch.nn.Module | GroupAnalysis, pruned: torch.nn.Module,
                   plan: Plan) -> tuple[GroupAnalysis, torch.nn.Module, Any]:
    """The analysis, the model to compare numerically (``pruned``, or a compile of the
    plan's exact groups with original scales) and its kept labels."""
    analysis = model if isinstance(model, GroupAnalysis) else _analysis_for(model, plan, None)
    inexact = {g.name for g in analysis.groups if not g.exact}
    exact_keep = {n: k for n, k in plan.keep.items() if n not in inexact}
    exact_plan = Plan(plan.fingerprint, exact_keep, {n: plan.sizes[n] for n in exact_keep},
                      plan.meta, analysis)
    exact_kept = exact_plan.kept_labels(analysis)
    recomputed = get_meta(pruned, "attention_scale") == "recompute"
    folded = bool(get_meta(pruned, "bn_folds"))  # its convs compute conv + BN: unfolded slice
    sliced = pruned if len(exact_keep) == len(plan.keep) and not recomputed and not folded \
        else slice_weights(analysis, exact_kept)  # original scales: slice == mask holds
    return analysis, sliced, exact_kept


def _check_folds(analysis: GroupAnalysis, pruned: torch.nn.Module, plan: Plan,
                 sliced: torch.nn.Module, inputs: tuple) -> tuple[float, str] | None:
    """For a ``fold_bn`` result: ``check_fold`` of the unfolded slice that ``compile`` folded
    (``sliced`` when it is that slice) against ``pruned``, as (float64 error, failure);
    None when nothing was folded."""
    if not get_meta(pruned, "bn_folds"):
        return None
    scale = get_meta(pruned, "attention_scale") or "original"
    full = sliced if scale == "original" and set(plan.keep) <= {
        g.name for g in analysis.groups if g.exact} else \
        slice_weights(analysis, plan.kept_labels(analysis), attention_scale=scale)
    try:
        return check_fold(full, pruned, inputs), ""
    except VerificationError as exc:
        return float("inf"), str(exc)


def _verify_recorded(model: torch.nn.Module | GroupAnalysis, pruned: torch.nn.Module,
                     plan: Plan, inputs: Any, *, rtol: float = 1e-6,
                     raise_on_failure: bool = True, other_batch: bool = True) -> VerifyReport:
    """The pre-streaming ``verify``, kept as a reference for tests and benchmarks: a
    masked copy of the weights, every activation of both runs recorded, then compared."""
    analysis, sliced, exact_kept = _verify_inputs(model, pruned, plan)
    inputs = _as_tuple(inputs)
    masked = insert_masks(analysis, exact_kept)
    want, masked_acts = _run_checked_recording(masked, inputs, "the masked reference model")
    got, sliced_acts = _run_checked_recording(sliced, inputs, "the pruned model")
    batch_note = _check_other_batch(analysis.gm, sliced, inputs, got, rtol) \
        if other_batch else ""
    pruned_out = (flat_tensors(_run_checked(pruned, inputs, "the pruned model"))
                  if sliced is not pruned else flat_tensors(got))
    nodes = _compare_activations(analysis, exact_kept, masked, masked_acts, sliced_acts)
    report = _verdict(model, analysis, pruned, plan, inputs, flat_tensors(want),
                      flat_tensors(got), pruned_out, nodes[:3], rtol, raise_on_failure,
                      nonfinite=nodes[3], fold=_check_folds(analysis, pruned, plan, sliced, inputs))
    return _with_other_batch(report, batch_note, raise_on_failure)


def _verdict(model: Any, analysis: GroupAnalysis, pruned: torch.nn.Module, plan: Plan,
             inputs: tuple, want: list, got: list, pruned_out: list, nodes: tuple[float, str, int],
             rtol: float, raise_on_failure: bool, *, nonfinite: str = "",
             fold: tuple[float, str] | None = None) -> VerifyReport:
    node_err, worst, checked = nodes
    shapes_equal = [tuple(t.shape) for t in pruned_out] == _reference_shapes(analysis, inputs)
    err = max((float((a - b).abs().max()) for a, b in zip(got, want) if a.numel()), default=0.0)
    scale = max((float(b.abs().max()) for b in want if b.numel()), default=1.0)
    if not nonfinite and not all(bool(torch.isfinite(b).all()) for b in want):
        nonfinite = "output"
    tol = rtol * scale
    fold_err, fold_failure = fold if fold is not None else (None, "")
    ok = shapes_equal and len(got) == len(want) and err <= tol and node_err <= rtol \
        and not nonfinite and not fold_failure
    checks = tuple(GroupCheck(g.name, g.size - len(plan.keep.get(g.name, range(g.size))),
                              g.size, ("exact" if g.exact else "shape")
                              if g.name in plan.keep else "untouched")
                   for g in analysis.groups)
    # a module output keeps every submodule of the user's model (a recorded path's graph
    # lacks the other branches'): count it against the model; a graph against the graph
    before = _count(model if isinstance(model, torch.nn.Module) and
                    not isinstance(pruned, torch.fx.GraphModule) else analysis.gm)
    changed = () if ok else tuple(changed_tensors(pruned, _recorded_state(pruned)))
    report = VerifyReport(ok, err, tol, shapes_equal, before, _count(pruned),
                          checks, checked, node_err, worst, nonfinite, fold_err, changed)
    if not ok:
        report = dataclasses.replace(report, failure=_failure_message(report, rtol, fold_failure))
        if raise_on_failure:
            raise VerificationError(report.failure)
    return report


def _recorded_state(pruned: torch.nn.Module) -> dict | None:
    return get_meta(pruned, "state_digest") or DIGESTS.get(pruned)


def _failure_message(r: VerifyReport, rtol: float, fold_failure: str) -> str:
    """Why verify failed, most specific cause first; "an fxprune bug" only when nothing
    the user did explains it."""
    figures = (f"slice != mask: output max |err| {r.max_abs_error:.3g} (tol {r.tolerance:.3g}); "
               f"worst activation {r.worst_node!r} relative err {r.max_node_rel_error:.3g} "
               f"(tol {rtol:.3g}) over {r.nodes_checked} nodes; output shapes equal: "
               f"{r.output_shapes_equal}.")
    if r.changed:
        return (f"{figures} The pruned model changed after fxprune.compile: {len(r.changed)} "
                f"tensor(s) differ from what compile produced ({', '.join(r.changed[:4])}"
                f"{', ...' if len(r.changed) > 4 else ''}): training, an optimizer step or a "
                "forward in train mode (BatchNorm running statistics) changes them, and slice "
                "== mask holds for the compiled state only. Remedy: verify right after compile, "
                "or compile the plan again and verify that.")
    if r.nonfinite:
        return (f"{figures} The masked reference (the model with the removed units "
                f"contributing nothing) computes nan/inf at kept units of {r.nonfinite!r} on "
                "these inputs, so slice == mask cannot be checked there. Remedy: check the "
                "inputs and the unpruned model's output for nan/inf (a division or log "
                "without an epsilon), then verify on finite inputs.")
    if fold_failure:
        return (f"{figures} The BatchNorm fold (compile(..., fold_bn=True)) is not proven: "
                f"{fold_failure}. Remedy: compile without fold_bn and verify that, then fold "
                "with passes.fold_bn.fold_bn and check it with passes.fold_bn.check_fold.")
    return f"{figures} This is an fxprune bug: please report it."


class _Float64(torch.fx.Interpreter):
    """Runs a GraphModule in float64 with its weights converted at the op that reads them
    and dropped after it: one op's float64 weights live at a time, never a float64 copy
    of the model (ViT-L/16: 2.3 GB of them per run before). Same values as
    ``_double_copy(gm)``: ``.double()`` converts exactly the floating parameters and
    buffers, which is what ``call_module`` and the function/method arguments swap here.
    ``get_attr`` hands out the stored tensor: export hoists every weight's ``get_attr``
    to the top of the graph, so converting there held all of them at once (LLaMA 1.1B:
    verify was OOM-killed at 23 GB RSS). ``zeroed`` ({fqn: slices}, from ``insert_masks_shared``): removed slices
    zeroed in each copy of those tensors (copied even when already float64)."""

    def __init__(self, gm: torch.fx.GraphModule, zeroed: dict | None = None) -> None:
        super().__init__(gm)
        self.zeroed = {id(_fetch(gm, fqn)): s for fqn, s in (zeroed or {}).items()}

    def _to64(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        slices = self.zeroed.get(id(t))
        if slices:
            d = _as_float64(t)
            zero_slices(d.data, slices)
            return d
        return t if t.dtype == torch.float64 else _as_float64(t)

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        swapped = []
        for module in self.fetch_attr(target).modules():
            for table in (module._parameters, module._buffers):
                for name, t in list(table.items()):
                    d = self._to64(t)
                    if d is not t:
                        swapped.append((table, name, t))
                        table[name] = d
        try:
            return super().call_module(target, self._args64(args), self._args64(kwargs))
        finally:
            for table, name, t in reversed(swapped):
                table[name] = t

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return super().call_function(target, self._args64(args), self._args64(kwargs))

    def call_method(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return super().call_method(target, self._args64(args), self._args64(kwargs))

    def _args64(self, args: Any) -> Any:
        return torch.fx.node.map_aggregate(args, self._to64)

    def steps(self, *args: Any, what: str) -> Any:
        """``run(*args)`` one node at a time: yields ``(node, value)`` after each node, then
        frees the values whose last user it was; a failure is a ShapePropagationError."""
        self.env = {}
        self.args_iter = iter(self.graph.process_inputs(*args))
        for node in self.graph.nodes:
            try:
                value = self.run_node(node)
            except Exception as exc:  # the inputs do not fit: say so, with the node
                raise _run_error(what, node.name, args, exc) from exc
            self.env[node] = value
            for dead in self.user_to_last_uses.get(node, []):
                del self.env[dead]
            if node.op == "output":
                value = self.graph.process_outputs(value)
            yield node, value
        self.env = {}


def _fetch(gm: torch.nn.Module, fqn: str) -> Any:
    owner, _, name = fqn.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _as_float64(t: torch.Tensor) -> torch.Tensor:
    d = t.detach().to(torch.float64, copy=True)
    return torch.nn.Parameter(d, t.requires_grad) if isinstance(t, torch.nn.Parameter) else d


def _graph_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm``'s modules and graph that shares every floating parameter and
    buffer: ``_Float64`` reads them only through float64 copies, so an in-place op baked
    into the graph (running stats) writes a copy. Integer buffers (an exported BN's
    ``num_batches_tracked += 1``) are copied."""
    memo = {id(t): t for t in [*gm.parameters(), *gm.buffers()] if t.is_floating_point()}
    return copy.deepcopy(gm, memo)


def _float64_args(inputs: tuple) -> list:
    return [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in inputs]  # non-tensor inputs (concrete_args flags) pass through


class _StreamCompare:
    """``_compare_activations`` one node at a time, in the sliced graph's order: the
    masked value of each tracked node at its kept indices == the sliced value (relative).
    The first shape mismatch ends the comparison (infinite error), as it did there."""

    def __init__(self, analysis: GroupAnalysis, kept: Any, alias: dict[str, str]) -> None:
        self.analysis, self.kept, self.alias = analysis, kept, alias
        self.worst, self.worst_name, self.checked, self.done = 0.0, "", 0, False
        self.nonfinite = ""  # the first node whose reference is nan/inf at kept units
        self.wanted = {alias.get(n, n): n for n, lab in analysis.node_labels.items()
                       if isinstance(lab, dict)}

    def ref_name(self, name: str) -> str | None:
        """The masked node whose value ``name`` is compared with, if it is tracked."""
        if self.done or not isinstance(self.analysis.node_labels.get(name), dict):
            return None
        return self.alias.get(name, name)

    def lost(self, name: str, ref: str) -> None:
        """The masked run ended before ``ref`` (compared with sliced ``name``) was seen:
        the lockstep order is broken, so no comparison after it can be trusted."""
        self.worst, self.worst_name, self.done = float("inf"), f"{name} (lockstep lost {ref})", True

    def add(self, name: str, ref: Any, got: Any, to64: Any = None) -> None:
        """``to64``: how the reference's op would read ``ref`` (a weight: its float64
        copy, made here so that the full copy is dropped once its kept part is taken)."""
        if not isinstance(ref, torch.Tensor) or not isinstance(got, torch.Tensor):
            return
        box = [ref] if to64 is None else [to64(ref)]
        del ref
        rel = _node_error(self.analysis.node_labels[name], self.kept, box, got)
        if rel is None:
            return
        if rel != rel:  # nan: the reference itself; everything after it reads it
            self.nonfinite, self.worst_name, self.done = name, name, True
            return
        if rel == float("inf"):
            self.worst, self.worst_name, self.done = rel, name, True
            return
        self.checked += 1
        if rel > self.worst:
            self.worst, self.worst_name = rel, name


def _run_lockstep(masked: torch.fx.GraphModule, zeroed: dict, sliced: torch.fx.GraphModule,
                  inputs: tuple, compare: _StreamCompare) -> tuple[Any, Any]:
    """Masked and sliced float64 runs side by side; returns their outputs. The masked run
    is advanced only to the node the current sliced node is compared with, so each
    interpreter holds only its live values (plus the rare value reached early)."""
    masked, sliced = _graph_copy(masked), _graph_copy(sliced)
    _sink_weight_nodes(masked)
    _sink_weight_nodes(sliced)
    args = _float64_args(inputs)
    names = {n.name for n in masked.graph.nodes}
    # how many sliced nodes compare with each masked node (aliases share one): a value
    # reached early is kept until its last comparison
    need = Counter(compare.alias.get(n.name, n.name) for n in sliced.graph.nodes
                   if isinstance(compare.analysis.node_labels.get(n.name), dict))
    early: dict[str, torch.Tensor] = {}
    passed: set[str] = set()  # tracked masked nodes whose value is no tensor (None)
    want = got = None
    with torch.no_grad(), eval_mode(masked), eval_mode(sliced):
        _promote_float_literals(masked)
        _promote_float_literals(sliced)
        reference = _Float64(masked, zeroed)
        ref_steps = reference.steps(*args, what="the masked reference model")
        for node, value in _Float64(sliced).steps(*args, what="the pruned model"):
            if node.op == "output":
                got = value
                continue
            ref = compare.ref_name(node.name)
            if ref is None or ref not in names:
                continue
            while ref not in early and ref not in passed:
                step = next(ref_steps, None)
                if step is None:  # the reference ended without it: fail closed
                    compare.lost(node.name, ref)
                    break
                m_node, m_value = step
                if m_node.op == "output":
                    want = m_value
                    continue  # the generator ends next: a missing ref is lost
                if m_node.name in compare.wanted:
                    if not isinstance(m_value, torch.Tensor):
                        passed.add(m_node.name)
                    else:  # cloned: a later in-place op must not change what is compared
                        early[m_node.name] = m_value if m_node.name == ref \
                            else m_value.detach().clone()
            need[ref] -= 1
            ref_value = early.pop(ref, None) if need[ref] <= 0 else early.get(ref)
            # a weight (get_attr) is compared as the float64 copy its op would read
            compare.add(node.name, ref_value, value, reference._to64)
        if want is None:
            for m_node, m_value in ref_steps:
                if m_node.op == "output":
                    want = m_value
    del masked, sliced, early
    gc.collect()  # GraphModules are reference cycles (see run_recording)
    return want, got


def _sink_weight_nodes(gm: torch.fx.GraphModule) -> None:
    """Move every node computed from weights alone (``get_attr`` and what only they feed:
    the masked model's ``mul(weight, mask)``) to just before its first user. Export
    hoists weights to the top of the graph; their float64 masked copies then lived from
    the start to their use, a float64 model (LLaMA 1.1B: 12.7 GB above the model). Not
    done when the graph mutates anything in place (a moved read could follow a write)."""
    nodes = list(gm.graph.nodes)
    if any(_mutates(n) for n in nodes):
        return
    weight_only: set[torch.fx.Node] = set()
    for n in nodes:
        if n.op == "get_attr" or (n.op in ("call_function", "call_method") and n.all_input_nodes
                                  and all(a in weight_only for a in n.all_input_nodes)):
            weight_only.add(n)
    for n in reversed(nodes):
        if n in weight_only and n.users:
            order = {m: i for i, m in enumerate(gm.graph.nodes)}
            min(n.users, key=order.__getitem__).prepend(n)
    gm.graph.lint()
    gm.recompile()


def _mutates(n: torch.fx.Node) -> bool:
    if n.op not in ("call_function", "call_method", "call_module"):
        return False
    schema = getattr(n.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return n.kwargs.get("inplace") is True or (name.endswith("_") and not name.endswith("__"))


def _node_error(labels: dict, kept: Any, box: list, got: torch.Tensor) -> float | None:
    """Relative max error of ``got`` against the reference (``box``'s only tensor, taken
    from it so that each selection frees the last) at its kept indices; inf when the
    shapes differ or ``got`` alone is not finite there, nan when the reference is not
    finite where ``got`` differs (nan/inf at the same places with the same values are the
    model's own and agree), None when not compared (not floating). No full-size temporaries
    beyond one difference (an embedding's float64 copy is 250 MB at LLaMA 1B)."""
    from passes.slice_weights import keep_mask

    ref = box.pop()
    for axis, lab in labels.items():
        if axis < ref.dim() and ref.shape[axis] == len(lab):
            idx = torch.as_tensor(keep_mask(lab, kept).nonzero()[0], device=ref.device)
            ref = ref.index_select(axis, idx)
    if ref.shape != got.shape:
        return float("inf")
    if not ref.is_floating_point() or not ref.numel():
        return None if not ref.is_floating_point() else 0.0
    bad = ~torch.isfinite(ref)
    if bool(bad.any()):  # the model's own nan/inf (T5's log of relative position 0, which
        # a torch.where then discards) agree when the pruned value is the same there
        same = (ref == got) | (torch.isnan(ref) & torch.isnan(got))
        if not bool((same | ~bad).all()):
            return float("nan")  # the reference is not finite where the pruned differs
        ref, got = ref.masked_fill(bad, 0.0), got.masked_fill(bad, 0.0)
    del bad
    scale = float(max(abs(float(v)) for v in ref.aminmax()))
    diff = torch.sub(ref, got)
    del ref
    low, high = (float(v) for v in diff.aminmax())
    if not math.isfinite(scale):  # aminmax is nan when any value is: kept units not finite
        return float("nan")
    if not (math.isfinite(low) and math.isfinite(high)):
        return float("inf")  # the reference is finite there and the pruned value is not
    diff = max(abs(low), abs(high))
    return diff / scale if scale > 0 else diff


class _Recorder(_Float64):
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as exc:
            exc.fxprune_node = n.name  # for _run_checked's message
            raise
        if isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach().clone()
        return out


def _run_error(what: str, node: str | None, inputs: tuple,
               exc: Exception) -> ShapePropagationError:
    where = f" at node {node!r}" if node else ""
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
              for x in inputs]
    return ShapePropagationError(
        f"verify could not run {what}{where} on inputs {shapes}: "
        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
        "Pass inputs shaped like the example inputs the plan's analysis was made with.")


def _run_checked(gm: torch.nn.Module, inputs: tuple, what: str, *,
                 zeroed: dict | None = None) -> Any:
    """The float64 output of ``gm`` on ``inputs``, a failure raised as a typed error."""
    try:
        return run_recording(gm, inputs, record=False, zeroed=zeroed)[0]
    except Exception as exc:
        raise _run_error(what, getattr(exc, "fxprune_node", None), inputs, exc) from exc


def _run_checked_recording(gm: torch.nn.Module, inputs: tuple,
                           what: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """``run_recording``, with a failure to run on ``inputs`` raised as a typed error."""
    try:
        return run_recording(gm, inputs)
    except Exception as exc:
        raise _run_error(what, getattr(exc, "fxprune_node", None), inputs, exc) from exc


def run_recording(gm: torch.nn.Module, inputs: tuple, *, record: bool = True,
                  zeroed: dict | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run a float64 copy of ``gm`` in eval mode, recording every tensor activation
    (``record=False``: only the output)."""
    streamed = isinstance(gm, torch.fx.GraphModule)
    if zeroed and not streamed:
        raise TypeError("zeroed slices need a GraphModule")
    gm = _graph_copy(gm) if streamed else _double_copy(gm)
    args = _float64_args(inputs)
    with torch.no_grad(), eval_mode(gm):
        if streamed:
            _promote_float_literals(gm)
            rec = _Recorder(gm) if record else _Float64(gm, zeroed)
            result = rec.run(*args), getattr(rec, "values", {})
            del rec
        else:
            result = gm(*args), {}
    # A GraphModule is a reference cycle (graph <-> owning module): without a collection
    # every float64 copy verify makes stays alive until the cyclic collector happens to
    # run (ViT-L/32: peak RSS 11.8 GB instead of 7.4 GB; ViT-H/14 was OOM-killed).
    del gm
    gc.collect()
    return result


def _double_copy(gm: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy(gm).double().eval()`` without materialising a float32 copy first."""
    memo: dict[int, Any] = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) in memo or not t.is_floating_point():
            continue
        d = t.detach().to(torch.float64, copy=True)
        memo[id(t)] = torch.nn.Parameter(d, t.requires_grad) \
            if isinstance(t, torch.nn.Parameter) else d
    return copy.deepcopy(gm, memo).double().eval()


def _reference_shapes(analysis: GroupAnalysis, inputs: tuple) -> list[tuple[int, ...]]:
    """Output shapes of the unpruned model: recorded by the analysis when ``inputs`` have
    its example inputs' shapes, else from a fake-tensor run (no compute, no copy)."""
    def spec(xs: Sequence) -> list:
        return [(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x for x in xs]

    if len(inputs) == len(analysis.example_inputs) and \
            spec(inputs) == spec(analysis.example_inputs):
        recorded = _flat_shapes(output_shape(analysis.gm))
        if recorded is not None:
            return recorded
    return [tuple(t.shape) for t in flat_tensors(_fake_run(analysis.gm, inputs))]


def _flat_shapes(shapes: Any) -> list[tuple[int, ...]] | None:
    """Tensor shapes of a nested output, in ``flat_tensors`` order; None when not all recorded."""
    if isinstance(shapes, tuple) and shapes and all(isinstance(s, int) for s in shapes):
        return [shapes]
    items = shapes.values() if isinstance(shapes, dict) else shapes
    if not isinstance(items, (tuple, list, type({}.values()))) or not items:
        return None
    out: list[tuple[int, ...]] = []
    for item in items:
        sub = _flat_shapes(item)
        if sub is None:
            return None
        out.extend(sub)
    return out


def _fake_run(gm: torch.nn.Module, inputs: tuple) -> Any:
    """Outputs of ``gm`` on fake tensors: the unpruned output shapes without computing
    (or copying) the model."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from passes.shape_prop import eval_mode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    args = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    with eval_mode(gm), torch.no_grad(), mode:
        return gm(*args)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _promote_float_literals(gm: torch.fx.GraphModule) -> None:
    """Float64 everywhere: dtype literals in the graph (export's casts and dtype asserts,
    ``x.to(torch.float32)`` in RMSNorms) would otherwise round the float64 run."""
    def promote(a: Any) -> Any:
        return torch.float64 if isinstance(a, torch.dtype) and a in _FLOATS else a

    for node in gm.graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, promote)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, promote)
    gm.recompile()


def _compare_activations(analysis: GroupAnalysis, kept: Any, masked: torch.fx.GraphModule,
                         masked_acts: dict, sliced_acts: dict) -> tuple[float, str, int, str]:
    """Every tracked activation: masked value at kept indices == sliced value (relative);
    the last item names the first node whose reference is nan/inf at kept units."""
    alias = get_meta(masked, "masked_value", {})
    worst, worst_name, checked = 0.0, "", 0
    for name, labels in analysis.node_labels.items():
        ref, got = masked_acts.get(alias.get(name, name)), sliced_acts.get(name)
        if not isinstance(labels, dict) or ref is None or got is None:
            continue
        rel = _node_error(labels, kept, [ref], got)
        if rel is None:
            continue
        if rel != rel:  # the reference is nan/inf at kept units
            return worst, name, checked, name
        if rel == float("inf"):
            return rel, name, checked, ""
        checked += 1
        if rel > worst:
            worst, worst_name = rel, name
    return worst, worst_name, checked, ""


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a nested output (tensors, tuples, lists, dicts), depth first."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_tensors(v)]
    return []


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())



