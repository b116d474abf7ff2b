"""Rule-table coverage: every ``torch.nn.functional`` op, every ``torch.nn`` module and
the common Tensor methods, against ``passes.rules`` (issue 8 item 7).

    PYTHONPATH=$PWD python benchmarks/coverage.py            # writes docs/coverage.md
    PYTHONPATH=$PWD python benchmarks/coverage.py --check    # exit 1 if the file is stale

An op is *covered* when the rule table has an entry for it (by canonical name, callable
or module type, or a base class whose forward it keeps). Uncovered ops are barriers:
channels that reach them are pinned, never guessed. Each uncovered op gets the reason
from ``WHY_NOT`` (first matching pattern), so the table says why it is not covered.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import passes.rules  # noqa: F401  (registers the families)
from passes.rules.registry import ANALYSIS_RULES, canonical_name

OUT = Path(__file__).resolve().parents[1] / "docs" / "coverage.md"

TENSOR_METHODS = (
    "abs add addmm amax amin argmax bmm chunk clamp clone contiguous cos cumsum detach div "
    "einsum exp expand expand_as flatten flip float gather half index_select log "
    "masked_fill matmul max mean min mul narrow neg norm permute pow prod relu repeat "
    "repeat_interleave reshape roll scatter sigmoid sin size softmax split sqrt squeeze std "
    "sub sum t tanh tile to topk transpose type_as unbind unflatten unsqueeze var view "
    "view_as where").split()

# (pattern on the name, why fxprune has no rule): first match wins
WHY_NOT = (
    (r"loss|_nll|nll_|cross_entropy|kl_div|ctc|margin|triplet|poisson|cosine_embedding",
     "loss: reduces to a scalar objective at the model output, after every prunable layer"),
    (r"^(Module|Sequential|ModuleList|ModuleDict|ParameterList|ParameterDict|Container)$",
     "container: traced through, its children get rules"),
    (r"^Lazy", "lazy module: materialise it (run one forward) before analysis"),
    (r"^(Transformer|TransformerEncoder|TransformerDecoder)(Layer)?$",
     "composite of Linear/MHA/LayerNorm: use frontend='export' to trace through it"),
    (r"RNN|LSTMCell|GRUCell|RNNCell|^RNNBase$",
     "recurrent variant without a gated-structure rule: barrier"),
    (r"unpool|fold|unfold", "reads positions (indices / patches) across channels: barrier"),
    (r"fractional|lp_pool|LPPool|Fractional|adaptive_max_pool.*with_indices",
     "rare pooling variant without a rule yet: barrier"),
    (r"embedding_bag|EmbeddingBag", "bag reductions over ragged offsets: barrier"),
    (r"grid_sample|affine_grid",
     "mixes channel and spatial positions in a way no index map expresses yet: barrier"),
    (r"^(Bilinear|bilinear)$", "bilinear form couples two inputs through a 3-D weight: barrier"),
    (r"Quant|quant|fake", "quantisation stubs: prune before quantising"),
    (r"Upsampling|Upsample", "interpolation module without its own rule: barrier"),
        (r"^(Softmax2d)$", "softmax over the channel dim of (N, C, H, W): add a rule when needed"),
    (r"local_response_norm|LocalResponseNorm|CrossMapLRN",
     "sums over neighbouring channels: removing one changes its neighbours' outputs"),
    (r"cosine_similarity|pairwise_distance|pdist|CosineSimilarity|PairwiseDistance",
     "a distance reduces over the channel dim to one value: barrier"),
    (r"gather|scatter|topk", "data-dependent indices: channels they touch are pinned"),
    (r"gumbel_softmax", "samples over a dim (random, not a fixed function): barrier"),
    (r"_mm$|grouped_mm|conv_tbc", "low-level kernel rarely seen in models: barrier"),
    (r"^(one_hot)$", "makes a new dim from indices: no channels flow through"),
    (r"multi_head_attention_forward", "nn.MultiheadAttention's implementation: the module "
     "rule covers it"),
    (r"DataParallel", "a wrapper: analyse the wrapped module"),
    (r"^prelu$", "functional PReLU with a weight argument: no rule yet (nn.PReLU has one)"),
    (r"^(handle_torch_function|has_torch_function|has_torch_function_unary|"
     r"has_torch_function_variadic|boolean_dispatch|assert_int_or_pair|"
     r"_no_grad_embedding_renorm_|Callable|Optional|List|Tuple|Union|Any|TYPE_CHECKING|"
     r"DType|BroadcastingList[123]|Tensor|GRID_SAMPLE_.*|.*_list_with_default|"
     r"importlib|math|torch|warnings|Module|Parameter)$",
     "not an op (a helper, a type or a module imported by torch.nn.functional)"),
    (r".", "no rule yet: a barrier (channels reaching it are pinned, see inspect --pins)"),
)


def _why(name: str) -> str:
    return next(reason for pattern, reason in WHY_NOT if re.search(pattern, name, re.I))


def functional_ops() -> list[tuple[str, bool]]:
    rows = []
    for name, obj in sorted(vars(F).items()):
        if name.startswith("_") or not callable(obj) or inspect.isclass(obj):
            continue
        rows.append((name, canonical_name(name) in ANALYSIS_RULES or obj in ANALYSIS_RULES))
    return rows


def module_types() -> list[tuple[str, bool]]:
    rows = []
    for name, obj in sorted(vars(nn).items()):
        if not (inspect.isclass(obj) and issubclass(obj, nn.Module)) or name.startswith("_"):
            continue
        covered = obj in ANALYSIS_RULES or any(
            base in ANALYSIS_RULES and obj.forward is base.forward for base in obj.__mro__[1:])
        rows.append((name, covered))
    return rows


def tensor_methods() -> list[tuple[str, bool]]:
    return [(name, canonical_name(name) in ANALYSIS_RULES) for name in TENSOR_METHODS]


def render() -> str:
    sections = [("`torch.nn.functional`", functional_ops(), "F."),
                ("`torch.nn` modules", module_types(), "nn."),
                ("common `Tensor` methods", tensor_methods(), "Tensor.")]
    lines = ["# Rule coverage", "",
             "Generated by `benchmarks/coverage.py` (do not edit by hand): torch "
             f"{torch.__version__.split('+')[0]}. *covered* means the rule table has an "
             "entry; everything else is a barrier (fail closed), with the reason it has no "
             "rule. Helpers and types that `torch.nn.functional` re-exports are left "
             "out.", ""]
    for title, rows, prefix in sections:
        done = sum(c for _, c in rows)
        ops = [r for r in rows if not _why(r[0]).startswith("not an op") or r[1]]
        lines += [f"## {title}: {done} of {len(ops)} covered", "",
                  "| op | covered | why not |", "| --- | --- | --- |"]
        lines += [f"| `{prefix}{name}` | {'yes' if c else 'no'} | {'' if c else _why(name)} |"
                  for name, c in ops]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/coverage.md is stale")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        return 0 if args.out.exists() and args.out.read_text() == text else 1
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
