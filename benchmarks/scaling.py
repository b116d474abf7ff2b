"""How analysis and compile times grow with the graph, against fixed targets.

    python benchmarks/scaling.py                  # every case, PASS/MISS table
    python benchmarks/scaling.py --profile        # + cProfile top entries of each MISS
    python benchmarks/scaling.py --case resnet50  # one case, JSON lines (used internally)

Cases run in fresh subprocesses (clean peak RSS, no cache carried between cases), each
after a warm-up on a tiny model. "analyse+compile" is ``fxprune.analyze`` (trace, shape
propagation, find_groups) plus ``fxprune.compile`` (slice_weights, check_sliced) of an
l1 plan at ratio 0.5; the plan itself is timed apart. Times are medians of ``--repeats``
runs in one process (one run for the 1000-block net and ViT-H/14). Targets are judged
on wall-clock medians; the process CPU time of analyse + compile (all threads) is
printed beside them because a loaded machine inflates wall time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fxprune  # noqa: E402

SCALING_TARGET = 12.0       # 1000-block analyse+compile <= 12x the 100-block one
RESNET50_TARGET_S = 1.0
VIT_B_TARGET_S = 2.0


class Block(nn.Module):
    """conv-bn-relu-conv-bn + identity add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class ResidualNet(nn.Module):
    """A stem, ``blocks`` residual blocks that all share one residual channel space, a head."""

    def __init__(self, blocks: int, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(blocks)])
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


# ----------------------------------------------------------------------------------
# One case, in this process
# ----------------------------------------------------------------------------------
def _model(case: str) -> tuple[nn.Module, tuple]:
    if case.startswith("blocks-"):
        return ResidualNet(int(case.split("-")[1])).eval(), (torch.randn(1, 3, 8, 8),)
    import torchvision

    if case == "vit_h_14-meta":
        with torch.device("meta"):
            model = torchvision.models.get_model("vit_h_14", weights=None).eval()
        return model, (torch.randn(1, 3, 224, 224, device="meta"),)
    return torchvision.models.get_model(case, weights=None).eval(), (torch.randn(1, 3, 224, 224),)


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_case(case: str, repeats: int, profile: bool) -> None:
    torch.manual_seed(0)
    warm, warm_x = ResidualNet(2).eval(), (torch.randn(1, 3, 8, 8),)
    fxprune.compile(warm, fxprune.Plan.from_ratio(fxprune.analyze(warm, warm_x), 0.5))
    _emit(case=case, rss_after_warmup_mb=_peak_rss_mb())
    model, inputs = _model(case)
    _emit(case=case, params=sum(p.numel() for p in model.parameters()))
    with_compile = case != "vit_h_14-meta"
    runs = 1 if case in ("blocks-1000", "vit_h_14-meta") or profile else repeats
    prof = cProfile.Profile() if profile else None
    analyse_s, plan_s, compile_s, cpu_s = [], [], [], []
    for _ in range(runs):
        if prof:
            prof.enable()
        cpu, start = time.process_time(), time.perf_counter()
        analysis = fxprune.analyze(model, inputs)
        analyse_s.append(time.perf_counter() - start)
        cpu_s.append(time.process_time() - cpu)
        _emit(case=case, analyse_s=analyse_s[-1], nodes=len(analysis.gm.graph.nodes),
              groups=len(analysis.groups), units=sum(g.size for g in analysis.groups))
        if with_compile:
            start = time.perf_counter()
            plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="l1")
            plan_s.append(time.perf_counter() - start)
            _emit(case=case, plan_s=plan_s[-1])
            cpu, start = time.process_time(), time.perf_counter()
            fxprune.compile(model, plan)
            compile_s.append(time.perf_counter() - start)
            cpu_s[-1] += time.process_time() - cpu  # analyse + compile, all threads
            _emit(case=case, compile_s=compile_s[-1])
        if prof:
            prof.disable()
    result = {"case": case, "runs": runs, "analyse_s": statistics.median(analyse_s),
              "peak_rss_mb": _peak_rss_mb(), "cpu_s": statistics.median(cpu_s)}
    if with_compile:
        total = [a + c for a, c in zip(analyse_s, compile_s)]
        result.update(plan_s=statistics.median(plan_s), compile_s=statistics.median(compile_s),
                      total_s=statistics.median(total), total_min_s=min(total))
    _emit(final=True, **result)
    if prof:
        for key in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(prof, stream=text).strip_dirs().sort_stats(key).print_stats(15)
            print(f"--- cProfile {case}, top 15 by {key} ---")
            print("\n".join(ln for ln in text.getvalue().splitlines()
                            if ln.strip() and not ln.lstrip().startswith(("Ordered", "List"))))


# ----------------------------------------------------------------------------------
# LLaMA-shaped 1B+: compile on meta, then slice safetensors shards as they are read
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)


def run_llama_shards(workdir: str, shard_mb: int = 1024) -> None:
    """Random-weight LLaMA (1.1B, GQA 32/4 heads) written as safetensors shards, one
    tensor generated at a time; then analyse + plan + compile on meta and
    ``load_sliced_state_dict`` from the shards. Peak RSS against the fp32 weights."""
    import transformers
    from safetensors.torch import save_file

    from fxprune.api import flat_tensors

    transformers.logging.set_verbosity_error()
    Path(workdir).mkdir(parents=True, exist_ok=True)
    cfg = transformers.LlamaConfig(max_position_embeddings=2048, use_cache=False, **LLAMA_1B)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in skeleton.parameters())
    fp32_mb = params * 4 / 2**20
    files, part, size, rss0 = [], {}, 0, _peak_rss_mb()
    names = [n for n, _ in skeleton.named_parameters()]
    for i, name in enumerate(names):  # dense shards on disk, never the dense model in memory
        t = skeleton.get_parameter(name)
        part[name] = torch.randn(t.shape) * 0.02
        size += part[name].numel() * 4
        if size >= shard_mb * 2**20 or i == len(names) - 1:
            files.append(f"{workdir}/model-{len(files):05d}.safetensors")
            save_file(part, files[-1])
            part, size = {}, 0
    _emit(case="llama-1b-shards", params=params, fp32_mb=fp32_mb, shards=len(files),
          rss_after_writing_mb=_peak_rss_mb(), rss_before_mb=rss0)
    ids = torch.zeros(1, 16, dtype=torch.long)
    start = time.perf_counter()
    gm = fxprune.trace(skeleton, (ids,), frontend="export")
    analysis = fxprune.analyze(gm, (ids,), split_policy="heads")
    analyse_s = time.perf_counter() - start
    start = time.perf_counter()
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="random")
    small = fxprune.compile(analysis, plan)
    compile_s = time.perf_counter() - start
    rss_meta = _peak_rss_mb()
    # tensors the files do not hold (rotary inv_freq: a non-persistent buffer) come
    # from a CPU instance of their module, as a loader would compute them
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    extra = f"{workdir}/buffers.safetensors"
    missing = {n: t for n, t in small.named_buffers() if n.endswith("inv_freq")}
    save_file({n: rotary.inv_freq.clone() for n in missing}, extra)
    start = time.perf_counter()
    loaded = fxprune.load_sliced_state_dict(small, plan, [*files, extra], analysis=analysis)
    load_s = time.perf_counter() - start
    kept = sum(p.numel() for p in loaded.parameters())
    with torch.no_grad():
        out = loaded(ids)
    _emit(final=True, case="llama-1b-shards", params=params, params_after=kept,
          fp32_mb=fp32_mb, analyse_s=analyse_s, plan_compile_s=compile_s, load_s=load_s,
          peak_rss_meta_compile_mb=rss_meta, peak_rss_mb=_peak_rss_mb(),
          pruned_fp32_mb=kept * 4 / 2**20,
          output_finite=all(bool(torch.isfinite(t).all()) for t in flat_tensors(out)))


# ----------------------------------------------------------------------------------
# Verification memory (issue 12, section 4): peak RSS of each step against fp32 weights
VERIFY_TARGET = 1.5  # verify's peak RSS above what it starts with <= 1.5x fp32 weights


class _PeakRSS:
    """Peak resident memory of this process over a block, sampled from /proc every 5 ms
    (``ru_maxrss`` cannot be reset between steps)."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(0.005)

    def __enter__(self) -> "_PeakRSS":
        self.start = self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def _verify_model(case: str) -> tuple[nn.Module, tuple, dict]:
    if case == "llama-1b-verify":
        import transformers

        transformers.logging.set_verbosity_error()
        cfg = transformers.LlamaConfig(max_position_embeddings=2048, use_cache=False, **LLAMA_1B)
        model = transformers.LlamaForCausalLM(cfg).eval()  # random init, fp32
        return model, (torch.randint(0, 32000, (1, 16)),), dict(frontend="export",
                                                                 split_policy="heads")
    import torchvision

    name = case.removesuffix("-verify")
    return (torchvision.models.get_model(name, weights=None).eval(),
            (torch.randn(1, 3, 224, 224),), {})


def run_verify_case(case: str, legacy: bool = False) -> None:
    """Analyse, plan (random 0.5), compile and verify one model; time and peak RSS of
    each step (above the RSS it starts with) against the model's fp32 weights.
    ``legacy``: the recorded (non-streaming) verification kept for reference."""
    torch.manual_seed(0)
    model, inputs, options = _verify_model(case)
    params = sum(p.numel() for p in model.parameters())
    fp32_mb = params * 4 / 2**20
    _emit(case=case, params=params, fp32_mb=fp32_mb, rss_model_mb=_PeakRSS.now() / 2**20)
    steps: dict[str, Any] = {}

    def step(name: str, fn: Any) -> Any:
        gc_collect()
        with _PeakRSS() as rss:
            start = time.perf_counter()
            out = fn()
            secs = time.perf_counter() - start
        steps[name] = dict(s=secs, peak_above_start_mb=(rss.peak - rss.start) / 2**20,
                           start_mb=rss.start / 2**20)
        _emit(case=case, step=name, **steps[name])
        return out

    analysis = step("analyse", lambda: fxprune.analyze(model, inputs, **options))
    plan = step("plan", lambda: fxprune.Plan.from_ratio(analysis, 0.5, criterion="random"))
    pruned = step("compile", lambda: fxprune.compile(analysis, plan))
    from fxprune import api

    check = api._verify_recorded if legacy else fxprune.verify
    report = step("verify", lambda: check(analysis, pruned, plan, inputs))
    _emit(final=True, case=case, legacy=legacy, params=params, fp32_mb=fp32_mb,
          params_after=report.params_after, ok=report.ok, nodes_checked=report.nodes_checked,
          max_abs_error=report.max_abs_error, worst_node=report.worst_node,
          max_node_rel_error=report.max_node_rel_error, steps=steps,
          verify_ratio=steps["verify"]["peak_above_start_mb"] / fp32_mb,
          verify_target=f"verify peak above start <= {VERIFY_TARGET}x fp32 weights",
          verify_pass=steps["verify"]["peak_above_start_mb"] <= VERIFY_TARGET * fp32_mb,
          peak_rss_mb=_peak_rss_mb())


def gc_collect() -> None:
    import gc

    gc.collect()


# Driver: every case in a subprocess, then the table
# ----------------------------------------------------------------------------------
def run_sub(case: str, args: argparse.Namespace, profile: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--case", case, "--repeats", str(args.repeats)]
    if profile:
        cmd.append("--profile")
    merged: dict[str, Any] = {"case": case}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        out, err, code = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, code = "", None
        merged["timeout"] = True
    for line in out.splitlines():
        if line.startswith("{"):
            merged.update(json.loads(line))
    if profile:
        merged["profile"] = "\n".join(ln for ln in out.splitlines() if not ln.startswith("{"))
    if code not in (0, None):
        merged["error"] = (err.strip().splitlines() or ["?"])[-1][:300]
    return merged


def _secs(r: dict[str, Any], key: str) -> str:
    if key in r:
        return f"{r[key]:.2f} s"
    return f"> {r['timeout_s']:.0f} s (timeout)" if r.get("timeout") else r.get("error", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help="run one case here and print JSON lines")
    parser.add_argument("--llama-shards", metavar="DIR",
                        help="1.1B LLaMA: write random safetensors shards to DIR (4.4 GB), "
                             "compile on meta, load sliced shards; JSON lines")
    parser.add_argument("--verify", metavar="CASE",
                        help="llama-1b-verify or vit_l_16-verify: time and peak RSS of "
                             "analyse, plan, compile, verify; JSON lines")
    parser.add_argument("--legacy", action="store_true",
                        help="with --verify: the recorded (pre-streaming) verification")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per case")
    parser.add_argument("--profile", action="store_true",
                        help="with --case: profile it; otherwise profile every MISS")
    args = parser.parse_args(argv)
    if args.llama_shards:
        run_llama_shards(args.llama_shards)
        return 0
    if args.verify:
        run_verify_case(args.verify, legacy=args.legacy)
        return 0
    if args.case:
        run_case(args.case, args.repeats, args.profile)
        return 0

    from tabulate import tabulate

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); "
          f"medians of {args.repeats} runs; each case in a fresh process", flush=True)
    results = {}
    for case in ("blocks-100", "blocks-1000", "resnet50", "vit_b_16", "vit_h_14-meta"):
        results[case] = run_sub(case, args)
        results[case]["timeout_s"] = args.timeout
        print(f"  {case}: {json.dumps({k: v for k, v in results[case].items() if k != 'profile'})}",
              file=sys.stderr, flush=True)

    detail = []
    for case, r in results.items():
        detail.append([case, r.get("nodes", "-"), r.get("groups", "-"), r.get("units", "-"),
                       _secs(r, "analyse_s"), _secs(r, "plan_s") if "vit_h" not in case else "-",
                       _secs(r, "compile_s") if "vit_h" not in case else "-",
                       _secs(r, "total_s") if "vit_h" not in case else "-",
                       _secs(r, "cpu_s"),
                       f"{r['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in r else "-"])
    print(tabulate(detail, headers=["case", "nodes", "groups", "units", "analyse", "plan",
                                    "compile", "analyse+compile", "(CPU time)",
                                    "peak RSS"]))
    print()

    b100, b1000 = results["blocks-100"], results["blocks-1000"]
    if "total_s" in b100 and "total_s" in b1000:
        ratio = b1000["total_s"] / b100["total_s"]
        measured = f"{ratio:.1f}x ({b1000['total_s']:.2f} s / {b100['total_s']:.2f} s)"
        ok = ratio <= SCALING_TARGET
    else:
        low = b1000.get("analyse_s", 0) + args.timeout if b1000.get("timeout") else None
        measured = (f"> {low / b100['total_s']:.0f}x (1000 blocks timed out after "
                    f"{args.timeout:.0f} s; 100 blocks {b100['total_s']:.2f} s)"
                    if low and "total_s" in b100 else "not measured: " + b1000.get("error", "?"))
        ok = False
    rows = [["1000-block / 100-block analyse+compile", f"<= {SCALING_TARGET:.0f}x", measured,
             "PASS" if ok else "MISS", "blocks-100"]]
    for case, target in (("resnet50", RESNET50_TARGET_S), ("vit_b_16", VIT_B_TARGET_S)):
        r = results[case]
        got = r.get("total_s")
        rows.append([f"{case} analyse+compile", f"< {target:.0f} s",
                     f"{got:.2f} s (min {r['total_min_s']:.2f} s)" if got else _secs(r, "x"),
                     "PASS" if got is not None and got < target else "MISS", case])
    vh = results["vit_h_14-meta"]
    weights_mb = vh.get("params", 0) * 4 / 2**20  # what real float32 weights would take
    rss = vh.get("peak_rss_mb")
    rows.append(["vit_h_14 on meta: analyse time", "report", _secs(vh, "analyse_s"),
                 "PASS" if "analyse_s" in vh else "MISS", "vit_h_14-meta"])
    rows.append(["vit_h_14 on meta: peak RSS", f"< its fp32 weights ({weights_mb:.0f} MB)",
                 f"{rss:.0f} MB (after imports+warm-up {vh['rss_after_warmup_mb']:.0f} MB)"
                 if rss else "-", "PASS" if rss and rss < weights_mb else "MISS",
                 "vit_h_14-meta"])
    print(tabulate([r[:4] for r in rows], headers=["target", "wanted", "measured", ""]))

    if args.profile:
        missed = list(dict.fromkeys(r[4] for r in rows if r[3] == "MISS"))
        for case in missed:
            prof = run_sub(case, args, profile=True)
            print(f"\n=== MISS: cProfile of {case} (one run) ===")
            print(prof.get("profile") or _secs(prof, "total_s"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
