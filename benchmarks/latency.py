"""Latency before/after pruning the way deployments run (issue 12, section 1).

    python benchmarks/latency.py [--models resnet50,mobilenet_v3_large] [--ratio 0.5]
        [--backends eager,onnxruntime,compile] [--batches 1,8] [--repeats 10] [--fold-bn]
        [--channels-last] [--round-to N|auto]

For each torchvision model (random init, eval, 224x224): L1 plan at ``--ratio``,
``fxprune.compile``; original and pruned measured interleaved (``fxprune.bench``), median
and IQR in ms, speedup and speedup / MAC reduction per backend and batch. With
``--fold-bn`` both models get BatchNorm folded (the fair comparison for deployment).
Absolute times are noisy on a shared machine; the ratios are measured interleaved.

``--graph-vs-module``: instead, the same plan compiled both ways, the GraphModule
(``output="graph"``) and the user's own class (``output="module"``, the eager model at
the pruned shapes), measured interleaved with the dense model on each backend.
"""
from __future__ import annotations

import argparse

import torch
import torchvision

import fxprune
from fxprune.bench import bench_pruning, rows_table
from fxprune.cli import count_macs
from passes.memory_format import to_channels_last


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--backends", default="eager,onnxruntime")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--fold-bn", action="store_true")
    ap.add_argument("--graph-vs-module", action="store_true")
    ap.add_argument("--round-to", default="1", help="N or auto (measured on the first backend)")
    ap.add_argument("--channels-last", action="store_true",
                    help="conv weights channels-last in both models (passes.memory_format)")
    args = ap.parse_args()
    torch.manual_seed(0)
    summary = []
    for name in args.models.split(","):
        model = torchvision.models.get_model(name).eval()
        x = torch.randn(1, 3, args.size, args.size)
        analysis = fxprune.analyze(model, (x,))
        if args.round_to == "auto":
            from fxprune.bench import measure_rounding
            plan = fxprune.plan(analysis, "l1", ratio=args.ratio, round_to="auto",
                                rounding=measure_rounding(args.backends.split(",")[0]))
        else:
            plan = fxprune.Plan.from_ratio(analysis, args.ratio, criterion="l1",
                                           round_to=int(args.round_to))
        if args.graph_vs_module:
            graph_vs_module(model, plan, x, args)
            continue
        small = fxprune.compile(model, plan, fold_bn=args.fold_bn).eval()
        ref = (fxprune.compile(model, fxprune.Plan.from_ratio(analysis, 0.0), fold_bn=True).eval()
               if args.fold_bn else model)
        red = count_macs(model, (x,)) / count_macs(small, (x,))
        if args.channels_last:  # conv weights NHWC in both (compile(memory_format=...))
            ref, small = to_channels_last(ref), to_channels_last(small)
        rows = bench_pruning(ref, small, lambda b: (torch.randn(b, 3, args.size, args.size),),
                             mac_reduction=red, batches=[int(b) for b in args.batches.split(",")],
                             backends=args.backends.split(","), repeats=args.repeats)
        print(f"\n{name}, ratio {args.ratio}, {args.size}x{args.size}, "
              f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats"
              f"{', BN folded in both' if args.fold_bn else ''}"
              f"{', channels-last' if args.channels_last else ''}")
        print(rows_table(rows), flush=True)
        summary += [(name, r.backend, r.batch, r.speedup, r.ratio) for r in rows]
    if len(summary) > 1:
        from tabulate import tabulate
        summary.sort(key=lambda r: r[3])
        print(f"\nall rows, slowest speedup first (round_to {args.round_to}):")
        print(tabulate([(m, b, n, f"{s:.2f}x", f"{q:.2f}") for m, b, n, s, q in summary],
                       headers=["model", "backend", "batch", "speedup", "speedup/MACs"]))
        slower = [r for r in summary if r[3] < 1.0]
        print(f"pruned slower than the original: {len(slower)} of {len(summary)} rows"
              + (f" ({', '.join(f'{m} {b} b{n}' for m, b, n, _, _ in slower)})" if slower else ""))


def graph_vs_module(model, plan, x, args) -> None:
    from tabulate import tabulate

    from fxprune.bench import measure_model_latency

    models = {"dense": model, "graph": fxprune.compile(model, plan).eval(),
              "module": fxprune.compile(model, plan, output="module").eval()}
    for backend in args.backends.split(","):
        for b in (int(v) for v in args.batches.split(",")):
            xb = torch.randn(b, *x.shape[1:])
            got = measure_model_latency(models, (xb,), backend=backend, repeats=args.repeats)
            rows = [[k, str(got[k]), f"{got['dense'].median_ms / got[k].median_ms:.2f}x",
                     f"{got['module'].median_ms / got[k].median_ms:.3f}"] for k in models]
            print(f"\n{type(model).__name__}, {backend}, batch {b}, ratio {args.ratio}, "
                  f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats")
            print(tabulate(rows, headers=["model", "median", "vs dense", "module ms / this"],
                           tablefmt="github"), flush=True)


if __name__ == "__main__":
    main()
