"""Distillation losses: vanilla KD, channel-wise distillation (CWD), output features.

Every loss takes ``(student, teacher)`` tensors of the same shape and returns a scalar.
Bad arguments raise :class:`~fxprune.errors.DistillLossError` naming the fix.

* ``kd_loss`` (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
  Network"): ``T^2 * KL(softmax(t / T) || softmax(s / T))`` over the class dim, mean over
  the other dims (``batchmean`` for ``[N, K]`` logits).
* ``mixed_kd_loss``: ``(1 - alpha) * task + alpha * kd_loss``.
* ``cwd_loss`` (Shu et al. 2021, "Channel-wise Knowledge Distillation for Dense
  Prediction"): per channel a softmax over the ``H*W`` spatial positions at temperature
  ``T``; ``T^2 * sum_c KL(p_t^c || p_s^c) / (N * C)`` for ``[N, C, H, W]`` maps.
* ``feature_loss``: ``"mse"`` (mean squared error) or ``"cosine"`` (mean of
  ``1 - cos(s, t)`` over the last dim) for embeddings.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxprune.core.errors import DistillLossError

__all__ = ["kd_loss", "mixed_kd_loss", "cwd_loss", "feature_loss", "check_pair"]


def check_pair(student: torch.Tensor, teacher: torch.Tensor, what: str, *,
               min_dim: int = 1) -> None:
    """Raise ``DistillLossError`` unless both are tensors of one shape with >= ``min_dim`` dims."""
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, torch.Tensor):
            raise DistillLossError(f"{what}: the {name} output is a {type(t).__name__}, not a "
                                   "tensor; pass output_of=<fn(output) -> tensor> to pick the "
                                   "logits / embedding from a structured output")
    if student.shape != teacher.shape:
        raise DistillLossError(f"{what}: student output {tuple(student.shape)} and teacher output "
                               f"{tuple(teacher.shape)} differ; use a teacher with the same "
                               "output (classes, channels, embedding width) or project one side")
    if student.dim() < min_dim:
        raise DistillLossError(f"{what}: outputs need at least {min_dim} dims, got "
                               f"{tuple(student.shape)}")


def _check_temperature(temperature: float, what: str) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise DistillLossError(f"{what}: temperature must be a finite number > 0, got "
                               f"{temperature!r} (Hinton et al. use 1-20; 4 is common)")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise DistillLossError(f"alpha must lie in [0, 1] (weight of the KD term), got {alpha!r}")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 4.0,
            dim: int = -1) -> torch.Tensor:
    """``T^2 KL(softmax(teacher/T) || softmax(student/T))`` along ``dim``, mean over the rest.

    Shapes: logits ``[..., K]`` (``dim`` the class dim); returns a scalar (nats). The
    teacher is detached. Raises ``DistillLossError`` for mismatched shapes or ``T <= 0``.
    """
    check_pair(student, teacher, "kd_loss")
    _check_temperature(temperature, "kd_loss")
    t = temperature
    log_s = F.log_softmax(student / t, dim=dim)
    log_p = F.log_softmax(teacher.detach() / t, dim=dim)
    kl = (log_p.exp() * (log_p - log_s)).sum(dim)
    return kl.mean() * t * t


def mixed_kd_loss(task: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, *,
                  alpha: float = 0.5, temperature: float = 4.0, dim: int = -1) -> torch.Tensor:
    """``(1 - alpha) * task + alpha * kd_loss(student, teacher, temperature)``."""
    _check_alpha(alpha)
    return (1.0 - alpha) * task + alpha * kd_loss(student, teacher, temperature=temperature,
                                                  dim=dim)


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 4.0
             ) -> torch.Tensor:
    """Channel-wise distillation of ``[N, C, *spatial]`` maps (Shu et al. 2021, eq. 3-4).

    Per (sample, channel) a softmax over the spatial positions at ``T``; the KL of the
    teacher's from the student's distribution is summed over positions and channels,
    scaled by ``T^2`` and divided by ``N * C``. Returns a scalar (nats).
    """
    check_pair(student, teacher, "cwd_loss", min_dim=3)
    _check_temperature(temperature, "cwd_loss")
    n, c = student.shape[:2]
    t = temperature
    log_s = F.log_softmax(student.reshape(n, c, -1) / t, dim=-1)
    log_p = F.log_softmax(teacher.detach().reshape(n, c, -1) / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_s)).sum()
    return kl * t * t / (n * c)


FEATURE_LOSSES = ("mse", "cosine")


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, *, kind: str = "mse"
                 ) -> torch.Tensor:
    """Output-feature distillation for ``[..., D]`` embeddings: ``"mse"`` or ``"cosine"``.

    ``mse``: mean of ``(s - t)^2`` over all elements; ``cosine``: mean over the leading dims
    of ``1 - cos(s, t)`` along the last dim (0 when the directions agree).
    """
    check_pair(student, teacher, "feature_loss")
    if kind not in FEATURE_LOSSES:
        raise DistillLossError(f"feature_loss: kind must be one of {FEATURE_LOSSES}, got {kind!r}")
    t = teacher.detach()
    if kind == "mse":
        return F.mse_loss(student, t)
    return (1.0 - F.cosine_similarity(student, t, dim=-1)).mean()
