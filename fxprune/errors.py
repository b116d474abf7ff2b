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


def describe_node(node) -> str:
    """One line naming a node, its FX form and, when recorded, its source line."""
    text = f"node '{node.name}' ({node.format_node()})"
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines()
                 if ln.strip().startswith("File") and "/torch/" not in ln]
        if lines:
            text += f" at {lines[-1]}"
    module = node.meta.get("nn_module_stack")
    if module:
        path, cls = list(module.values())[-1]
        text += f" in module '{path}' ({getattr(cls, '__name__', cls)})"
    return text


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
