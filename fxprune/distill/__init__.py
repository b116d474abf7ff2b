"""Prune while training with knowledge distillation (CPD's *Distill* step).

``Pruner`` (hook for your own loop), ``fit`` (a small loop), the losses ``kd_loss``,
``mixed_kd_loss``, ``cwd_loss``, ``feature_loss``, and atomic ``save_checkpoint``.
See docs/distill.md.
"""
from fxprune.distill.fit import fit
from fxprune.distill.losses import cwd_loss, feature_loss, kd_loss, mixed_kd_loss
from fxprune.distill.pruner import (SCHEDULES, DistillResult, Pruner, cubic_schedule,
                                    linear_schedule, load_checkpoint, save_checkpoint)
from fxprune.distill.student import GatedStudent, set_graph_training

__all__ = ["Pruner", "DistillResult", "fit", "kd_loss", "mixed_kd_loss", "cwd_loss",
           "feature_loss", "save_checkpoint", "load_checkpoint", "SCHEDULES", "cubic_schedule",
           "linear_schedule", "GatedStudent", "set_graph_training"]
