"""Benchmark: importance criteria at half the MACs on real handwritten digits.

Trains a small residual CNN on ``sklearn.datasets.load_digits`` (1797 real 8x8 digits,
upsampled to 16x16), prunes it to 50% of its MACs with every criterion in
``fxprune.importance.CRITERIA`` and reports test accuracy right after pruning and after
a short fine-tune of fixed budget, as mean +- std over seeds (each seed trains its own
base model). Install the extra first: ``pip install -e ".[bench]"``.

    OMP_NUM_THREADS=1 python benchmarks/criteria.py                  # 3 seeds, both scopes
    OMP_NUM_THREADS=1 python benchmarks/criteria.py --scopes local   # uniform ratio only
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.planning.importance import CRITERIA, Importance
from fxprune.planning.cost import compute_cost


# ----------------------------------------------------------------------------------
# data and model
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(size: int = 16) -> Digits:
    """The scikit-learn digits, scaled to [0, 1], upsampled, standardised; fixed 75/25 split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0,
                                           stratify=data.target)
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


class DigitNet(nn.Module):
    """Five conv-bn-relu layers (one residual block), global pooling, a linear head:
    four prunable groups (c1; c2 with the residual c3; c4; c5); 1.8M MACs at 16x16
    for ``width=16``."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.c1, self.b1 = nn.Conv2d(1, w1, 3, padding=1), nn.BatchNorm2d(w1)
        self.c2, self.b2 = nn.Conv2d(w1, w2, 3, stride=2, padding=1), nn.BatchNorm2d(w2)
        self.c3, self.b3 = nn.Conv2d(w2, w2, 3, padding=1), nn.BatchNorm2d(w2)
        self.c4, self.b4 = nn.Conv2d(w2, w3, 3, stride=2, padding=1), nn.BatchNorm2d(w3)
        self.c5, self.b5 = nn.Conv2d(w3, w3, 3, padding=1), nn.BatchNorm2d(w3)
        self.fc = nn.Linear(w3, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = x + F.relu(self.b3(self.c3(x)))
        x = F.relu(self.b4(self.c4(x)))
        x = F.relu(self.b5(self.c5(x)))
        return self.fc(x.mean((2, 3)))


def batches(x: torch.Tensor, y: torch.Tensor, size: int, gen: torch.Generator):
    order = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), size):
        j = order[i:i + size]
        yield x[j], y[j]


def train(model: nn.Module, data: Digits, *, epochs: int, lr: float, seed: int,
          weight_decay: float = 5e-4) -> None:
    """SGD with momentum and a cosine schedule; the module is trained in place."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * ((len(data.y_train) + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(data.x_train, data.y_train, 64, gen):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()


@torch.no_grad()
def recalibrate(model: nn.Module, data: Digits, *, n_batches: int = 8, seed: int = 0) -> None:
    """Re-estimate BatchNorm running statistics on training batches (no gradient step)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for i, (xb, _) in enumerate(batches(data.x_train, data.y_train, 64, gen)):
        if i >= n_batches:
            break
        model(xb)


@torch.no_grad()
def accuracy(model: nn.Module, data: Digits) -> float:
    model.eval()
    return float((model(data.x_test).argmax(1) == data.y_test).float().mean()) * 100


# ----------------------------------------------------------------------------------
# one criterion
GLOBAL_CAP = 0.75  # a global ranking may take at most 75% of a group (no bottleneck layers)

# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    criterion: str
    scope: str
    seed: int
    pruned: float
    recalibrated: float
    finetuned: float
    macs_ratio: float
    score_s: float


def run_criterion(name: str, base: nn.Module, analysis, cost, data: Digits, *, seed: int,
                  scope: str, finetune_epochs: int, score_batches: int) -> Result:
    gen = torch.Generator().manual_seed(1000 + seed)
    score_data = list(batches(data.x_train, data.y_train, 64, gen))[:score_batches]
    spec = CRITERIA[name]
    # a global ranking compares groups: magnitudes are normalised per layer; data-driven
    # scores are loss-change estimates and compare as they are
    layer_norm = "mean" if scope == "global" and not spec.needs_data else None
    imp = Importance(name, data=score_data if spec.needs_data else None,
                     loss_fn=F.cross_entropy if spec.needs_data else None,
                     batches=score_batches, probes=2, seed=seed, layer_norm=layer_norm)
    start = time.perf_counter()
    with warnings.catch_warnings():  # "met x% below": the kept-MACs column shows it
        warnings.simplefilter("ignore", UserWarning)
        plan = fxprune.plan(analysis, imp, target_macs=0.5, scope=scope, cost=cost,
                            max_ratio_per_group=GLOBAL_CAP if scope == "global" else 1.0)
    score_s = time.perf_counter() - start
    small = fxprune.compile(base, plan)
    pruned = accuracy(small, data)
    recal = copy.deepcopy(small)
    recalibrate(recal, data, seed=seed)
    train(small, data, epochs=finetune_epochs, lr=0.01, seed=seed)
    return Result(name, scope, seed, pruned, accuracy(recal, data), accuracy(small, data),
                  cost.evaluate_plan(plan).macs / cost.dense.macs, score_s)


# ----------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------
def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):5.1f} ± {sd:4.1f}"


def report(results: list[Result], base_acc: list[float], scope: str, args) -> str:
    from tabulate import tabulate

    mine = [r for r in results if r.scope == scope]
    names = list(dict.fromkeys(r.criterion for r in mine))
    by = {n: [r for r in mine if r.criterion == n] for n in names}
    rows = sorted(((n, mean_std([r.pruned for r in rs]), mean_std([r.recalibrated for r in rs]),
                    mean_std([r.finetuned for r in rs]),
                    f"{statistics.mean(r.macs_ratio for r in rs):.3f}",
                    f"{statistics.mean(r.score_s for r in rs):.2f}")
                   for n, rs in by.items()),
                  key=lambda row: -float(row[3].split("±")[0]))
    cap = f", max_ratio_per_group={GLOBAL_CAP}" if scope == "global" else ""
    lines = [f"scope={scope}{cap}: DigitNet on sklearn digits (16x16), seeds "
             f"{sorted({r.seed for r in mine})}, target 50% MACs, fine-tune "
             f"{args.finetune_epochs} epoch(s); unpruned test accuracy {mean_std(base_acc)} %", "",
             tabulate(rows, headers=["criterion", "pruned", "pruned + BN recal.",
                                     "fine-tuned", "MACs kept", "plan (s)"],
                      disable_numparse=True), ""]
    lines += verdict(by)
    return "\n".join(lines)


def verdict(by: dict[str, list[Result]]) -> list[str]:
    """Plain statements: who beats magnitude (l1), where random ranks."""
    def mean(n: str, field: str) -> float:
        return statistics.mean(getattr(r, field) for r in by[n])

    out = []
    for field, label in (("pruned", "pruned"), ("recalibrated", "pruned + BN recal."),
                         ("finetuned", "fine-tuned")):
        ref = mean("l1", field)
        better = [n for n in by if n != "l1" and mean(n, field) > ref]
        worse = [n for n in by if n != "l1" and mean(n, field) <= ref]
        rank = sorted(by, key=lambda n: -mean(n, field)).index("random") + 1
        out.append(f"{label}: beat l1 ({ref:.1f}%): {', '.join(better) or 'none'}; "
                   f"not: {', '.join(worse) or 'none'}; random ranks {rank}/{len(by)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--score-batches", type=int, default=8)
    parser.add_argument("--scopes", default="local,global")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--weight-decay", type=float, default=5e-3)
    parser.add_argument("--criteria", default=",".join(
        n for n, s in CRITERIA.items() if getattr(s, "scores_units", True)))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = load_digits()
    names = [n for n in args.criteria.split(",") if n]
    results, base_acc = [], []
    start = time.perf_counter()
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        base = DigitNet(args.width)
        train(base, data, epochs=args.epochs, lr=0.05, seed=seed, weight_decay=args.weight_decay)
        base_acc.append(accuracy(base, data))
        analysis = fxprune.analyze(base, (data.x_test[:2],))
        cost = compute_cost(analysis)
        for scope in args.scopes.split(","):
            for name in names:
                results.append(run_criterion(name, base, analysis, cost, data, seed=seed,
                                             scope=scope, finetune_epochs=args.finetune_epochs,
                                             score_batches=args.score_batches))
        print(f"seed {seed}: base {base_acc[-1]:.1f}% ({time.perf_counter() - start:.0f}s)",
              file=sys.stderr, flush=True)
    print("\n\n".join(report(results, base_acc, scope, args) for scope in args.scopes.split(",")))
    print(f"\ntotal time {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
