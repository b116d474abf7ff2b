"""Latency-aware vs uniform plans at equal MACs, and measured latency targets (issue 12, §2).

    python benchmarks/latency_aware.py --models resnet50,mobilenet_v3_large,vit_b_16 \
        [--ratio 0.5] [--backends eager,onnxruntime] [--repeats 20] [--threads 2]
    python benchmarks/latency_aware.py --targets 0.5 --models resnet50 --backends eager,onnxruntime

Mode 1 (default), per torchvision model (random init, eval, 224x224, BN folded in every
model, the dense reference too), plans with the same MACs:

- ``uniform``: every group loses ``--ratio`` of its units (L1, local);
- ``global-macs``: one global L1 ranking, each score divided by the MACs its unit saves
  (``Importance("l1", layer_norm="mean", normalize="macs")``), ``target_macs`` = the
  uniform plan's MACs;
- ``latency``: the same with ``normalize="latency"``: scores per millisecond saved, from
  the per-node latency table measured here on eager (``fxprune.cost.measure_latency``;
  HALP's latency-aware ranking);
- ``latency w=W`` (``--latency-weights``): ``Importance(latency_weight=W)``, each score
  divided by ``ms * (ms / MACs) ** (W - 1)``: above 1, the units whose milliseconds per
  MAC are high go first;
- ``latency+auto``: the ``latency`` plan with kept counts rounded to the multiples measured fastest on
  the backend (``round_to="auto"``, ``fxprune.bench.measure_rounding``).

All plans cap a group at ``--max-ratio`` removed. The models are measured interleaved
(``fxprune.bench.measure_model_latency``); the table gives MACs against the uniform
plan's, the median and IQR in ms, speedups against the dense model and against the
uniform plan, measured in the same run, and "L1 kept": the mean over groups of the share
of the group's L1 mass the plan keeps (what the faster plans give up, by the criterion).

Mode 2 (``--targets F,...``): ``fxprune.bench.plan_for_measured_latency(target_fraction=F)``
on each backend: a pruned model measuring ``F`` x the dense model's latency; the table
gives the figure the search stopped on, a fresh interleaved run of the returned model
against the dense one, its pruned/dense ratio and the relative error against ``F``
(issue goal: within 5%).
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision
from tabulate import tabulate

import fxprune
from fxprune.bench import measure_model_latency, measure_rounding, plan_for_measured_latency
from fxprune.cli import count_macs
from fxprune.planning.cost import compute_cost, measure_latency
from fxprune.planning.importance import Importance


def _plans(analysis, args, cost, table, rounding):
    uniform = fxprune.plan(analysis, "l1", ratio=args.ratio)
    macs = cost.evaluate(uniform.kept_labels(analysis)).macs
    common = dict(target_macs=float(macs), scope="global", cost=cost,
                  max_ratio_per_group=args.max_ratio)
    by_macs = Importance("l1", layer_norm="mean", normalize="macs")
    by_ms = Importance("l1", layer_norm="mean", normalize="latency", latency=table)
    plans = {
        "uniform": uniform,
        "global-macs": fxprune.plan(analysis, by_macs, round_to=1, **common),
        "latency": fxprune.plan(analysis, by_ms, round_to=1, **common),
        "latency+auto": fxprune.plan(analysis, by_ms, round_to="auto", rounding=rounding,
                                     **common),
    }
    for w in args.latency_weights:
        by_w = Importance("l1", layer_norm="mean", normalize="latency", latency=table,
                          latency_weight=w)
        plans[f"latency w={w:g}"] = fxprune.plan(analysis, by_w, round_to=1, **common)
    for m in args.round_to:
        plans[f"global-macs+{m}"] = fxprune.plan(analysis, by_macs, round_to=m, **common)
        plans[f"latency+{m}"] = fxprune.plan(analysis, by_ms, round_to=m, **common)
    return plans


def _score_kept(l1, plan) -> float:
    """Mean over groups of the fraction of the group's L1 mass the plan keeps (1: dense)."""
    fr = [float(l1[g][list(k)].sum() / l1[g].sum()) for g, k in plan.keep.items()
          if l1[g].sum() > 0]
    return sum(fr) / len(fr)


def equal_macs(args) -> None:
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name).eval()
        x = torch.randn(1, 3, args.size, args.size)
        t0 = time.perf_counter()
        analysis = fxprune.analyze(model, (x,))
        cost = compute_cost(analysis)
        table = measure_latency(cost, repeats=3)
        dense = fxprune.compile(model, fxprune.Plan.keep_all(analysis), fold_bn=True).eval()
        for backend in args.backends.split(","):
            rounding = measure_rounding(backend)
            plans = _plans(analysis, args, cost, table, rounding)
            models = {"dense": dense}
            models.update({k: fxprune.compile(model, p, fold_bn=True).eval()
                           for k, p in plans.items()})
            macs = {k: count_macs(m, (x,)) for k, m in models.items()}
            got = measure_model_latency(models, (x,), backend=backend, repeats=args.repeats)
            l1 = Importance("l1", normalize=None).scores(analysis)
            rows = []
            for k in models:
                ms = got[k].median_ms
                pred = table.predict(cost, plans[k].kept_labels(analysis)) if k in plans \
                    else table.dense_ms
                rows.append([k, f"{macs[k] / 1e6:.0f}M", f"{macs[k] / macs['uniform']:.3f}",
                             f"{pred:.1f}", f"{ms:.2f} (IQR {got[k].iqr_ms:.2f})",
                             f"{got['dense'].median_ms / ms:.2f}x",
                             f"{got['uniform'].median_ms / ms:.3f}",
                             f"{_score_kept(l1, plans[k]) if k in plans else 1.0:.3f}"])
            print(f"\n{name}, {backend}, batch 1, {args.size}x{args.size}, ratio {args.ratio}, "
                  f"max_ratio {args.max_ratio}, {torch.get_num_threads()} threads, "
                  f"{args.repeats} interleaved repeats, rounding multiples "
                  f"{rounding.multiples} ({time.perf_counter() - t0:.0f} s so far)")
            print(tabulate(rows, headers=["plan", "MACs", "MACs/uniform", "table ms (eager)",
                                          "measured ms", "vs dense", "vs uniform",
                                          "L1 kept"],
                           tablefmt="github"), flush=True)


def targets(args) -> None:
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name).eval()
        x = torch.randn(1, 3, args.size, args.size)
        for backend in args.backends.split(","):
            for f in (float(v) for v in args.targets.split(",")):
                t0 = time.perf_counter()
                plan, small, ms = plan_for_measured_latency(model, (x,), target_fraction=f,
                                                            backend=backend,
                                                            repeats=args.repeats)
                again = measure_model_latency({"dense": model, "pruned": small}, (x,),
                                              backend=backend, repeats=args.repeats)
                fresh = again["pruned"].median_ms / again["dense"].median_ms
                rows.append([name, backend, f, f"{ms:.2f}",
                             f"{again['pruned']} / {again['dense']}", f"{fresh:.3f}",
                             f"{fresh / f - 1:+.1%}", f"{time.perf_counter() - t0:.0f}"])
                print(rows[-1], flush=True)
    print(tabulate(rows, headers=["model", "backend", "target x dense",
                                  "ms (in the search)", "fresh run: pruned / dense",
                                  "fresh pruned/dense", "error", "s"], tablefmt="github"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,mobilenet_v3_large,vit_b_16")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--max-ratio", type=float, default=0.9)
    ap.add_argument("--backends", default="eager,onnxruntime")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--latency-weights", type=lambda v: [float(w) for w in v.split(",") if w],
                    default=[2.0, 4.0], help="latency plans with Importance(latency_weight=w)")
    ap.add_argument("--round-to", type=lambda v: [int(m) for m in v.split(",") if m],
                    default=[], help="also plans rounded to these fixed multiples, e.g. 16,32")
    ap.add_argument("--targets", default=None, help="mode 2: fractions of the dense latency")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (targets if args.targets else equal_macs)(args)


if __name__ == "__main__":
    main()
