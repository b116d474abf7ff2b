"""Backend-aware rounding, measured (issue 12, section 2): which channel counts run
fastest here, and whether plans rounded to them are faster at the same MACs.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/rounding.py \
        [--models resnet50,mobilenet_v3_large,vit_b_16] [--backends eager,onnxruntime] \
        [--target-macs 0.5] [--repeats 10] [--size 224]

1. ``fxprune.bench.measure_rounding(backend)`` per backend: the gain table (how much more
   a misaligned width costs per MAC than an aligned one, size trend divided out) and the
   multiple chosen per op kind.
2. Per model (torchvision, random init, eval, one thread): three plans at the same MAC
   target (local scope, L1), ``round_to=1``, ``round_to=8`` and ``round_to="auto"`` (the
   table of that backend); dense and the three pruned models are measured interleaved
   (``fxprune.bench.measure_model_latency``) at batch 1. Printed: MACs of each plan,
   median ms (IQR), speedup over dense, and the latency ratio auto / round_to=1 (below 1:
   the rounding made it faster). Only ratios within one run are meaningful.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torchvision
from tabulate import tabulate

import fxprune
from fxprune.bench import measure_model_latency, measure_rounding
from fxprune.cli import count_macs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,mobilenet_v3_large,vit_b_16")
    ap.add_argument("--backends", default="eager,onnxruntime")
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    backends = args.backends.split(",")
    tables = {}
    for b in backends:
        start = time.perf_counter()
        tables[b] = measure_rounding(b)
        print(f"\nrounding table, backend {b} ({torch.get_num_threads()} threads, measured in "
              f"{time.perf_counter() - start:.1f} s):\n{tables[b].table()}", flush=True)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name).eval()
        x = torch.randn(1, 3, args.size, args.size)
        analysis = fxprune.analyze(model, (x,))
        dense_macs = count_macs(model, (x,))
        for b in backends:
            plans = {"round_to=1": dict(round_to=1), "round_to=8": dict(round_to=8),
                     "auto": dict(round_to="auto", rounding=tables[b])}
            models = {"dense": model}
            macs = {"dense": dense_macs}
            for label, kw in plans.items():
                plan = fxprune.plan(analysis, "l1", target_macs=args.target_macs, **kw)
                models[label] = fxprune.compile(model, plan).eval()
                macs[label] = count_macs(models[label], (x,))
            try:
                got = measure_model_latency(models, (x,), backend=b, repeats=args.repeats)
            except fxprune.FxpruneError as exc:  # e.g. the dense model does not export
                print(f"{name} on {b}: skipped ({str(exc).splitlines()[0][:160]})", flush=True)
                continue
            base = got["round_to=1"].median_ms
            for label in models:
                rows.append((name, b, label, f"{macs[label] / dense_macs:.3f}", str(got[label]),
                             f"{got['dense'].median_ms / got[label].median_ms:.2f}x",
                             f"{got[label].median_ms / base:.3f}"))
            print(tabulate(rows[-len(models):], headers=HEADERS), flush=True)
    print(f"\nall ({args.repeats} interleaved repeats, batch 1, {args.size}x{args.size}, "
          f"target_macs {args.target_macs}):")
    print(tabulate(rows, headers=HEADERS))


HEADERS = ["model", "backend", "plan", "MACs / dense", "median ms (IQR)", "speedup",
           "ms / round_to=1"]

if __name__ == "__main__":
    main()
