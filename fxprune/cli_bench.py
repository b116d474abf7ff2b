"""``fxprune bench MODEL --ratio R``: latency before/after pruning per backend.

A separate subcommand (registered by ``fxprune.cli.build_parser``): prunes as
``fxprune prune`` does (optionally folding BatchNorm), then measures original and pruned
interleaved (``fxprune.bench``) at batch 1 and a throughput batch on each backend, and
prints median / IQR, speedup and speedup / MAC reduction.
"""
from __future__ import annotations

import argparse

__all__ = ["add_bench_arguments", "cmd_bench", "BENCH_BACKENDS"]

# fxprune.bench.BACKENDS, spelt here so that `fxprune --help` imports no torch
# (tests/fxprune/test_bench.py holds the two equal)
BENCH_BACKENDS = ("eager", "compile", "onnxruntime")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    import fxprune
    defaults(args)
    from fxprune.bench import bench_pruning, rows_table
    from fxprune.cli import count_macs, load_model
    from fxprune.specs import make_inputs

    loaded = load_model(args.model)
    model = loaded.model.eval()
    inputs = make_inputs(loaded, args.input_shape, args.dtype, args.input)
    analysis = fxprune.analyze(model, inputs, frontend=args.frontend if args.frontend != "auto"
                               else loaded.frontend, split_policy=args.split_policy)
    if args.round_to == "auto":  # measured on the first backend benched
        from fxprune.bench import measure_rounding

        first = (args.backend or ["eager"])[0]
        rounding = measure_rounding("eager" if first == "compile" else first)
        plan = fxprune.plan(analysis, args.criterion, ratio=args.ratio, round_to="auto",
                            rounding=rounding)
    else:
        plan = fxprune.Plan.from_ratio(analysis, args.ratio, criterion=args.criterion,
                                       round_to=args.round_to)
    small = fxprune.compile(model, plan, fold_bn=args.fold_bn).eval()
    reference = fxprune.compile(model, fxprune.Plan.from_ratio(analysis, 0.0),
                                fold_bn=True).eval() if args.fold_bn else model
    mac_reduction = count_macs(model, inputs) / max(count_macs(small, inputs), 1)
    layout = args.memory_format
    if layout == "auto":  # measured on the pruned model, first backend, batch 1
        from fxprune.bench import faster_memory_format

        layout, got = faster_memory_format(small, inputs, backend=args.backend[0],
                                           repeats=args.repeats)
        print(f"memory format: {layout} (pruned model on {args.backend[0]}: contiguous "
              f"{got['contiguous']}, channels-last {got['channels_last']})")
    if layout == "channels_last":  # both models, so the speedup compares like with like
        from passes.memory_format import check_memory_format, to_channels_last

        converted = to_channels_last(small)
        check_memory_format(small, converted, inputs)  # typed, naming the line
        reference, small = to_channels_last(reference), converted

    def make_input(batch: int) -> tuple:
        return tuple(torch.randn(batch, *x.shape[1:]) if x.is_floating_point() else
                     x.expand(batch, *x.shape[1:]).contiguous() for x in inputs)

    rows = bench_pruning(reference, small, make_input, mac_reduction=mac_reduction,
                         batches=args.batch, backends=args.backend, repeats=args.repeats)
    print(f"{args.model} at ratio {args.ratio} ({args.criterion}"
          f"{', BatchNorm folded in both' if args.fold_bn else ''}"
          f"{', conv weights channels-last in both' if layout == 'channels_last' else ''}); "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats")
    print(rows_table(rows))
    return 0


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """``bench``'s own options (the CLI's ``COMMANDS`` table adds MODEL, inputs...)."""
    BACKENDS = BENCH_BACKENDS

    p.add_argument("--ratio", type=float, default=0.5, help="fraction of units to remove")
    p.add_argument("--criterion", default="l1")
    from fxprune.cli import _positive_int, _round_to

    p.add_argument("--round-to", type=_round_to, default=1, metavar="N|auto",
                   help="kept counts are multiples of N, or of what each op kind runs "
                   "fastest on the (first) backend, measured")
    p.add_argument("--backend", action="append", choices=BACKENDS,
                   help="repeat for several (default: eager)")
    p.add_argument("--batch", type=_positive_int, action="append",
                   help="batch sizes (default 1 and 8)")
    p.add_argument("--repeats", type=_positive_int, default=10)
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm in both models")
    p.add_argument("--memory-format", choices=["contiguous", "channels_last", "auto"],
                   default="contiguous", help="conv weight layout of both models; auto: "
                   "the faster one for the pruned model, measured first")


def defaults(args: argparse.Namespace) -> None:
    args.backend = args.backend or ["eager"]
    args.batch = args.batch or [1, 8]
