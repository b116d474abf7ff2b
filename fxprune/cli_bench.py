"""``fxprune bench MODEL --ratio R``: latency before/after pruning per backend.

A separate subcommand (registered by ``fxprune.cli.build_parser``): prunes as
``fxprune prune`` does (optionally folding BatchNorm), then measures original and pruned
interleaved (``fxprune.bench``) at batch 1 and a throughput batch on each backend, and
prints median / IQR, speedup and speedup / MAC reduction.
"""
from __future__ import annotations

import argparse

import torch

__all__ = ["add_bench_parser", "cmd_bench"]


def cmd_bench(args: argparse.Namespace) -> int:
    import fxprune
    defaults(args)
    from fxprune.bench import bench_pruning, rows_table
    from fxprune.cli import _inputs, count_macs, load_model

    loaded = load_model(args.model)
    model = loaded.model.eval()
    inputs = _inputs(loaded, args.input_shape)
    analysis = fxprune.analyze(model, inputs)
    plan = fxprune.Plan.from_ratio(analysis, args.ratio, criterion=args.criterion,
                                   round_to=args.round_to)
    small = fxprune.compile(model, plan, fold_bn=args.fold_bn).eval()
    reference = fxprune.compile(model, fxprune.Plan.from_ratio(analysis, 0.0),
                                fold_bn=True).eval() if args.fold_bn else model
    mac_reduction = count_macs(model, inputs) / max(count_macs(small, inputs), 1)

    def make_input(batch: int) -> tuple:
        return tuple(torch.randn(batch, *x.shape[1:]) if x.is_floating_point() else
                     x.expand(batch, *x.shape[1:]).contiguous() for x in inputs)

    rows = bench_pruning(reference, small, make_input, mac_reduction=mac_reduction,
                         batches=args.batch, backends=args.backend, repeats=args.repeats)
    print(f"{args.model} at ratio {args.ratio} ({args.criterion}"
          f"{', BatchNorm folded in both' if args.fold_bn else ''}); "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats")
    print(rows_table(rows))
    return 0


def add_bench_parser(sub: argparse._SubParsersAction, common) -> None:
    """Register ``bench`` on the CLI's subparsers; ``common`` adds MODEL/--input-shape."""
    from fxprune.bench import BACKENDS

    p = sub.add_parser("bench", help="latency before/after pruning (eager, compile, onnxruntime)")
    common(p)
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of units to remove")
    p.add_argument("--criterion", default="l1")
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--backend", action="append", choices=BACKENDS,
                   help="repeat for several (default: eager)")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm in both models")
    p.set_defaults(func=cmd_bench)


def defaults(args: argparse.Namespace) -> None:
    args.backend = args.backend or ["eager"]
    args.batch = args.batch or [1, 8]
