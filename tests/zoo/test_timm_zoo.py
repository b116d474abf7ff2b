"""Zoo: timm architectures across families are analysed, pruned at random, verified.

For each architecture (smallest variant, ``pretrained=False``, random init, eval mode,
the smallest input it accepts): ``fxprune.analyze`` through symbolic tracing with timm's
own leaf modules and functions; a random removal in every prunable group
(``Plan.from_ratio(criterion="random")``: heads or head_dim, MLP width, hidden size,
channels); compile; ``verify`` (slice == mask in float64 activation by activation on
exact groups, shapes and parameter counts on the rest); the pruned output has the
original's shape and the user's model is untouched. Attention models are pruned a
second time with ``split_policy="heads"`` (whole heads); a few are also layer-pruned.

Inputs are tiny because the whole file has to fit a few minutes on two CPU cores
(timm takes ``img_size=`` at construction for ViT-like models; convnets have adaptive
pooling). The coverage table in README.md comes from ``python tests/zoo/test_timm_zoo.py``.
"""
from __future__ import annotations

import os
import re
import sys
import time

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

import fxprune  # noqa: E402

RATIO = 0.4

# name -> (create_model kwargs, input height/width). 32 is the least most convnets take;
# ViTs get img_size = 2 patches per side; window models a window of 2 on a 64 input.
ARCHS: dict[str, tuple[dict, int]] = {
    # ViT family
    "vit_tiny_patch16_224": (dict(img_size=32), 32),
    "deit_tiny_distilled_patch16_224": (dict(img_size=32), 32),
    "cait_xxs24_224": (dict(img_size=32), 32),
    "eva02_tiny_patch14_224": (dict(img_size=28), 28),
    "xcit_nano_12_p16_224": (dict(img_size=32), 32),
    "pit_ti_224": (dict(img_size=64), 64),
    # hierarchical / window transformers
    "swin_tiny_patch4_window7_224": (dict(img_size=64, window_size=2), 64),
    "davit_tiny": ({}, 64),
    "nest_tiny": (dict(img_size=64), 64),
    "twins_pcpvt_small": ({}, 64),
    "pvt_v2_b0": ({}, 64),
    "coat_lite_tiny": (dict(img_size=64), 64),
    "maxvit_pico_rw_256": (dict(img_size=64), 64),
    "coatnet_pico_rw_224": (dict(img_size=64), 64),
    "levit_128s": (dict(img_size=64), 64),
    "efficientformer_l1": ({}, 224),  # attention biases are fixed to a 7x7 last stage
    "efficientformerv2_s0": ({}, 224),
    "visformer_tiny": (dict(img_size=64), 64),
    "edgenext_xx_small": ({}, 64),
    # MLPs and metaformers
    "mixer_s16_224": (dict(img_size=32), 32),
    "resmlp_12_224": (dict(img_size=32), 32),
    "gmlp_ti16_224": (dict(img_size=32), 32),
    "poolformer_s12": ({}, 32),
    "poolformerv2_s12": ({}, 32),
    "convnext_atto": ({}, 32),
    "convnextv2_atto": ({}, 32),
    "inception_next_atto": ({}, 32),
    "focalnet_tiny_srf": ({}, 64),
    "sequencer2d_s": ({}, 32),
    # mobile / efficient convnets
    "efficientnet_b0": ({}, 32),
    "mobilenetv3_small_050": ({}, 32),
    "mobilenetv4_conv_small": ({}, 32),
    "mnasnet_050": ({}, 32),
    "lcnet_050": ({}, 32),
    "tinynet_e": ({}, 32),
    "ghostnet_050": ({}, 32),
    "ghostnetv2_100": ({}, 64),
    "rexnet_100": ({}, 32),
    "mobilevit_xxs": ({}, 64),
    "fastvit_t8": ({}, 32),
    "mobileone_s0": ({}, 32),
    "repvgg_a0": ({}, 32),
    # classic convnets
    "regnetx_002": ({}, 32),
    "regnety_002": ({}, 32),
    "resnet18": ({}, 32),
    "seresnet18": ({}, 32),
    "resnext26ts": ({}, 32),
    "ecaresnet26t": ({}, 32),
    "cspresnet50": ({}, 32),
    "cs3darknet_focus_s": ({}, 32),
    "dla46_c": ({}, 32),
    "dpn48b": ({}, 32),
    "hrnet_w18_small": ({}, 64),
    "densenet121": ({}, 32),
    "inception_v3": ({}, 75),
    "xception41": ({}, 32),
    "hgnetv2_b0": ({}, 32),
    "ese_vovnet19b_dw": ({}, 32),
    "selecsls42b": ({}, 32),
    "starnet_s1": ({}, 32),
}

# Pruned again with split_policy="heads": a unit is a whole head (q, k, v rows and the
# output projection's columns, plus per-head tables such as relative position biases).
HEADS = ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "maxvit_pico_rw_256",
         "levit_128s", "cait_xxs24_224", "twins_pcpvt_small", "efficientformer_l1",
         "eva02_tiny_patch14_224"]

# Analysed, but nothing to prune: a fail-closed result, not a coverage pass.
EXCLUDED = {
    "nf_resnet26": "weight-standardised convs compute their weight (F.batch_norm over "
                   "the weight): conv with a computed weight is a barrier, no group",
}

# Analysed and pruned, with timm leaf modules left whole as barriers (reported).
BARRIER_LEAVES = {"mobilevit_xxs": "MobileVitBlock"}


def make(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    kwargs, size = ARCHS.get(name, ({}, 32))
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    return model, torch.randn(2, 3, size, size)


def _spread(out: torch.Tensor) -> float:
    scale = float(out.abs().max())
    return float((out[0] - out[1]).abs().max()) / scale if scale > 0 else 0.0


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def _meaningful(model: torch.nn.Module, x: torch.Tensor) -> None:
    """The output must depend on the features, or slice == mask would be vacuous. Until
    it does: a zero-initialised or dominating classifier is replaced by N(0, 1/fan_in)
    with zero bias; layer scales initialised near 0 (CaiT's 1e-5) are set to O(1); batch
    norm scales and shifts that let the signal decay to the biases (RepVGG) are redrawn."""
    def classifier():  # the last Linear, or 1x1 conv (DLA, DPN)
        last = [m for m in model.modules() if isinstance(m, (torch.nn.Linear,
                                                             torch.nn.Conv2d))][-1]
        torch.nn.init.normal_(last.weight, std=last.weight[0].numel() ** -0.5)
        if last.bias is not None:
            last.bias.zero_()

    def layer_scales():
        for name, t in model.named_parameters():
            if "gamma" in name and float(t.abs().max()) < 1e-2:
                t.uniform_(0.5, 1.0)

    def batch_norms():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)

    with torch.no_grad():
        for fix in (classifier, layer_scales, batch_norms):
            if _spread(_forward(model, x)) > 1e-3:
                return
            fix()
    assert _spread(_forward(model, x)) > 1e-3, "the output does not depend on the input"


def _fingerprint(model: torch.nn.Module) -> list:
    with torch.no_grad():
        return [model.training] + [(n, id(t), tuple(t.shape), float(t.double().sum()))
                                   for n, t in list(model.named_parameters())
                                   + list(model.named_buffers())]


def run_timm_model(name: str, *, policy: str = "head_dim", seed: int = 0) -> dict:
    """Analyse, prune every group at random, compile, verify; a summary for the table."""
    start, cpu = time.perf_counter(), time.process_time()
    model, x = make(name, seed)
    _meaningful(model, x)
    before = _fingerprint(model)
    analysis = fxprune.analyze(model, (x,), split_policy=policy)
    assert analysis.groups, f"{name}: no prunable group"
    plan = fxprune.Plan.from_ratio(analysis, RATIO, criterion="random", seed=seed,
                                   include_softmax=True)  # the sweep prunes every group
    whole = {**plan.meta.get("split_ties_whole", {}), **plan.meta.get("count_ties_whole", {})}
    assert {g.name for g in analysis.groups if g.size >= 2 and g.name not in whole} \
        <= set(plan.keep)  # ties may hold groups whole, saying why (fxprune.core.count_ties)

    small = fxprune.compile(model, plan)
    report = fxprune.verify(model, small, plan, (x,))
    assert report.ok and report.output_shapes_equal and report.nodes_checked > 0
    out, ref = _forward(small, x), _forward(model, x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert report.params_after < report.params_before
    assert _fingerprint(model) == before, f"{name}: the user's model was modified"
    return {"groups": len(analysis.groups), "exact": sum(g.exact for g in analysis.groups),
            "heads": sum(g.granularity > 1 and "qkv" in g.name for g in analysis.groups),
            "barriers": len(analysis.barriers), "verified": report.nodes_checked,
            "params": (report.params_before, report.params_after),
            "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
            "analysis": analysis}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FXPRUNE_ZOO_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHS))
def test_timm_model(name: str) -> None:
    np.random.seed(0)
    summary = run_timm_model(name)
    if name in BARRIER_LEAVES:
        leaf = BARRIER_LEAVES[name]
        gm = summary["analysis"].gm
        assert any(type(gm.get_submodule(n.target)).__name__ == leaf
                   for n in gm.graph.nodes if n.op == "call_module"
                   and n.name in summary["analysis"].barriers)


@pytest.mark.slow
@pytest.mark.parametrize("name", HEADS)
def test_timm_whole_heads(name: str) -> None:
    summary = run_timm_model(name, policy="heads", seed=1)
    heads = [g for g in summary["analysis"].groups
             if any(re.search(r"(qkv|\.q|\.kv)(\.linear)?\.weight$", m.fqn) and m.role == "out"
                    for m in g.members) and g.granularity > 1]
    assert heads, f"{name}: no head group"
    assert any(g.size >= 2 for g in heads)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXCLUDED))
def test_timm_excluded_models_still_analyse(name: str) -> None:
    """Fail closed: the model analyses (no error) and nothing is prunable."""
    model, x = make(name)
    analysis = fxprune.analyze(model, (x,))
    assert analysis.groups == ()


@pytest.mark.slow
@pytest.mark.parametrize("name, expect", [("vit_tiny_patch16_224", 12),
                                          ("convnext_atto", 12), ("resnet18", 5)])
def test_timm_layer_pruning(name: str, expect: int) -> None:
    """Residual blocks with an identity skip; the two least changing ones are removed and
    the result equals the model with their branches zeroed."""
    model, x = make(name)
    analysis = fxprune.analyze(model, (x,))
    blocks = fxprune.find_blocks(analysis)
    assert len(blocks) == expect
    scores = fxprune.block_similarity(analysis, blocks, x)
    drop = [blocks[i] for i in np.argsort(-scores)[:2]]
    small = fxprune.remove_blocks(analysis, drop)
    assert fxprune.verify_blocks(analysis, small, drop, x) <= 1e-6
    assert sum(p.numel() for p in small.parameters()) == \
        sum(p.numel() for p in model.parameters()) - sum(b.num_params for b in drop)


if __name__ == "__main__":  # the README's coverage table
    torch.set_num_threads(1)
    names = sys.argv[1:] or list(ARCHS)
    print("| architecture | groups | exact | verified activations | params before -> after "
          "| wall s | CPU s |\n| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for n in names:
        try:
            s = run_timm_model(n)
            print(f"| {n} | {s['groups']} | {s['exact']} | {s['verified']} | "
                  f"{s['params'][0] / 1e6:.2f}M -> {s['params'][1] / 1e6:.2f}M | "
                  f"{s['seconds']:.1f} | {s['cpu']:.1f} |", flush=True)
        except Exception as exc:  # noqa: BLE001 - a table row, not a test
            print(f"| {n} | FAILED: {type(exc).__name__}: {str(exc)[:120]} |", flush=True)
