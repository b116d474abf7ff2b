"""Prune torchvision models at one ratio and measure what it costs and what it buys.

    python benchmarks/zoo.py                       # a representative subset
    python benchmarks/zoo.py --models resnet50,vit_b_16 --repeats 15
    python benchmarks/zoo.py --all                 # every torchvision classifier (slow)

Per model: graph nodes, coupled groups, prunable units; trace / analysis / compile
seconds; params and MACs before/after (``FlopCounterMode`` FLOPs / 2); CPU latency of
the original model and of the pruned one at batch 1, 224x224 (median over ``--repeats``,
the two models interleaved in the same loop so that machine load hits both alike); and
the realised speedup divided by the MAC reduction (1.0: latency falls as fast as MACs).
Models use random init (nothing is downloaded).

``--vs-torch-pruning`` (needs ``pip install -e ".[bench]"``) instead times, per model and
in the same loop, fxprune's analyse + plan + compile against Torch-Pruning's
``DependencyGraph`` build + prune step (``MagnitudePruner``, L1, same ratio, final
classifier left whole), medians over ``--repeats``, and says whether both give the
same parameter shapes.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxprune  # noqa: E402
from fxprune.cli import count_macs, count_params  # noqa: E402

SUBSET = ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
          "convnext_tiny", "vit_b_16", "swin_t"]
SPEEDUP_TARGET = ("resnet50", 0.8)  # speedup / MAC reduction at ratio 0.5


def latencies(models: list[torch.nn.Module], x: torch.Tensor, *, repeats: int,
              warmup: int) -> list[float]:
    """Median seconds per forward of each model, measured interleaved."""
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for i in range(warmup + repeats):
            for m, acc in zip(models, times):
                start = time.perf_counter()
                m(x)
                if i >= warmup:
                    acc.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def bench(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    row: dict[str, Any] = {"model": name}

    start = time.perf_counter()
    gm = fxprune.trace(model, (x,))
    row["trace s"] = time.perf_counter() - start
    start = time.perf_counter()
    analysis = fxprune.analyze(gm, (x,))
    row["analyse s"] = time.perf_counter() - start
    row["nodes"] = len(analysis.gm.graph.nodes)
    row["groups"] = len(analysis.groups)
    row["units"] = sum(g.size for g in analysis.groups)
    plan = fxprune.Plan.from_ratio(analysis, args.ratio, criterion=args.criterion)
    start = time.perf_counter()
    small = fxprune.compile(gm, plan).eval()
    row["compile s"] = time.perf_counter() - start

    p0, p1 = count_params(model), count_params(small)
    m0, m1 = count_macs(model, (x,)), count_macs(small, (x,))
    row["params M"] = f"{p0 / 1e6:.2f} -> {p1 / 1e6:.2f}"
    row["GMACs"] = f"{m0 / 1e9:.2f} -> {m1 / 1e9:.2f}"
    row["MAC red."] = m0 / m1
    if args.verify:
        report = fxprune.verify(gm, small, plan, (x,), raise_on_failure=False)
        row["verify"] = "OK" if report.ok else "FAILED"
    if args.repeats:
        gc.collect()
        t0, t1 = latencies([model, small], x, repeats=args.repeats, warmup=args.warmup)
        row["ms before"], row["ms after"] = t0 * 1e3, t1 * 1e3
        row["speedup"] = t0 / t1
        row["speedup/MAC red."] = (t0 / t1) / (m0 / m1)
    return row


def vs_torch_pruning(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds of fxprune analyse+plan+compile and of Torch-Pruning build+step,
    interleaved; ``same shapes``: every parameter of both pruned models, by name."""
    import copy

    import torch_pruning as tp
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
            and m.out_features == 1000]
    ours, theirs = [], []
    for _ in range(max(args.repeats, 1)):
        gc.collect()
        start = time.perf_counter()
        plan = fxprune.Plan.from_ratio(fxprune.analyze(model, (x,)), args.ratio,
                                       criterion=args.criterion)
        small = fxprune.compile(model, plan)
        ours.append(time.perf_counter() - start)
        peer = copy.deepcopy(model)
        heads = [dict(peer.named_modules())[n] for n, m in model.named_modules() if m in head]
        gc.collect()
        start = time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(
            peer, x, importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=args.ratio, ignored_layers=heads)
        pruner.step()
        theirs.append(time.perf_counter() - start)
    a = {k: tuple(v.shape) for k, v in small.named_parameters()}
    b = {k: tuple(v.shape) for k, v in peer.named_parameters()}
    t0, t1 = statistics.median(ours), statistics.median(theirs)
    return {"model": name, "fxprune s": t0, "Torch-Pruning s": t1, "ratio": t0 / t1,
            "params M": f"{count_params(small) / 1e6:.2f} / {count_params(peer) / 1e6:.2f}",
            "same shapes": "yes" if a == b else
            f"no ({sum(a.get(k) != v for k, v in b.items())} of {len(b)} differ)"}


def _warm_up() -> None:
    """One tiny trace/analyse/compile so that the first model does not pay import costs."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1)).eval()
    x = (torch.randn(1, 3, 8, 8),)
    small = fxprune.compile(model, fxprune.Plan.from_ratio(fxprune.analyze(model, x), 0.5))
    count_macs(small, x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated torchvision model names")
    parser.add_argument("--all", action="store_true", help="every torchvision classifier")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--criterion", default="l1")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs (0: no latency)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--verify", action="store_true", help="also run slice == mask")
    parser.add_argument("--vs-torch-pruning", action="store_true",
                        help="time analyse+plan+compile against Torch-Pruning build+prune")
    args = parser.parse_args(argv)

    import torchvision
    from tabulate import tabulate

    torch.set_num_threads(args.threads)
    if args.all:
        names = torchvision.models.list_models(module=torchvision.models)
    elif args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    else:
        names = SUBSET
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{args.threads} CPU thread(s), batch 1 x 3 x {args.size} x {args.size}, "
          f"ratio {args.ratio} ({args.criterion}), latency median of {args.repeats} "
          f"(warmup {args.warmup}), before/after interleaved", flush=True)
    _warm_up()
    rows, failed = [], []
    for name in names:
        try:
            row = (vs_torch_pruning if args.vs_torch_pruning else bench)(name, args)
        except Exception as exc:  # one model's failure must not hide the others
            failed.append((name, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"))
            print(f"  {name}: FAILED {failed[-1][1]}", file=sys.stderr, flush=True)
            continue
        rows.append(row)
        print(f"  {name}: done", file=sys.stderr, flush=True)
    headers = list(dict.fromkeys(k for r in rows for k in r))
    print(tabulate([[r.get(h, "") for h in headers] for r in rows], headers=headers,
                   floatfmt=".2f"))
    for name, why in failed:
        print(f"FAILED {name}: {why}")
    if args.vs_torch_pruning and rows:
        print(f"median fxprune / Torch-Pruning time ratio: "
              f"{statistics.median(r['ratio'] for r in rows):.2f} (target <= 1)")
    target_model, target = SPEEDUP_TARGET
    for r in rows:
        if r["model"] == target_model and "speedup/MAC red." in r:
            got = r["speedup/MAC red."]
            print(f"target: {target_model} speedup / MAC reduction >= {target}: {got:.3f} "
                  f"({r['speedup']:.2f}x speedup for {r['MAC red.']:.2f}x fewer MACs) "
                  f"{'PASS' if got >= target else 'MISS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
