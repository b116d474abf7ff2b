"""Benchmark: analysing LLaMA-2-7B- and 70B-shaped models on the meta device.

The model is built from a LLaMA-2 config under ``torch.device("meta")`` (no weights are
allocated), captured with the torch.export front-end and analysed with both head
policies. Each configuration runs in a fresh process so that its peak resident memory
(``ru_maxrss``, which includes Python, torch and transformers themselves) is its own.
Reported: time to build, export and analyse; peak RSS; groups and their kinds.

    OMP_NUM_THREADS=1 python benchmarks/llama_meta.py            # 7B and 70B, outer/inner
    OMP_NUM_THREADS=1 python benchmarks/llama_meta.py --sizes 7b
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = {
    # LLaMA-2-7B: 32 layers, hidden 4096, 32 heads (MHA), MLP 11008, vocab 32000
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    # LLaMA-2-70B: 80 layers, hidden 8192, 64 query heads on 8 key/value heads (GQA)
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8),
}


def measure(size: str, policy: str, tokens: int) -> dict:
    """Build, export and analyse one configuration (in this process)."""
    import torch
    import transformers

    import fxprune

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096,
                                   use_cache=False, **CONFIGS[size])
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.zeros(1, tokens, dtype=torch.long)
    t1 = time.perf_counter()
    gm = fxprune.trace(model, (ids,), frontend="export")
    t2 = time.perf_counter()
    analysis = fxprune.analyze(gm, (ids,), split_policy=policy)
    t3 = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    heads = [g for g in analysis.groups
             if any(m.fqn.endswith("q_proj.weight") and m.dim == 0 for m in g.members)]
    mlp = [g for g in analysis.groups if any(m.fqn.endswith("gate_proj.weight") and m.dim == 0
                                             for m in g.members)]
    return {"size": size, "policy": policy, "params_b": params / 1e9,
            "build_s": t1 - t0, "export_s": t2 - t1, "analyze_s": t3 - t2,
            "total_s": t3 - t0, "groups": len(analysis.groups),
            "exact": sum(g.exact for g in analysis.groups),
            "head_groups": len(heads), "units_per_head_group": heads[0].size if heads else 0,
            "mlp_groups": len(mlp), "nodes": len(gm.graph.nodes),
            "import_rss_mb": base_rss / 1024,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--policies", nargs="+", default=["outer", "inner"])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "POLICY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one, args.tokens)))
        return 0
    from tabulate import tabulate

    import torch
    import transformers

    rows = []
    for size in args.sizes:
        for policy in args.policies:
            out = subprocess.run([sys.executable, __file__, "--one", size, policy,
                                  "--tokens", str(args.tokens)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}; meta device, "
          f"one thread, batch 1 x {args.tokens} tokens; a fresh process per row\n")
    print(tabulate([(f"LLaMA-2-{r['size'].upper()}", r["policy"], f"{r['params_b']:.2f} B",
                     r["nodes"], f"{r['export_s']:.1f}", f"{r['analyze_s']:.1f}",
                     f"{r['total_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
                     f"{r['import_rss_mb']:.0f}", r["groups"],
                     f"{r['head_groups']} x {r['units_per_head_group']}", r["mlp_groups"])
                    for r in rows],
                   headers=["config", "heads", "params", "graph nodes", "export s",
                            "analyze s", "total s", "peak RSS MB", "RSS after imports MB",
                            "groups", "q/k head groups x units", "MLP groups"],
                   tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
