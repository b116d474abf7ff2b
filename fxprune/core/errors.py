"""Typed errors. Every error names what failed and says what to do about it."""
from __future__ import annotations


class FxpruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class TraceError(FxpruneError):
    """The model could not be captured as an FX graph."""


class UnsupportedOpError(FxpruneError):
    """A node carries prunable channels into an op without a rule (``strict=True``)."""


class ShapePropagationError(FxpruneError):
    """Shape propagation failed: the example inputs do not fit the model."""


class PlanError(FxpruneError):
    """A plan is invalid for this graph (wrong fingerprint, empty group, bad ratio...)."""


class RewriteError(FxpruneError):
    """A rewrite produced, or would produce, an inconsistent graph."""


class VerificationError(FxpruneError):
    """The pruned model does not compute what the masked model computes."""


class BudgetError(PlanError):
    """A cost target cannot be met (below what the unprunable part of the model costs)."""


class ImportanceError(FxpruneError):
    """An importance criterion cannot score the groups (no data for a data-driven one...)."""


class NonFiniteScoreError(ImportanceError):
    """A criterion produced NaN or infinite gradients or scores; names the groups hit."""


def _own_dirs() -> tuple[str, ...]:
    """fxprune's and passes' folders: frames there are the tracer's, not the user's."""
    import os

    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fxprune/
    return (pkg + os.sep, os.path.join(os.path.dirname(pkg), "passes") + os.sep)


def _user_frame(line: str) -> bool:
    return "/torch/" not in line and not any(d in line for d in _own_dirs())


def source_line(node) -> str:
    """``file:line`` (and the code) of the user's line that made ``node``, or ""."""
    trace = node.meta.get("stack_trace") if node is not None else None
    if not trace:
        return ""
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File") and _user_frame(lines[i]):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File") \
                else ""
            where = lines[i].replace("File ", "", 1).replace('"', "")
            return f"{where}: {code}" if code else where
    return ""


def exception_line(exc: BaseException) -> str:
    """``file, line N: code`` of the innermost user frame ``exc`` passed through (the
    line of the user's forward that raised), or ""."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if _user_frame(f'File "{f.filename}"')]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}, line {f.lineno}" + (f": {f.line.strip()}" if f.line else "")


def describe_node(node) -> str:
    """One line naming a node, its FX form and, when recorded, its source line."""
    text = f"node '{node.name}' ({node.format_node()})"
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines()
                 if ln.strip().startswith("File") and _user_frame(ln)]
        if lines:
            text += f" at {lines[-1]}"
    module = node.meta.get("nn_module_stack")
    if module:
        path, cls = list(module.values())[-1]
        text += f" in module '{path}' ({getattr(cls, '__name__', cls)})"
    return text


class DistillError(FxpruneError):
    """Prune-while-training / distillation was misconfigured or its state was disturbed."""


class DistillLossError(DistillError):
    """A distillation loss got bad arguments (temperature, alpha, mismatched outputs)."""


class GateTamperError(DistillError):
    """A gate of the student was changed outside the pruner (masks would be inconsistent)."""


class SoftMaskFoldError(DistillError):
    """A learnable soft mask (selection="soft") gates an edge where it cannot be folded
    into weights exactly (a nonlinearity between its producer and the gate)."""


class CheckpointMismatchError(DistillError):
    """A pruner checkpoint belongs to another model or plan and cannot be resumed here."""


class SparsityError(FxpruneError):
    """A sparsity request cannot be met (bad fraction, pattern, weight or plan)."""


class PatternError(SparsityError):
    """An N:M pattern is invalid (N >= M) or does not fit a layer's reduction dim."""


class SharedWeightError(SparsityError):
    """A weight to sparsify is shared under several names, which one mask cannot follow."""


class TokenReductionError(RewriteError):
    """Token merging or pruning cannot be applied as asked (names the layer and the remedy)."""


class TokenScheduleError(TokenReductionError, ValueError):
    """A token schedule is invalid: ``r`` above the tokens a layer has, ``keep_rate``
    outside (0, 1], a schedule whose length is not the number of layers."""


class AttentionNotFoundError(TokenReductionError):
    """No attention (SDPA, ``nn.MultiheadAttention`` or a softmax over keys) was found in
    a residual block, so there is no layer to reduce tokens in."""


class StaticShapeError(TokenReductionError):
    """The token count is dynamic where the pass needs it static, or a literal size in the
    graph pins it (a reshape that cannot be rewritten, token-mixing weights)."""


class ModuleOutputError(VerificationError):
    """The pruned copy of the user's own module (``compile(..., output="module")``) does
    not compute what the pruned GraphModule computes; names the first differing output
    and, when known, the source line of a literal size its forward keeps."""


class LiteralSizeError(ModuleOutputError):
    """The user's forward holds a literal size (``x.view(b, 64, -1)``) that pruning changes
    and that no module attribute controls, so the rewritten module cannot follow the plan;
    names the source line and suggests ``output="graph"``."""


class NonUniformPlanError(PlanError):
    """A plan keeps different head counts, head_dims or MLP widths in different layers, so
    a Hugging Face config (one number per model) cannot describe it for
    ``save_pretrained``; says how to make the plan uniform. Also raised where pruned
    heads keep the original softmax scale (``attention_scale="original"``), which a config
    cannot express: a reloaded model would recompute it from the new head_dim."""


class ControlFlowError(VerificationError):
    """A model captured by recording one path of its data-dependent control flow
    (``frontend="record"``) cannot be proven on another path: a check input takes a branch
    whose pruned module differs from that path's own pruned graph, or uses pruned channels
    in a way the recorded path did not show; or a one-path graph was asked for as the
    result (``output="graph"``). Names the source lines of the branches."""


class SaveError(FxpruneError):
    """A model could not be saved so that it loads with torch alone (nothing was written)."""


class OnnxExportError(FxpruneError):
    """``torch.onnx.export`` failed on a pruned module; the message names the node."""


class BackendUnavailableError(FxpruneError):
    """A latency backend cannot run here (its package or a C compiler is missing); the
    message names the extra to install."""


class LatencyTargetError(BudgetError):
    """A latency target is below what the floor model (every group at its minimum)
    measures; the message gives both figures in milliseconds."""


class UnprovenBranchWarning(UserWarning):
    """``compile(output="module")`` of a graph recorded on one path (``frontend="record"``)
    left modules on another branch unsliced whose input width the plan changes: that
    branch may crash. ``fxprune.check_paths`` proves it or names the remedy."""


class OtherModeWarning(UserWarning):
    """The captured graph left submodules with parameters unrun (auxiliary heads that run
    only in training): fxprune captured the other mode too and merged its couplings into
    the analysis, or says why it could not; or a check of that mode's path was weaker
    than numerical."""
