"""Zoo: every torchvision classification model is analysed, pruned at random, verified.

For each model of ``torchvision.models.list_models(module=torchvision.models)``:
random init (seeded), eval mode, the smallest input the model accepts; analyse; a
random removal in every prunable group (``Plan.from_ratio(criterion="random")``);
compile; ``verify`` (slice == mask in float64, activation by activation); the pruned
output has the original's shape; the user's model is untouched.

Inputs are kept small because the whole zoo has to fit a few minutes on two CPU cores:
the cost is dominated by parameter count (deep copies, float64 runs), not by pixels.
"""
from __future__ import annotations

import copy
import gc
import os

import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

import fxprune  # noqa: E402

MODELS = torchvision.models.list_models(module=torchvision.models)
RATIO = 0.4

# (constructor kwargs, input height/width, batch): the smallest input each family accepts.
#  - ViT asserts image_size == H == W and image_size % patch == 0: two patches per side
#    (4 tokens + the class token) keeps attention non-trivial.
#  - MaxViT needs every stage's grid divisible by its partition size 7: 224 is the least.
#  - Inception v3 needs 75x75 (its weights' min_size; smaller inputs vanish in the stem).
#  - Swin pads each stage up to whole 7x7 windows (no shift where one window covers the
#    map): 32x32 gives 8x8 tokens in stage 1 (shifted windows), then 4x4, 2x2, 1x1.
#  - Everything else has adaptive pooling before its classifier; 64x64 leaves a spatial
#    map > 1x1 in the early stages so that spatial/channel dims are not confused.
_SPECIAL: dict[str, tuple[dict, int, int]] = {
    "inception_v3": ({}, 75, 2),
    "maxvit_t": ({}, 224, 2),
}


def model_config(name: str) -> tuple[dict, int, int]:
    """Constructor kwargs, input size and batch size for ``name``."""
    if name in _SPECIAL:
        return _SPECIAL[name]
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        return {"image_size": 2 * patch}, 2 * patch, 2
    if name.startswith("swin"):
        return {}, 32, 2
    return {}, 64, 2


def _fingerprint(model: torch.nn.Module) -> list:
    """Module tree, and identity, storage and version counter of every tensor.

    ``Tensor._version`` counts in-place writes (``no_grad`` ones included) and the data
    pointer changes when ``.data`` is swapped, so this sees any modification without
    copying hundreds of MB per model.
    """
    tensors = [(n, id(t), tuple(t.shape), t.dtype, t.data_ptr(), t._version)
               for n, t in list(model.named_parameters()) + list(model.named_buffers())]
    return [repr(model), [m.training for m in model.modules()], tensors]


def _forward(model: torch.nn.Module, x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        return model(x.to(dtype))


def _spread(out: torch.Tensor) -> float:
    """How much the two samples' outputs differ, relative to the output's scale."""
    scale = float(out.abs().max())
    return float((out[0] - out[1]).abs().max()) / scale if scale > 0 else 0.0


def _reinit_classifier(model: torch.nn.Module) -> None:
    """Last Linear: N(0, 1/fan_in) weight, zero bias."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        torch.nn.init.normal_(last.weight, std=last.in_features ** -0.5)
        if last.bias is not None:
            last.bias.zero_()


# Peak resident bytes per parameter beyond the model itself: the pruned copy, the masked
# copy, one float64 copy at a time in verify, and the conftest's snapshot of the model
# (measured: vit_h_14 and regnet_y_128gf peak at 21 bytes/parameter outside pytest).
_BYTES_PER_PARAM = 24


def _require_memory(name: str, model: torch.nn.Module) -> None:
    """Skip, rather than get the whole session OOM-killed, where memory cannot fit."""
    need = _BYTES_PER_PARAM * sum(p.numel() for p in model.parameters())
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return
    if available < need:
        pytest.skip(f"{name} needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available")


def run_zoo_model(name: str, seed: int = 0) -> dict:
    """Analyse, prune at random, compile and verify one model; returns a small summary."""
    torch.manual_seed(seed)
    kwargs, size, batch = model_config(name)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    _require_memory(name, model)
    x = torch.randn(batch, 3, size, size)
    # Is slice == mask meaningful on this model? verify compares float64 outputs and
    # every tracked activation by *relative* error, so a small output (mobilenet_v2 gives
    # ~1e-7 at random init) is checked as well as a large one. It is vacuous where the
    # output does not depend on the features: ViT's head is zero-initialised, GoogLeNet's
    # std=0.01 convs shrink the features to ~1e-24 so that its classifier bias is all that
    # remains, ShuffleNet's bias dominates too. A column of the classifier sliced wrongly
    # would go unseen there, so we re-initialise the classifier (unit-gain weight, zero
    # bias: the output is then proportional to the features, however small) and require
    # that the two samples of the batch give clearly different outputs.
    reference = _forward(model, x)
    if _spread(reference) <= 1e-3:
        _reinit_classifier(model)
        reference = _forward(model, x)
        if _spread(reference) <= 1e-3:  # float32 features underflowed: look in float64
            reference = _forward(model, x, torch.float64)
    assert torch.isfinite(reference).all()
    assert _spread(reference) > 1e-3, f"{name}: the output does not depend on the input"
    before = _fingerprint(model)

    analysis = fxprune.analyze(model, (x,))
    assert analysis.groups, f"{name}: no prunable group"
    plan = fxprune.Plan.from_ratio(analysis, RATIO, criterion="random", seed=seed,
                                   include_softmax=True)  # the sweep prunes every group
    whole = {**plan.meta.get("split_ties_whole", {}),  # equal chunk pieces tie all its
             **plan.meta.get("count_ties_whole", {})}  # units; a width read off another's
    prunable = [g for g in analysis.groups if g.size >= 2 and g.name not in whole]
    assert {g.name for g in prunable} <= set(plan.keep), "a prunable group was not pruned"

    small = fxprune.compile(model, plan)
    report = fxprune.verify(model, small, plan, (x,))
    assert report.ok and report.output_shapes_equal
    assert report.nodes_checked > 0, "no activation was compared"
    with torch.no_grad():
        out = small(x)
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()
    assert report.params_after < report.params_before
    assert _fingerprint(model) == before, f"{name}: the user's model was modified"
    return {"groups": len(analysis.groups), "exact": sum(g.exact for g in analysis.groups),
            "params": (report.params_before, report.params_after),
            "err": report.max_node_rel_error}


@pytest.fixture(autouse=True)
def _one_thread_and_collect():
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FXPRUNE_ZOO_THREADS", "1")))
    yield
    torch.set_num_threads(threads)
    # GraphModules are reference cycles: free this model's copies before the next one
    # (and before the conftest snapshots the source model again at teardown).
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model(name: str) -> None:
    np.random.seed(0)
    run_zoo_model(name)
