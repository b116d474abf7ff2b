"""Uniform plans (``fxprune.plan(..., uniform=True)``) of Hugging Face models: a MACs
budget in global scope, ``save_pretrained``, and ``AutoModel*.from_pretrained`` in a
fresh interpreter that cannot import fxprune; the same budget without ``uniform`` is
refused by ``save_pretrained`` with a remedy naming ``uniform=True``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fxprune  # noqa: E402
from fxprune.core.errors import NonUniformPlanError, PlanError  # noqa: E402
from fxprune.planning.planner import group_kind  # noqa: E402

from _hf_tiny import B, N, V, bert, gpt2, llama, qwen2  # noqa: E402
from _hf_tiny import ids as _ids  # noqa: E402


MODELS = [llama, qwen2, gpt2, bert]
# BERT / GPT-2 derive head_dim from hidden_size: heads go with head_dim hidden units each;
# Qwen2 (GQA, no head_dim in its config here): only MLP widths are free
TARGET = {"llama": 0.45, "qwen2": 0.7, "gpt2": 0.5, "bert": 0.5}
# at these budgets the global ranking gives different layers different MLP widths
SPREAD_TARGET = {**TARGET, "llama": 0.6, "gpt2": 0.7, "bert": 0.7}


def _setup(make):
    torch.manual_seed(0)
    model, inputs, auto = make()
    model = model.double().eval()  # float64: reloaded == pruned to ~1e-12
    analysis = fxprune.analyze(model, inputs, frontend="export", split_policy="heads")
    return model, inputs, auto, analysis


def _plan(analysis, target, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tolerance warnings of tiny models
        return fxprune.plan(analysis, "l1", target_macs=target, scope="global", **kw)


def _kept_by_kind(analysis, plan) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for g in analysis.groups:
        out.setdefault(group_kind(g), set()).add(len(plan.keep.get(g.name, range(g.size))))
    return out


# A fresh interpreter that cannot import fxprune (nor passes): transformers alone loads it.
_LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["fxprune"] = None
    sys.modules["passes"] = None
    import torch, transformers
    path, auto, inputs, expected = sys.argv[1:5]
    model = getattr(transformers, auto).from_pretrained(path, local_files_only=True).eval()
    x, ref = torch.load(inputs), torch.load(expected)
    with torch.no_grad():
        out = model(*x).logits
    err = (out - ref).abs().max().item()
    gen = None
    if auto == "AutoModelForCausalLM":
        gen = model.generate(x[0][:1, :4], max_new_tokens=3, min_new_tokens=3,
                             do_sample=False,
                             pad_token_id=0).shape[1]
    print(json.dumps({"cls": type(model).__name__, "err": err, "dtype": str(out.dtype),
                      "gen": gen, "cfg": model.config.to_dict()}))
""")


def _load_without_fxprune(path, auto: str, inputs: tuple, expected: torch.Tensor) -> dict:
    torch.save(inputs, path / "x.pt")
    torch.save(expected, path / "y.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", _LOADER, str(path / "model"), auto,
                           str(path / "x.pt"), str(path / "y.pt")], cwd=path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("make", MODELS, ids=lambda f: f.__name__)
def test_uniform_budget_plan_round_trips_without_fxprune(make, tmp_path):
    model, inputs, auto, analysis = _setup(make)
    plan = _plan(analysis, TARGET[make.__name__], uniform=True)
    assert plan.meta["uniform"] and plan.meta["macs"] <= TARGET[make.__name__] * \
        plan.meta["dense_macs"]
    assert plan.keep, "the budget removed nothing"
    if make is llama:  # GQA: one of two kv heads (with its two query heads) goes
        assert len(plan.keep["model.layers.0.self_attn.q_proj.weight[0]"]) == 1
    assert all(len(v) == 1 for v in _kept_by_kind(analysis, plan).values())
    small = fxprune.compile(model, plan, output="module")
    small.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        expected = small(*inputs).logits
    got = _load_without_fxprune(tmp_path, auto, inputs, expected)
    assert got["cls"] == type(model).__name__ and got["dtype"] == "torch.float64"
    assert got["err"] < 1e-10, got["err"]
    if auto == "AutoModelForCausalLM":
        assert got["gen"] == 7
    mlp = {len(plan.keep[g.name]) for g in analysis.groups
           if g.name in plan.keep and ("mlp" in g.name or "intermediate" in g.name)}
    width = got["cfg"].get("intermediate_size") or got["cfg"].get("n_inner")
    assert mlp <= {width}
    if make in (bert, gpt2):  # a head and its 8 hidden units went in every layer
        cfg = got["cfg"]
        heads, hidden = cfg.get("num_attention_heads", cfg.get("n_head")), \
            cfg.get("hidden_size", cfg.get("n_embd"))
        assert heads == 3 and hidden == 24, (heads, hidden)


@pytest.mark.parametrize("make", MODELS, ids=lambda f: f.__name__)
def test_same_budget_without_uniform_is_refused_naming_uniform(make, tmp_path):
    model, inputs, auto, analysis = _setup(make)
    plan = _plan(analysis, SPREAD_TARGET[make.__name__])
    assert any(len(v) > 1 for v in _kept_by_kind(analysis, plan).values())
    small = fxprune.compile(model, plan, output="module")
    with pytest.raises(NonUniformPlanError, match=r"uniform=True.*--uniform"):
        small.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("make", [llama, bert], ids=lambda f: f.__name__)
def test_uniform_ties_counts_not_units(make):
    """Which units go in each layer still follows that layer's scores."""
    model, inputs, auto, analysis = _setup(make)
    rng = np.random.default_rng(0)

    def scores(analysis, group):
        return rng.random(group.size)

    plan = fxprune.plan(analysis, scores, ratio=0.5, scope="global", uniform=True)
    by_kind: dict[str, list[tuple[int, ...]]] = {}
    for g in analysis.groups:
        if g.name in plan.keep:
            by_kind.setdefault(group_kind(g), []).append(tuple(plan.keep[g.name]))
    tied = [v for v in by_kind.values() if len(v) > 1]
    assert tied and all(len({len(k) for k in v}) == 1 for v in tied)
    assert any(len(set(v)) > 1 for v in tied), "every layer kept the same units"


def test_derived_head_dim_ties_hidden_to_heads():
    model, inputs, auto, analysis = _setup(bert)
    assert dict(analysis.uniform_links) == {"bert.embeddings.position_embeddings.weight[1]": (
        "bert.encoder.layer.0.attention.self.query.weight[0]", 8)}
    assert dict(analysis.uniform_whole) == {}
    plan = fxprune.plan(analysis, "l1", ratio=0.5, uniform=True)
    heads = {len(plan.keep[f"bert.encoder.layer.{i}.attention.self.query.weight[0]"])
             for i in (0, 1)}
    assert heads == {2}
    assert len(plan.keep["bert.embeddings.position_embeddings.weight[1]"]) == 2 * 8
    with pytest.raises(PlanError, match="must lose 8 units per unit"):
        fxprune.plan(analysis, "l1", ratio=0.5, uniform=True, ignore=["bert.embeddings"])
    _, _, _, gqa = _setup(qwen2)  # kv heads != heads: no link, hidden and heads whole
    assert not gqa.uniform_links and "model.embed_tokens.weight[1]" in gqa.uniform_whole
    _, _, _, explicit = _setup(llama)  # its own head_dim: heads free, but hidden_size must
    assert list(explicit.uniform_whole) == ["model.embed_tokens.weight[1]"]  # divide by heads
    assert "not a multiple of the number of attention heads" in \
        explicit.uniform_whole["model.embed_tokens.weight[1]"]


def test_uniform_refuses_a_kind_ignored_in_some_layers():
    model, inputs, auto, analysis = _setup(llama)
    with pytest.raises(PlanError, match=r"uniform=True.*model.layers.0.mlp.*in every layer"):
        fxprune.plan(analysis, "l1", ratio=0.5, uniform=True, ignore=["model.layers.0.mlp"])
    with pytest.raises(PlanError, match="override every layer alike"):
        fxprune.plan(analysis, "l1", ratio=0.5, uniform=True,
                     overrides={"model.layers.0.mlp": 0.25})
    plan = fxprune.plan(analysis, "l1", ratio=0.5, uniform=True,
                        overrides={"model.layers.0.mlp": 0.25, "model.layers.1.mlp": 0.25})
    assert len(plan.keep["model.layers.0.mlp.gate_proj.weight[0]"]) == 36
    assert len(plan.keep["model.layers.1.mlp.gate_proj.weight[0]"]) == 36


def test_head_dim_policy_keeps_split_attention_whole():
    """Under split_policy="head_dim" q.k and v are separate groups whose head_dims one
    config value cannot both follow: a uniform plan leaves them whole (it used to reach
    compile(output="module") and fail there with LiteralSizeError)."""
    torch.manual_seed(0)
    model, inputs, _ = llama()
    analysis = fxprune.analyze(model.eval(), inputs, frontend="export",
                               split_policy="head_dim")
    split = [n for n, why in analysis.uniform_whole.items() if "prunes apart" in why]
    owner = {m.fqn: g.name for g in analysis.groups for m in g.members if m.role == "out"}
    for layer in (0, 1):  # (RoPE ties the q.k groups of both layers into one)
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert owner[f"model.layers.{layer}.self_attn.{proj}.weight"] in split
    plan = fxprune.plan(analysis, "l1", ratio=0.5, uniform=True)
    assert not set(plan.keep) & set(split) and plan.keep
