"""Command line: ``fxprune inspect MODEL`` and ``fxprune prune MODEL --ratio R``.

    fxprune inspect torchvision:resnet50 --input-shape 1,3,224,224
    fxprune prune timm:resnet18 --target-macs 0.5 --global --out small.pt2 --onnx small.onnx
    fxprune prune hf:llama --ratio 0.25 --split-policy heads
    fxprune prune hf:bert --target-macs 0.7 --global --uniform \
        --input input_ids=1x16:int64 --input attention_mask=1x16:int64

``MODEL`` specs are in ``fxprune.specs`` (torchvision:, timm:, hf:, module.path:factory).
torch loads only once a command runs, so ``fxprune --help`` answers at once. Errors fxprune
raises on purpose print one line with the remedy and exit with status 2 (``--verbose``
adds the traceback); bad options are rejected before any work (also status 2).
Subcommands are ``(name, add_arguments, run)`` entries of ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from fxprune.core.errors import FxpruneError
from fxprune.specs import (DTYPES, InputSpecError, LoadedModel, ModelSpecError, load_model,
                           make_inputs, parse_input)

__all__ = ["main", "load_model", "parse_shape", "count_macs", "ModelSpecError", "COMMANDS"]

EXIT_ERROR = 2
TABLE_WIDTH = 80


def _input_spec(text: str) -> Any:
    try:
        return parse_input(text)
    except InputSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(s) for s in re.split(r"[,x]", text.strip()))  # no empty parts
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected e.g. 1,3,224,224")
    return shape


# ----------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------
def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, inputs: tuple) -> int:
    """Multiply-accumulates of one forward pass (``FlopCounterMode`` counts 2 per MAC)."""
    import torch
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


class _Silent:
    """``--quiet``: no progress output."""

    def set_description_str(self, text: str) -> None: ...

    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(total, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=True,
                bar_format="{desc} {n_fmt}/{total_fmt} |{bar:20}| {elapsed}")


class _Stages:
    """Runs named stages under one progress bar, recording each stage's seconds."""

    def __init__(self, names: Sequence[str], desc: str, *, quiet: bool = False) -> None:
        self.bar, self.desc = (_Silent() if quiet else _progress(len(names), desc)), desc
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


def _count_ties_summary(plan: Any) -> str:
    """What count ties did to the plan (``plan.meta["count_ties"]``): the leaders whose
    count others follow, the groups held whole and why; '' without count ties."""
    ties = plan.meta.get("count_ties")
    if ties is None:
        return ""
    if ties == "off":
        return ("count ties (a width read off another layer's): off (--no-split-ties): "
                "--output module refuses plans that break them")
    whole = plan.meta.get("count_ties_whole") or {}
    lines = [f"count ties (a width read off another layer's, e.g. C // num_heads): leaders "
             f"followed: {len(ties)}, groups held whole: {len(whole)} "
             "(plan.meta['count_ties'], ['count_ties_whole'])"]
    lines += [f"  held whole: {name}: {why}" for name, why in list(whole.items())[:8]]
    if len(whole) > 8:
        lines.append(f"  ... {len(whole) - 8} more")
    return "\n".join(lines)


def _ties_summary(plan: Any) -> str:
    """What equal chunk / split pieces did to the plan (``plan.meta["split_ties"]``): the
    groups balanced in atoms, those held whole (kept in full: the table alone does not
    say why), pieces left untied; '' when the graph has no such ties."""
    ties = plan.meta.get("split_ties")
    if ties is None:
        return ""
    if ties == "off":
        return ("equal pieces (chunk / split): ties off (--no-split-ties): pieces may keep "
                "unequal counts; --output module refuses such plans")
    whole = plan.meta.get("split_ties_whole") or {}
    lines = [f"equal pieces (chunk / split): the same count kept in every piece; groups "
             f"balanced: {len(ties)}, held whole: {len(whole)} (plan.meta['split_ties'], "
             "['split_ties_whole'])"]
    lines += [f"  held whole: {name}: {why}" for name, why in whole.items()]
    untied = plan.meta.get("split_ties_untied") or {}
    if untied:
        lines.append(f"  untied (pieces of several groups): {len(untied)}, see "
                     "plan.meta['split_ties_untied']")
    return "\n".join(lines)


def _group_rows(analysis: Any, plan: Any, limit: int | None, wide: bool = False) -> str:
    """The group table; without ``wide`` it fits ``TABLE_WIDTH`` columns (the slices
    column dropped, long group names shortened in the middle)."""
    from tabulate import tabulate

    rows = []
    for g in analysis.groups:
        kept = len(plan.keep[g.name]) if plan is not None and g.name in plan.keep else g.size
        shown = ", ".join(f"{m.fqn}[{m.dim}]:{m.role}" for m in g.members[:3])
        more = len(g.members) - 3
        name = g.name if wide or len(g.name) <= 30 else g.name[:12] + "..." + g.name[-15:]
        exact = "yes" if g.exact else f"no ({g.inexact_kind or 'mixer'})"
        row = [g.id, name, g.size, g.granularity, exact if wide else exact[:14],
               len(g.members)] + ([shown + (f" +{more}" if more > 0 else "")] if wide else []) \
            + [len(g.merged_by)]
        if plan is not None:
            row.insert(3, kept)
        rows.append(row)
    head = ["id", "group", "units", "gran", "exact", "#slices"] + (["slices"] if wide else []) \
        + ["#merges"]
    if plan is not None:
        head.insert(3, "kept")
    hidden = 0
    if limit is not None and len(rows) > limit:
        hidden, rows = len(rows) - limit, rows[:limit]
    text = tabulate(rows, headers=head)
    if hidden:
        text += f"\n... {hidden} more groups (--all shows every group)"
    if not wide:
        text += "\n(--wide adds the slices column)"
    return text


def _load(args: argparse.Namespace) -> tuple[LoadedModel, tuple]:
    loaded = load_model(args.model)
    return loaded, make_inputs(loaded, args.input_shape, args.dtype, args.input)


def _analyze(args: argparse.Namespace, loaded: LoadedModel, inputs: tuple) -> Any:
    import fxprune

    frontend = args.frontend if args.frontend != "auto" else loaded.frontend
    return fxprune.analyze(loaded.model, inputs, frontend=frontend,
                           split_policy=args.split_policy)


def cmd_inspect(args: argparse.Namespace) -> int:
    loaded, inputs = _load(args)
    start = time.perf_counter()
    analysis = _analyze(args, loaded, inputs)
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
    print(_group_rows(analysis, None, None if args.all else args.limit, args.wide))
    from fxprune.core.report import ties_footer

    if ties_footer(analysis):
        print(ties_footer(analysis))
    return 0


def _find_group(analysis: Any, key: str) -> Any:
    try:
        return analysis.group(int(key) if key.isdigit() else key)
    except KeyError as exc:
        raise FxpruneError(f"no group {key!r}: use an id or a name from "
                           "'fxprune inspect'") from exc


def _make_plan(args: argparse.Namespace, analysis: Any) -> Any:
    """``--plan FILE`` (checked against this graph), else the planner with one budget."""
    import fxprune

    if args.plan:
        with open(args.plan) as f:
            plan = fxprune.Plan.from_json(f.read())
        if plan.fingerprint != analysis.fingerprint:
            raise FxpruneError(f"{args.plan} was made on another graph (fingerprint "
                               f"{plan.fingerprint[:12]} != {analysis.fingerprint[:12]}): "
                               "re-plan with the same model, inputs and --split-policy")
        return plan
    if args.ratio is not None and not args.global_ and not args.target_latency and \
            not args.uniform and args.round_to != "auto":
        return fxprune.Plan.from_ratio(analysis, args.ratio, criterion=args.criterion,
                                       round_to=args.round_to, ignore=args.ignore,
                                       include_softmax=args.include_softmax,
                                       split_ties=not args.no_split_ties)
    return fxprune.plan(analysis, args.criterion, ratio=args.ratio,
                        target_macs=args.target_macs, target_params=args.target_params,
                        target_latency=args.target_latency,
                        scope="global" if args.global_ else "local",
                        round_to=args.round_to, ignore=args.ignore,
                        include_softmax=args.include_softmax, uniform=args.uniform,
                        split_ties=not args.no_split_ties)


def _budget(args: argparse.Namespace) -> str:
    if args.plan:
        return f"plan {args.plan}"
    for name in ("ratio", "target_macs", "target_params", "target_latency"):
        if getattr(args, name) is not None:
            scope = (", global" if args.global_ else "") + (", uniform" if args.uniform else "")
            return f"{name.replace('_', ' ')} {getattr(args, name)} ({args.criterion}{scope})"
    return ""


def cmd_prune(args: argparse.Namespace) -> int:
    import fxprune
    from fxprune.deploy import export_onnx, save

    loaded, inputs = _load(args)
    model = loaded.model
    if args.save_pretrained:
        if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
            raise FxpruneError(f"--save-pretrained needs a Hugging Face model (hf:ARCH or "
                               f"hf:DIR); {args.model} is a {type(model).__name__}: use --out")
    names = ["analyze", "plan", "compile"] + \
        ([] if args.no_verify or args.output == "module" else ["verify"]) + \
        ["count MACs"] + (["save"] if args.out else []) + (["onnx"] if args.onnx else []) + \
        (["save_pretrained"] if args.save_pretrained else [])
    stages = _Stages(names, f"fxprune prune {args.model}", quiet=args.quiet)
    try:
        analysis = stages.run("analyze", lambda: _analyze(args, loaded, inputs))
        plan = stages.run("plan", lambda: _make_plan(args, analysis))
        if args.plan and args.output == "module":  # the model's own class: bind the
            plan = fxprune.Plan.from_indices(analysis, plan.keep)  # plan to this analysis
        # a JSON plan carries no analysis: compile the analysis (graph output)
        source = analysis if args.plan and args.output == "graph" else model
        small = stages.run("compile", lambda: fxprune.compile(
            source, plan, attention_scale=args.attention_scale,
            output=args.output, memory_format=args.memory_format)).eval()
        report = None
        if not args.no_verify and args.output == "graph":
            report = stages.run("verify", lambda: fxprune.verify(
                source, small, plan, inputs, raise_on_failure=False))
        macs = stages.run("count MACs", lambda: (count_macs(model, inputs),
                                                 count_macs(small, inputs)))
        ok = report is None or report.ok
        if args.out and ok:
            pickled = args.out.endswith((".pt", ".pth"))
            stages.run("save", lambda: save(small, args.out,
                                            example_inputs=None if pickled else inputs))
        if args.onnx and ok:
            stages.run("onnx", lambda: export_onnx(small, inputs, args.onnx))
        if args.save_pretrained:  # a non-uniform plan raises NonUniformPlanError, unwritten
            stages.run("save_pretrained", lambda: small.save_pretrained(args.save_pretrained))
    finally:
        stages.close()
    if args.plan_out:
        with open(args.plan_out, "w") as f:
            f.write(plan.to_json())

    removed = plan.removed()
    units = sum(g.size for g in analysis.groups)
    if not args.quiet:
        print(f"{args.model}: {_analysis_summary(analysis)}")
        print(_group_rows(analysis, plan, None if args.all else args.limit, args.wide))
        print(_pins_summary(analysis))
        if _ties_summary(plan):
            print(_ties_summary(plan))
        if _count_ties_summary(plan):
            print(_count_ties_summary(plan))
        print()
    print(f"pruned {len(removed)}/{len(analysis.groups)} groups at {_budget(args)}: "
          f"units {units:,} -> {units - sum(removed.values()):,}")
    p0, p1 = count_params(model), count_params(small)
    print(f"params {p0:,} -> {p1:,} ({p1 / p0:.3f}x, {p0 / max(p1, 1):.2f}x smaller)")
    print(f"MACs   {_human(macs[0])} -> {_human(macs[1])} ({macs[1] / macs[0]:.3f}x, "
          f"{macs[0] / max(macs[1], 1):.2f}x fewer)")
    if not args.quiet:
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
    elif args.output == "module":
        print(f"output: the model's own class {type(small).__name__}, proven equal to the "
              "pruned GraphModule in float64 by compile (slice == mask is proven there on "
              "the GraphModule)")
    else:
        print("verify: skipped (--no-verify)")
    if args.plan_out:
        print(f"plan written to {args.plan_out}")
    if report is not None and not report.ok:
        print(f"fxprune: verification failed (nothing saved): {report.failure}",
              file=sys.stderr)
        return 1
    if args.out:
        how = ("torch.load(path, weights_only=False)" if args.out.endswith((".pt", ".pth"))
               else "torch.export; load with torch.export.load(path).module()")
        print(f"saved {args.out} ({how})")
    if args.onnx:
        print(f"saved {args.onnx} (ONNX; onnxruntime.InferenceSession(path))")
    if args.save_pretrained:
        print(f"saved {args.save_pretrained} ({type(small).__name__}.from_pretrained(dir) "
              f"or AutoModel*.from_pretrained(dir); fxprune not needed)")
    return 0


# ----------------------------------------------------------------------------------
def _number(text: str, cast: Any, ok: Any, wanted: str) -> Any:
    """``cast(text)`` when ``ok`` of it, else argparse's typed refusal naming ``wanted``
    (argparse exits 2 before any work)."""
    try:
        value = cast(text)
    except ValueError:
        value = None
    if value is None or not ok(value):  # nan fails every comparison: refused too
        raise argparse.ArgumentTypeError(f"{wanted}, got {text}")
    return value


def _ratio(text: str) -> float:
    return _number(text, float, lambda v: 0.0 <= v < 1.0, "ratio must lie in [0, 1)")


def _fraction(text: str) -> float:
    return _number(text, float, lambda v: 0.0 < v <= 1.0, "target must be a fraction in (0, 1]")


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "must be an integer >= 1")


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    return _number(text, int, lambda v: v >= 1, "--round-to takes an integer >= 1 or auto")


def _new_dir(text: str) -> str:
    """A directory ``save_pretrained`` may write: absent (its parent writable) or empty."""
    path = os.path.abspath(text)
    parent = os.path.dirname(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise argparse.ArgumentTypeError(f"cannot save into {text!r}: it exists and is "
                                         "not an empty directory")
    if not os.path.isdir(parent) or not _can_create_in(parent):
        raise argparse.ArgumentTypeError(f"cannot save into {text!r}: its parent is not "
                                         "an existing, writable directory")
    return text


def _writable(text: str) -> str:
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text) or not os.path.isdir(folder) or not _can_create_in(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: choose a file in an "
                                         "existing, writable directory")
    return text


def _can_create_in(folder: str) -> bool:
    """Whether a file can be created in ``folder`` (tried, then removed: ``os.access``
    says yes for root on read-only mounts such as /proc)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fxprune-probe-"):
            return True
    except OSError:
        return False


def _model_out(text: str) -> str:
    if not text.endswith((".pt2", ".pt", ".pth")):
        raise argparse.ArgumentTypeError(f"cannot save {text!r}: name it .pt2 (torch.export "
                                         "program) or .pt/.pth (pickle)")
    return _writable(text)


def _onnx_out(text: str) -> str:
    if not text.endswith(".onnx"):
        raise argparse.ArgumentTypeError(f"cannot save {text!r} as ONNX: name it .onnx")
    return _writable(text)


def _readable(text: str) -> str:
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: no such file (write one "
                                         "with --plan-out)")
    return text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="torchvision:NAME, timm:NAME, hf:ARCH (small random init: "
                   "bert, roberta, gpt2, llama, mistral, qwen2), hf:DIR (saved model) or "
                   "module.path:factory")
    p.add_argument("--input-shape", type=parse_shape, action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1,3,224,224 (repeat for several inputs; "
                        "default 1,3,224,224, 1,16 tokens for hf:, or the factory's inputs)")
    p.add_argument("--input", type=_input_spec, action="append", metavar="[NAME=]SHAPE[:DTYPE]",
                   help="an example input, e.g. 1x3x224x224, input_ids=1x16:int64 (a keyword "
                   "input of forward; repeat; positional ones first; integer masks are ones)")
    p.add_argument("--dtype", choices=DTYPES, help="input dtype (integer ones draw token ids "
                   "below the vocabulary; default float32, int64 for hf:)")
    p.add_argument("--frontend", choices=["auto", "fx", "export", "record"], default="auto",
                   help="capture: torch.fx tracing, torch.export, record (one path of "
                   "data-dependent control flow, on the example inputs; prune needs "
                   "--output module), or auto (default)")
    p.add_argument("--split-policy", choices=["head_dim", "heads", "inner", "outer"],
                   default="head_dim", help="attention units: one index of every head "
                   "(head_dim, default) or whole heads (heads)")
    p.add_argument("--all", action="store_true", help="print every group")
    p.add_argument("--wide", action="store_true", help="all table columns (wider than 80)")
    p.add_argument("--limit", type=int, default=40, help="groups shown without --all")
    p.add_argument("--seed", type=int, default=0, help="seed for random init and inputs")
    # also accepted after the subcommand (SUPPRESS: the top-level value is kept otherwise)
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="tracebacks on errors")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress, short output")


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("--why", metavar="GROUP", help="explain one group (id or name)")
    p.add_argument("--dot", metavar="GROUP", help="print one group as Graphviz DOT")
    p.add_argument("--pins", action="store_true",
                   help="list the parameter dims left whole: reason, node, source line")


def _add_prune(p: argparse.ArgumentParser) -> None:
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=_ratio, help="fraction of units to remove, [0, 1)")
    budget.add_argument("--target-macs", type=_fraction, metavar="F",
                        help="keep this fraction of the MACs")
    budget.add_argument("--target-params", type=_fraction, metavar="F",
                        help="keep this fraction of the parameters")
    budget.add_argument("--target-latency", type=_fraction, metavar="F",
                        help="keep this fraction of the measured latency")
    budget.add_argument("--plan", metavar="PLAN.json", type=_readable,
                        help="apply a saved plan (--plan-out)")
    p.add_argument("--output", choices=["graph", "module"], default=None,
                   help="graph: a new GraphModule (default); module: a copy of the model's "
                   "own class with sliced weights and attributes, proven equal to it")
    p.add_argument("--memory-format", choices=["contiguous", "channels_last"], default=None,
                   help="channels_last: conv weights NHWC (often faster on CPU; measure it "
                   "with `fxprune bench --memory-format auto`)")
    p.add_argument("--global", dest="global_", action="store_true",
                   help="rank units across groups (default: the same ratio in each group)")
    p.add_argument("--uniform", action="store_true",
                   help="every layer's group of a kind keeps the same count, so one config "
                        "describes the result (Hugging Face save_pretrained)")
    p.add_argument("--criterion", default="l1", help="importance criterion from "
                   "fxprune.CRITERIA (l1, l2, random, fpgm, lamp...); data-driven ones "
                   "need the Python API")
    p.add_argument("--ignore", action="append", default=[], metavar="PREFIX",
                   help="module or parameter name prefix whose groups stay whole (repeat)")
    p.add_argument("--include-softmax", action="store_true",
                   help="also prune groups whose units a softmax normalises")
    p.add_argument("--no-split-ties", action="store_true",
                   help="let the pieces of a chunk/split the forward cuts equally keep "
                        "unequal counts (ShuffleNetV2, CSPNet), and a width the forward "
                        "reads off another layer's (Swin's C // num_heads) keep any count: "
                        "the graph output takes them, --output module refuses them")
    p.add_argument("--round-to", type=_round_to, default=None, metavar="N|auto",
                   help="kept counts are multiples of N; auto: of what each op kind runs "
                   "fastest here, measured (default: auto for --target-latency, else 1)")
    p.add_argument("--out", type=_model_out, help="save the pruned model: .pt2 (torch.export,"
                   " default) or .pt (pickle); both load without fxprune")
    p.add_argument("--onnx", type=_onnx_out, metavar="OUT.onnx", help="also export ONNX")
    p.add_argument("--save-pretrained", type=_new_dir, metavar="DIR",
                   help="Hugging Face models: save with the model's own save_pretrained "
                   "(implies --output module; needs a plan a config describes: --uniform); "
                   "loads with AutoModel*.from_pretrained(DIR), no fxprune needed")
    p.add_argument("--plan-out", type=_writable, help="write the plan as JSON here")
    p.add_argument("--no-verify", action="store_true", help="skip slice == mask")
    p.add_argument("--attention-scale", choices=["original", "recompute"],
                   default="original", help="softmax scale when head_dim is pruned: "
                   "1/sqrt(original head_dim) (default) or of the kept one")


#: subcommands: name -> (help, add_arguments, run); ``fxprune bench`` adds one entry
def _add_bench(p: argparse.ArgumentParser) -> None:
    from fxprune.cli_bench import add_bench_arguments
    add_bench_arguments(p)


def _cmd_bench(args: argparse.Namespace) -> int:
    from fxprune.cli_bench import cmd_bench
    return cmd_bench(args)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "inspect": ("print the coupled-group table", _add_inspect, cmd_inspect),
    "prune": ("analyse, plan, compile, verify and save", _add_prune, cmd_prune),
    "bench": ("latency before/after pruning (eager, compile, onnxruntime)",
              _add_bench, _cmd_bench),
}


def build_parser() -> argparse.ArgumentParser:
    from fxprune import __version__

    parser = argparse.ArgumentParser(
        prog="fxprune", description="Structured pruning of PyTorch models as torch.fx passes.")
    parser.add_argument("--version", action="version", version=f"fxprune {__version__}")
    parser.add_argument("--verbose", action="store_true", help="tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress, short output")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=text)
        _common(p)
        add(p)
        p.set_defaults(func=run)
    return parser


def _check_early(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Option checks that need the registries (after parsing, before any model work)."""
    _check_inputs(parser, args)
    if getattr(args, "func", None) is not cmd_prune:
        return
    if args.save_pretrained and args.output == "graph":
        parser.error("--save-pretrained saves the model's own class: use --output module "
                     "(the default with --save-pretrained), or --out for the graph")
    # the model's own class carries save_pretrained and config
    args.output = args.output or ("module" if args.save_pretrained else "graph")
    if args.uniform and args.plan:
        parser.error("--uniform shapes a new plan; a saved --plan is applied as it is "
                     "(re-plan with --uniform and --plan-out)")
    from fxprune.planning.importance import CRITERIA

    spec = CRITERIA.get(args.criterion)
    if spec is None:
        import difflib
        close = difflib.get_close_matches(args.criterion, list(CRITERIA), n=1, cutoff=0.5)
        parser.error(f"unknown criterion {args.criterion!r}"
                     f"{f'; did you mean {close[0]}?' if close else ''} "
                     f"(one of {', '.join(CRITERIA)})")
    if spec.needs_data:
        parser.error(f"criterion {args.criterion!r} needs calibration data: use the Python "
                     "API (fxprune.Importance(..., data=...)) or a data-free criterion")
    if args.round_to is None:
        args.round_to = "auto" if args.target_latency else 1


def _check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    specs = getattr(args, "input", None) or []
    if specs and getattr(args, "input_shape", None):
        parser.error("give inputs with --input or with --input-shape, not both "
                     "(--input SHAPE is a positional input)")
    names = [s.name for s in specs if s.name]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        parser.error(f"--input {twice}=... is given twice: name each keyword input once")
    after = [s for s in specs[specs.index(next(s for s in specs if s.name)) + 1:]
             if not s.name] if names else []
    if after:
        parser.error(f"positional --input {'x'.join(map(str, after[0].shape))} follows a "
                     "keyword input: give positional inputs first")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_early(parser, args)
    except SystemExit as exc:  # argparse: usage errors (2), --help and --version (0)
        return int(exc.code or 0)
    import torch

    torch.manual_seed(args.seed)
    try:
        return args.func(args)
    except FxpruneError as exc:
        if args.verbose:
            import traceback
            traceback.print_exc()
        message = " ".join(str(exc).split())
        print(f"fxprune: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fxprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
