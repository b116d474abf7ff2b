"""Command line: ``fxprune inspect MODEL`` and ``fxprune prune MODEL --ratio R``.

    fxprune inspect torchvision:resnet50 --input-shape 1,3,224,224
    fxprune prune torchvision:resnet50 --ratio 0.5 --out resnet50_pruned.pt2

``MODEL`` is ``torchvision:NAME`` (``torchvision.models.get_model(NAME)``, random init:
nothing is downloaded) or ``module.path:factory`` (a callable returning a model, or a
``(model, example_inputs)`` pair). Errors fxprune raises on purpose print one line and
exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fxprune.errors import FxpruneError

__all__ = ["main", "load_model", "parse_shape", "count_macs", "ModelSpecError"]

EXIT_ERROR = 2
DEFAULT_SHAPE = (1, 3, 224, 224)


class ModelSpecError(FxpruneError):
    """A ``MODEL`` argument could not be turned into a model (bad spec, import, factory)."""


# ----------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    spec: str
    model: torch.nn.Module
    example_inputs: tuple | None  # from a factory returning (model, inputs)


def load_model(spec: str) -> LoadedModel:
    """``torchvision:NAME`` or ``module.path:factory`` -> a model in eval mode."""
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise ModelSpecError(f"model spec {spec!r} must be 'torchvision:NAME' or "
                             "'module.path:factory'")
    if source == "torchvision":
        built: Any = _torchvision_model(name)
    else:
        built = _call_factory(source, name)
    model, inputs = built, None
    if isinstance(built, tuple) and len(built) == 2:
        model, inputs = built[0], _as_inputs(built[1])
    if not isinstance(model, torch.nn.Module):
        raise ModelSpecError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return LoadedModel(spec, model.eval(), inputs)


def _torchvision_model(name: str) -> torch.nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise ModelSpecError("torchvision is not installed: pip install torchvision") from exc
    try:
        return torchvision.models.get_model(name, weights=None)
    except (ValueError, KeyError) as exc:
        raise ModelSpecError(f"torchvision has no model {name!r} (see "
                             "torchvision.models.list_models())") from exc


def _call_factory(module_path: str, attr: str) -> Any:
    try:
        obj: Any = importlib.import_module(module_path)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {module_path!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"{module_path!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        return obj
    if not callable(obj):
        raise ModelSpecError(f"{module_path}:{attr} is neither a callable nor an nn.Module")
    try:
        return obj()
    except Exception as exc:  # the user's factory: report, don't trace back into it
        raise ModelSpecError(f"{module_path}:{attr}() failed: "
                             f"{type(exc).__name__}: {exc}") from exc


def _as_inputs(value: Any) -> tuple:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected e.g. 1,3,224,224")
    return shape


def _inputs(loaded: LoadedModel, shapes: Sequence[tuple[int, ...]] | None) -> tuple:
    if shapes:
        return tuple(torch.randn(s) for s in shapes)
    if loaded.example_inputs is not None:
        return loaded.example_inputs
    return (torch.randn(DEFAULT_SHAPE),)


# ----------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------
def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, inputs: tuple) -> int:
    """Multiply-accumulates of one forward pass (``FlopCounterMode`` counts 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() // 2


def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


# ----------------------------------------------------------------------------------
# Progress: tqdm when it is installed (not a dependency), else one line on stderr
# ----------------------------------------------------------------------------------
class _LineProgress:
    """A minimal stand-in for ``tqdm``: ``prune: compile [2/6] (1.2s)``, in place on a tty."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self.start = total, desc, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def set_description_str(self, text: str) -> None:
        elapsed = time.perf_counter() - self.start
        line = f"{text} [{self.n}/{self.total}] ({elapsed:.1f}s)"
        sys.stderr.write(("\r\x1b[K" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"{self.desc}: done in {elapsed:.1f}s\n")
        sys.stderr.flush()


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(total, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=True,
                bar_format="{desc} {n_fmt}/{total_fmt} |{bar:20}| {elapsed}")


class _Stages:
    """Runs named stages under one progress bar, recording each stage's seconds."""

    def __init__(self, names: Sequence[str], desc: str) -> None:
        self.bar, self.desc = _progress(len(names), desc), desc
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.bar.set_description_str(f"{self.desc}: {name}")
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[name] = time.perf_counter() - start
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------
def _analysis_summary(analysis: Any) -> str:
    groups = analysis.groups
    units = sum(g.size for g in groups)
    inexact = sum(1 for g in groups if not g.exact)
    nodes = len(analysis.gm.graph.nodes)
    return (f"{len(groups)} coupled groups, {units:,} prunable units, {inexact} inexact "
            f"(channel mixers); {nodes} graph nodes")


def _pins_summary(analysis: Any) -> str:
    pins = analysis.pins()
    whole = sum(1 for p in pins if p.whole)
    return (f"{whole} parameter dims left whole, {len(pins) - whole} partly pinned: "
            "see fxprune inspect --pins")


def _group_rows(analysis: Any, plan: Any, limit: int | None) -> str:
    from tabulate import tabulate

    rows = []
    for g in analysis.groups:
        kept = len(plan.keep[g.name]) if plan is not None and g.name in plan.keep else g.size
        shown = ", ".join(f"{m.fqn}[{m.dim}]:{m.role}" for m in g.members[:3])
        more = len(g.members) - 3
        row = [g.id, g.name, g.size, g.granularity,
               "yes" if g.exact else f"no ({g.inexact_kind or 'mixer'})",
               len(g.members), shown + (f" +{more}" if more > 0 else ""), len(g.merged_by)]
        if plan is not None:
            row.insert(3, kept)
        rows.append(row)
    head = ["id", "group", "units", "gran", "exact", "#slices", "slices", "#merges"]
    if plan is not None:
        head.insert(3, "kept")
    hidden = 0
    if limit is not None and len(rows) > limit:
        hidden, rows = len(rows) - limit, rows[:limit]
    text = tabulate(rows, headers=head)
    if hidden:
        text += f"\n... {hidden} more groups (--all shows every group)"
    return text


def cmd_inspect(args: argparse.Namespace) -> int:
    import fxprune

    loaded = load_model(args.model)
    inputs = _inputs(loaded, args.input_shape)
    start = time.perf_counter()
    analysis = fxprune.analyze(loaded.model, inputs)
    seconds = time.perf_counter() - start
    if args.why is not None or args.dot is not None:
        group = _find_group(analysis, args.why if args.why is not None else args.dot)
        print(group.why() if args.why is not None else group.to_dot())
        return 0
    if args.pins:
        print(f"{args.model}: {_pins_summary(analysis)}")
        print(analysis.pins_table())
        return 0
    print(f"{args.model}: {_analysis_summary(analysis)}; analysed in {seconds:.2f}s")
    print(_group_rows(analysis, None, None if args.all else args.limit))
    return 0


def _find_group(analysis: Any, key: str) -> Any:
    try:
        return analysis.group(int(key) if key.isdigit() else key)
    except KeyError as exc:
        raise FxpruneError(f"no group {key!r}: use an id or a name from "
                           "'fxprune inspect'") from exc


def cmd_prune(args: argparse.Namespace) -> int:
    import fxprune

    loaded = load_model(args.model)
    model = loaded.model
    inputs = _inputs(loaded, args.input_shape)
    names = ["analyze", "plan", "compile"] + ([] if args.no_verify else ["verify"]) + \
        ["count MACs"] + (["export"] if args.out else [])
    stages = _Stages(names, f"fxprune prune {args.model}")
    try:
        analysis = stages.run("analyze", lambda: fxprune.analyze(model, inputs))
        plan = stages.run("plan", lambda: fxprune.Plan.from_ratio(
            analysis, args.ratio, criterion=args.criterion, round_to=args.round_to,
            include_softmax=args.include_softmax))
        small = stages.run("compile", lambda: fxprune.compile(
            model, plan, attention_scale=args.attention_scale)).eval()
        report = None
        if not args.no_verify:
            report = stages.run("verify", lambda: fxprune.verify(
                model, small, plan, inputs, raise_on_failure=False))
        macs = stages.run("count MACs", lambda: (count_macs(model, inputs),
                                                 count_macs(small, inputs)))
        if args.out and (report is None or report.ok):
            stages.run("export", lambda: _save_export(small, inputs, args.out))
    finally:
        stages.close()
    if args.plan_out:
        with open(args.plan_out, "w") as f:
            f.write(plan.to_json())

    removed = plan.removed()
    units = sum(g.size for g in analysis.groups)
    print(f"{args.model}: {_analysis_summary(analysis)}")
    print(_group_rows(analysis, plan, None if args.all else args.limit))
    print(_pins_summary(analysis))
    print(f"\npruned {len(removed)}/{len(analysis.groups)} groups at ratio {args.ratio} "
          f"({args.criterion}): units {units:,} -> {units - sum(removed.values()):,}")
    p0, p1 = count_params(model), count_params(small)
    print(f"params {p0:,} -> {p1:,} ({p1 / p0:.3f}x, {p0 / max(p1, 1):.2f}x smaller)")
    print(f"MACs   {_human(macs[0])} -> {_human(macs[1])} ({macs[1] / macs[0]:.3f}x, "
          f"{macs[0] / max(macs[1], 1):.2f}x fewer)")
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in stages.seconds.items())
    print(f"time: {timing}")
    if report is not None:
        exact = sum(1 for g in report.groups if g.removed and g.check == "exact")
        shape = sum(1 for g in report.groups if g.removed and g.check == "shape")
        print(f"verify: slice == mask {'OK' if report.ok else 'FAILED'}: output max |err| "
              f"{report.max_abs_error:.3g} (tol {report.tolerance:.3g}), "
              f"{report.nodes_checked} activations checked, worst relative err "
              f"{report.max_node_rel_error:.3g}; {exact} groups checked exactly, "
              f"{shape} inexact groups by shape")
    else:
        print("verify: skipped (--no-verify)")
    if args.plan_out:
        print(f"plan written to {args.plan_out}")
    if report is not None and not report.ok:
        print("fxprune: verification failed (nothing saved): this is an fxprune bug, "
              "please report it",
              file=sys.stderr)
        return 1
    if args.out:
        print(f"saved {args.out} (torch.export; load with torch.export.load(path).module())")
    return 0


def _save_export(model: torch.nn.Module, inputs: tuple, path: str) -> None:
    """``torch.export`` of the pruned module: loads without fxprune or the model's classes.

    The batch dim is exported dynamic when the model allows it (traced at batch 2: torch
    specialises a size of 1), else the program is static at the example shapes.
    """
    with torch.no_grad():
        try:
            doubled = tuple(torch.cat([x, x]) if x.dim() else x for x in inputs)
            dims = tuple({0: torch.export.Dim.AUTO} if x.dim() else None for x in inputs)
            program = torch.export.export(model, doubled, dynamic_shapes=dims)
        except Exception:  # not batch-polymorphic: a static program still runs everywhere
            program = torch.export.export(model, inputs)
    torch.export.save(program, path)


# ----------------------------------------------------------------------------------
def _data_free_criteria() -> list[str]:
    """Criterion names from the one registry that need no data (the CLI has none)."""
    from fxprune.importance import CRITERIA

    return [name for name, spec in CRITERIA.items() if not spec.needs_data]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxprune", description="Structured pruning of PyTorch models as torch.fx passes.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="torchvision:NAME or module.path:factory")
        p.add_argument("--input-shape", type=parse_shape, action="append", metavar="SHAPE",
                       help="example input shape, e.g. 1,3,224,224 (repeat for several "
                            "inputs; default 1,3,224,224 or the factory's own inputs)")
        p.add_argument("--all", action="store_true", help="print every group")
        p.add_argument("--limit", type=int, default=40,
                       help="groups shown without --all (default 40)")
        p.add_argument("--seed", type=int, default=0, help="seed for random init and inputs")

    ins = sub.add_parser("inspect", help="print the coupled-group table")
    common(ins)
    ins.add_argument("--why", metavar="GROUP", help="explain one group (id or name)")
    ins.add_argument("--dot", metavar="GROUP", help="print one group as Graphviz DOT")
    ins.add_argument("--pins", action="store_true",
                     help="list the parameter dims left whole: reason, node, source line")
    ins.set_defaults(func=cmd_inspect)

    pr = sub.add_parser("prune", help="analyse, plan, compile, verify and save")
    common(pr)
    pr.add_argument("--ratio", type=float, required=True,
                    help="fraction of every group's units to remove, in [0, 1)")
    pr.add_argument("--criterion", default="l1", choices=_data_free_criteria(),
                    help="importance criterion (the registry's data-free ones)")
    pr.add_argument("--include-softmax", action="store_true",
                    help="also prune groups whose units a softmax normalises")
    pr.add_argument("--round-to", type=int, default=1, help="kept counts are multiples of it")
    pr.add_argument("--out", help="save the pruned model here (torch.export .pt2)")
    pr.add_argument("--plan-out", help="write the plan as JSON here")
    pr.add_argument("--no-verify", action="store_true", help="skip slice == mask")
    pr.add_argument("--attention-scale", choices=["original", "recompute"],
                    default="original", help="softmax scale when head_dim is pruned: "
                    "1/sqrt(original head_dim) (default) or of the kept one")
    pr.set_defaults(func=cmd_prune)

    from fxprune.cli_bench import add_bench_parser
    add_bench_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
        return int(exc.code or 0)
    torch.manual_seed(args.seed)
    try:
        return args.func(args)
    except FxpruneError as exc:
        message = " ".join(str(exc).split())
        print(f"fxprune: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fxprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
