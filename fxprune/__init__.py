"""fxprune: structured pruning of PyTorch models as torch.fx graph passes.

    analysis = fxprune.analyze(model, example_inputs)     # coupled groups
    plan = fxprune.Plan.from_ratio(analysis, 0.5)         # what to keep
    small = fxprune.compile(model, plan)                  # new, smaller GraphModule
    fxprune.verify(model, small, plan, example_inputs)    # slice == mask
"""
from fxprune.api import GroupCheck, VerifyReport, analyze, compile, verify
from fxprune.capture import FxpruneTracer, trace
from fxprune.errors import (FxpruneError, PlanError, RewriteError, ShapePropagationError,
                            TraceError, UnsupportedOpError, VerificationError)
from fxprune.groups import ChannelGroup, GroupAnalysis, Member
from fxprune.plan import Plan, magnitude_scores
from fxprune.errors import BudgetError, ImportanceError, NonFiniteScoreError
from fxprune.importance import CRITERIA, Importance, importance_scores
from fxprune.planner import plan
from fxprune.blocks import Block, block_similarity, find_blocks, remove_blocks, verify_blocks

__version__ = "0.1.0"
__all__ = [
    "analyze", "compile", "verify", "trace", "Plan", "magnitude_scores", "GroupAnalysis",
    "ChannelGroup", "Member", "VerifyReport", "GroupCheck", "FxpruneTracer", "FxpruneError",
    "TraceError", "UnsupportedOpError", "ShapePropagationError", "PlanError", "RewriteError",
    "VerificationError",
]
__all__ += ["plan", "Importance", "importance_scores", "CRITERIA", "BudgetError",
            "ImportanceError", "NonFiniteScoreError"]
__all__ += ["Block", "find_blocks", "block_similarity", "remove_blocks", "verify_blocks"]
from fxprune.tokens import TokenCost, linear_schedule, merge_tokens, prune_tokens, token_macs
from fxprune.errors import (AttentionNotFoundError, StaticShapeError, TokenReductionError,
                            TokenScheduleError)

__all__ += ["merge_tokens", "prune_tokens", "token_macs", "TokenCost", "linear_schedule",
            "TokenReductionError", "TokenScheduleError", "AttentionNotFoundError",
            "StaticShapeError"]
