"""Unstructured and N:M sparsity on fxprune's analysis, importance registry and proof.

    sparse, plan = fxprune.sparsify(model, x, 0.5, criterion="magnitude")
    fxprune.verify_sparsity(model, sparse, plan, x).table()
"""
from fxprune.sparsity import criteria as _criteria  # noqa: F401  (registers weight rules)
from fxprune.sparsity.api import (DEFAULT_KINDS, LayerCheck, Sparsified, SparsityReport,
                                  apply_sparsity, plan_sparsity, select_weights, sparsify,
                                  sparsity_table, verify_sparsity)
from fxprune.sparsity.criteria import weight_criteria
from fxprune.sparsity.export import semi_structured_support, storage_bytes, to_semi_structured
from fxprune.sparsity.plan import PackedMask, SparsityPlan
from fxprune.sparsity.training import (GradualPruner, WeightMask, attach_masks, cubic_sparsity,
                                       current_plan, finalize, update_masks)

__all__ = ["sparsify", "plan_sparsity", "apply_sparsity", "verify_sparsity", "sparsity_table",
           "select_weights", "Sparsified", "SparsityReport", "LayerCheck", "DEFAULT_KINDS",
           "SparsityPlan", "PackedMask", "weight_criteria", "attach_masks", "update_masks",
           "current_plan", "finalize", "cubic_sparsity", "GradualPruner", "WeightMask",
           "to_semi_structured", "semi_structured_support", "storage_bytes"]
