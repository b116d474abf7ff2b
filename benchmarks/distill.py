"""Prune while training with KD on real data: part (a), sklearn's handwritten digits.

    PYTHONPATH=$PWD python benchmarks/distill.py            # 5 seeds, 2x and 4x fewer MACs
    PYTHONPATH=$PWD python benchmarks/distill.py --quick    # 1 seed, 2x, a few steps (CI)

Data: ``sklearn.datasets.load_digits`` (1,797 real 8x8 digits, bundled with sklearn:
nothing is downloaded), a fixed stratified 75/25 split (``random_state=0``). Model: a
small residual CNN with BatchNorm, trained from scratch (``--pretrain`` steps) per seed.
Every method then gets the same ``--steps`` training steps:

  (i)   one-shot l1 + fine-tune        (iii) prune while training, cpd, no KD
  (ii)  one-shot cpd + fine-tune       (iv)  prune while training, cpd, vanilla KD
  (v)   prune while training, learnable soft masks (ViT-Slim: L1 on the masks), KD

``--method`` picks some of them (``l1 cpd pwt pwt-kd soft``; default all).

Reported per method and budget: test accuracy, MACs, parameters, CPU latency (median ms
of a batch of 256), mean ± std over seeds, and the wall time. Part (b) MiniLM is
``benchmarks/distill_minilm.py``, part (c) segmentation ``benchmarks/distill_seg.py``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.distill import Pruner, fit


class DigitNet(nn.Module):
    """conv-BN-ReLU stem, two residual blocks, a stride-2 stage, linear head (10 classes)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                                    nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w))
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1, stride=2),
                                  nn.BatchNorm2d(2 * w), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1),
                                    nn.BatchNorm2d(2 * w), nn.ReLU(),
                                    nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w))
        self.head = nn.Linear(2 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = F.relu(h + self.block1(h))
        h = self.down(h)
        h = F.relu(h + self.block2(h))
        return self.head(h.mean((2, 3)))


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    to_x = lambda a: torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # noqa
    return to_x(xtr), torch.tensor(ytr), to_x(xte), torch.tensor(yte)


class Batches:
    """Endless shuffled mini-batches from a seeded generator (one pass = one epoch)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> None:
        self.x, self.y, self.size = x, y, size
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=self.gen)
        for i in range(0, len(order) - self.size + 1, self.size):
            idx = order[i:i + self.size]
            yield self.x[idx], self.y[idx]


def optimizer(groups: list[dict], lr: float, kind: str = "sgd") -> torch.optim.Optimizer:
    """SGD with momentum 0.9 (part a) or AdamW; weight decay is set per parameter group."""
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {kind!r}")


def train(model: nn.Module, data: Batches, steps: int, lr: float, kind: str = "sgd") -> None:
    opt = optimizer([{"params": model.parameters(), "weight_decay": 5e-4}], lr, kind)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    it = _cycle(data)
    for _ in range(steps):
        x, y = next(it)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _cycle(data):
    while True:
        yield from data


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean()) * 100


def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def one_shot(dense: nn.Module, criterion: str, target: float, data: Batches, example: torch.Tensor,
             steps: int, lr: float) -> tuple[nn.Module, fxprune.Plan]:
    analysis = fxprune.analyze(dense, (example,))
    imp = fxprune.Importance(criterion, data=data, loss_fn=F.cross_entropy, batches=4) \
        if criterion == "cpd" else criterion
    plan = fxprune.plan(analysis, imp, target_macs=target, max_ratio_per_group=0.9)
    small = fxprune.compile(analysis, plan)
    fxprune.verify(analysis, small, plan, (example,))
    train(small, data, steps, lr)
    return small, plan


def while_training(dense: nn.Module, loss: str, target: float, data: Batches,
                   example: torch.Tensor, steps: int, lr: float, interval: int,
                   soft: tuple[float, float] | None = None, kind: str = "sgd"):
    """Prune while training with ``cpd``, or (``soft=(l1, mask lr)``) with soft masks; ``loss``
    as in ``fit`` (``"task"``, ``"kd"``, ``"cwd"``). Returns ``finish()``'s DistillResult."""
    prune_steps = max(interval, (steps // 2) // interval * interval)
    how = {"criterion": "cpd"} if soft is None else {"selection": "soft", "l1": soft[0]}
    pruner = Pruner(dense, (example,), target_macs=target, interval=interval, steps=prune_steps,
                    schedule="cubic", max_ratio_per_group=0.9, **how)
    groups = [{"params": pruner.weight_parameters(), "weight_decay": 5e-4}]
    if soft is not None:  # masks: their own learning rate, no weight decay (only the L1)
        groups.append({"params": pruner.mask_parameters(), "lr": soft[1], "weight_decay": 0.0})
    opt = optimizer(groups, lr, kind)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    fit(pruner, data, opt, steps=steps, loss=loss, alpha=0.7, temperature=4.0, progress=False,
        scheduler=sched)
    return pruner.finish(example)


METHODS = ("(i) one-shot l1 + FT", "(ii) one-shot cpd + FT", "(iii) PWT cpd", "(iv) PWT cpd + KD",
           "(v) PWT soft masks + KD")
METHOD_KEYS = dict(zip(("l1", "cpd", "pwt", "pwt-kd", "soft"), METHODS))


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = load_data()
    rows: dict[tuple[str, float], list[tuple[float, float, float, float]]] = {}
    dense_rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = DigitNet(args.width)
        train(dense, Batches(xtr, ytr, args.batch, seed), args.pretrain, args.lr)
        dense.eval()
        analysis = fxprune.analyze(dense, (xtr[:2],))
        from fxprune.planning.cost import compute_cost
        cost = compute_cost(analysis)  # MACs of a batch of 2: halve for per sample
        dense_rows.append((accuracy(dense, xte, yte), cost.dense.macs / 2, count(dense),
                           latency_ms(dense, xte[:256], args.repeats)))
        for factor in args.factors:
            target = 1.0 / factor
            for name in [METHOD_KEYS[k] for k in args.method]:
                torch.manual_seed(1000 + seed)
                data = Batches(xtr, ytr, args.batch, 1000 + seed)
                example = xtr[:2]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    if name.startswith("(i)"):
                        small, plan = one_shot(dense, "l1", target, data, example, args.steps,
                                               args.lr_ft)
                    elif name.startswith("(ii)"):
                        small, plan = one_shot(dense, "cpd", target, data, example, args.steps,
                                               args.lr_ft)
                    else:
                        soft = (args.soft_l1, args.soft_lr) if name.startswith("(v)") else None
                        loss = "task" if name.startswith("(iii)") else "kd"
                        done = while_training(dense, loss, target, data, example, args.steps,
                                              args.lr_ft, args.interval, soft)
                        small, plan = done.model, done.plan
                macs = cost.evaluate(plan.kept_labels(analysis)).macs / 2
                rows.setdefault((name, factor), []).append(
                    (accuracy(small, xte, yte), macs, count(small),
                     latency_ms(small, xte[:256], args.repeats)))
    return {"dense": dense_rows, "rows": rows}


def _ms(values: list[float], fmt: str) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{fmt}} ± {std:{fmt}}"


def report(result: dict, args: argparse.Namespace, wall: float) -> str:
    from tabulate import tabulate

    table = []
    d = result["dense"]
    table.append(["dense", "1x", _ms([r[0] for r in d], ".2f"), _ms([r[1] for r in d], ",.0f"),
                  _ms([r[2] for r in d], ",.0f"), _ms([r[3] for r in d], ".2f")])
    for (name, factor), rs in result["rows"].items():
        table.append([name, f"{factor:g}x", _ms([r[0] for r in rs], ".2f"),
                      _ms([r[1] for r in rs], ",.0f"), _ms([r[2] for r in rs], ",.0f"),
                      _ms([r[3] for r in rs], ".2f")])
    head = (f"digits: {args.seeds} seed(s), pretrain {args.pretrain} steps, {args.steps} steps "
            f"per method, batch {args.batch}, width {args.width}; wall {wall:.1f} s\n")
    return head + tabulate(table, headers=["method", "fewer MACs", "test acc %", "MACs/sample",
                                           "params", "latency ms (256)"])


def training_arguments(ap: argparse.ArgumentParser, *, pretrain: int, steps: int, batch: int,
                       width: int, lr: float, lr_ft: float, methods: dict) -> None:
    """The options every distill benchmark shares (seeds, steps, sizes, rates, threads)."""
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--pretrain", type=int, default=pretrain, help="teacher training steps")
    ap.add_argument("--steps", type=int, default=steps, help="training steps per method")
    ap.add_argument("--interval", type=int, default=20, help="steps between removals")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--width", type=int, default=width)
    ap.add_argument("--lr", type=float, default=lr, help="teacher learning rate")
    ap.add_argument("--lr-ft", type=float, default=lr_ft, help="learning rate of the methods")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", nargs="+", choices=list(methods), default=list(methods))


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2x, a few steps (CI)")
    training_arguments(ap, pretrain=600, steps=400, batch=64, width=32, lr=0.05, lr_ft=0.02,
                       methods=METHOD_KEYS)
    ap.add_argument("--factors", type=float, nargs="+", default=[2.0, 4.0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--soft-l1", type=float, default=5e-3, help="(v): L1 weight on the masks")
    ap.add_argument("--soft-lr", type=float, default=0.1, help="(v): the masks' learning rate")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.factors, args.pretrain, args.steps = 1, [2.0], 20, 8
        args.interval, args.width, args.repeats, args.threads = 2, 8, 2, 1
    return args


def timed_main(argv: list[str] | None, parse, run, report) -> str:
    """Parse, run, print the report with the wall time of the run; returns the text."""
    args = parse(argv)
    t = time.perf_counter()
    result = run(args)
    text = report(result, args, time.perf_counter() - t)
    print(text)
    return text


def main(argv: list[str] | None = None) -> str:
    return timed_main(argv, parse, run, report)


if __name__ == "__main__":
    main(sys.argv[1:])
