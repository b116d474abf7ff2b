"""A small built-in training loop around :class:`~fxprune.distill.pruner.Pruner`.

``fit(pruner, data, optimizer, steps=...)`` runs ``steps`` optimisation steps over
``data`` (an iterable of ``(inputs, target)`` batches, cycled), with the loss named by
``loss`` (student output ``s``, teacher output ``t``, target ``y``):

    ``"kd"``        ``(1 - alpha) * task_loss(s, y) + alpha * T^2 KL`` (Hinton et al.)
    ``"task"``      ``task_loss(s, y)`` (no teacher)
    ``"cwd"``       ``(1 - alpha) * task_loss(s, y) + alpha * cwd_loss(s, t)`` (Shu et al.)
    ``"mse"``       ``feature_loss(s, t, "mse")`` (output-embedding KD, no target needed)
    ``"cosine"``    ``feature_loss(s, t, "cosine")``
    callable        ``loss(s, t, y) -> scalar``

plus ``pruner.penalty()`` (Network Slimming's L1 on norm scales, or ViT-Slim's L1 on soft
masks with ``selection="soft"``). A progress bar (tqdm, when installed and
``progress=True``) shows the loss and how much of the budget is reached;
``evaluate(model) -> float`` runs every ``eval_every`` steps on the gated student in eval
mode. Returns the log: one dict per removal or evaluation.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from fxprune.distill.losses import cwd_loss, feature_loss, kd_loss
from fxprune.distill.pruner import Pruner
from fxprune.core.errors import DistillError

__all__ = ["fit", "distillation_loss", "LOSSES", "PruningLoop"]

LOSSES = ("kd", "task", "cwd", "mse", "cosine")


def distillation_loss(kind: str | Callable, s: Any, t: Any, y: Any, *, alpha: float,
                      temperature: float, task_loss: Callable) -> torch.Tensor:
    """The loss of one batch (see the module docstring)."""
    if callable(kind):
        return kind(s, t, y)
    if kind == "task":
        return task_loss(s, y)
    if kind in ("mse", "cosine"):
        return feature_loss(s, t, kind=kind)
    if not 0.0 <= alpha <= 1.0:
        from fxprune.core.errors import DistillLossError
        raise DistillLossError(f"alpha must lie in [0, 1] (weight of the KD term), got {alpha!r}")
    soft = kd_loss(s, t, temperature=temperature, dim=1) if kind == "kd" else \
        cwd_loss(s, t, temperature=temperature)
    task = task_loss(s, y) if alpha < 1.0 else s.new_zeros(())
    return (1.0 - alpha) * task + alpha * soft


def _batches(data: Iterable) -> Iterable:
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise DistillError("data yielded no batch: pass an iterable of (inputs, target)")


def _split(batch: Any) -> tuple[tuple, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise DistillError("each batch must be a pair (inputs, target); inputs a tensor or a "
                           "tuple of tensors (target may be None for feature KD)")
    x, y = batch
    return ((x,) if isinstance(x, torch.Tensor) else tuple(x)), y


class PruningLoop(Protocol):
    """What ``fit`` drives: the structured :class:`Pruner`, or the unstructured
    :class:`fxprune.sparsity.GradualPruner` (Zhu & Gupta cubic sparsity)."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    closure: Callable | None

    def step(self) -> dict | None: ...

    def penalty(self) -> torch.Tensor: ...

    def budget_reached(self) -> float: ...


def fit(pruner: PruningLoop | Pruner, data: Iterable, optimizer: torch.optim.Optimizer, *, steps: int,
        loss: str | Callable = "kd", alpha: float = 0.5, temperature: float = 4.0,
        task_loss: Callable = F.cross_entropy, evaluate: Callable | None = None,
        eval_every: int = 0, progress: bool = True, scheduler: Any = None) -> list[dict]:
    """Train ``pruner.student`` for ``steps`` steps while the pruner removes units
    (a structured ``Pruner``) or raises weight sparsity (a ``GradualPruner``)."""
    if not callable(loss) and loss not in LOSSES:
        raise DistillError(f"loss must be a callable or one of {LOSSES}, got {loss!r}")
    if not isinstance(steps, int) or steps < 1:
        raise DistillError(f"steps must be an integer >= 1, got {steps!r}")
    student, teacher = pruner.student, pruner.teacher
    use_teacher = loss != "task"
    log: list[dict] = []
    last: dict[str, Any] = {}

    def closure(model: torch.nn.Module) -> torch.Tensor:
        s = model(*last["x"])
        return distillation_loss(loss, s, last["t"], last["y"], alpha=alpha,
                                 temperature=temperature, task_loss=task_loss)

    if pruner.closure is None:
        pruner.closure = closure
    bar = _progress(steps, progress)
    student.train()
    for i, batch in zip(range(steps), _batches(data)):
        x, y = _split(batch)
        s = student(*x)
        with torch.no_grad():
            t = teacher(*x) if use_teacher else None
        value = distillation_loss(loss, s, t, y, alpha=alpha, temperature=temperature,
                                  task_loss=task_loss) + pruner.penalty()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        last.update(x=x, y=y, t=t)
        entry = pruner.step()
        if entry is not None:
            log.append({"kind": "removal", "loss": float(value.detach()), **entry})
        if evaluate is not None and eval_every and (i + 1) % eval_every == 0:
            student.eval()
            with torch.no_grad():
                score = float(evaluate(student))
            student.train()
            log.append({"kind": "eval", "step": i + 1, "score": score,
                        "budget_reached": pruner.budget_reached()})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(value.detach()):.4f}",
                            budget=f"{100 * pruner.budget_reached():.0f}%")
    if bar is not None:
        bar.close()
    return log


def _progress(steps: int, wanted: bool) -> Any:
    if not wanted:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=steps, desc="prune+distil", leave=False)
