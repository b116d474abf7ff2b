"""Hugging Face models through compile(..., output="module"): the standard class, an
updated config, save_pretrained / from_pretrained offline, generate on causal LMs."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fxprune  # noqa: E402
from fxprune.core.errors import NonUniformPlanError  # noqa: E402

from _hf_tiny import B, N, V, bert, gpt2, llama, qwen2  # noqa: E402
from _hf_tiny import ids as _ids  # noqa: E402


def _uniform_plan(analysis, ratio=0.5):
    """Every group pruned to the same fraction, by magnitude: with whole-head units and
    identical layers this keeps the same counts in every layer."""
    return fxprune.Plan.from_ratio(analysis, ratio)


@pytest.mark.parametrize("make", [llama, qwen2, gpt2, bert], ids=lambda f: f.__name__)
def test_module_output_and_roundtrip(make, tmp_path):
    torch.manual_seed(0)
    model, inputs, auto = make()
    auto = getattr(transformers, auto)
    analysis = fxprune.analyze(model, inputs, frontend="export", split_policy="heads")
    plan = _uniform_plan(analysis)
    gm = fxprune.compile(model, plan)
    small = fxprune.compile(model, plan, output="module")
    assert type(small) is type(model)
    # another batch size and sequence length
    other = (_ids(3, 5, seed=1),) + tuple(torch.ones(3, 5, dtype=torch.long) for _ in inputs[1:])
    with torch.no_grad():
        out = small(*other).logits
    assert out.shape == (3, 5, V)
    try:
        small.save_pretrained(tmp_path)
    except NonUniformPlanError as exc:
        pytest.xfail(f"plan not uniform: {exc}")
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs).logits, small(*inputs).logits)
        torch.testing.assert_close(small(*inputs).logits, gm(*inputs)[0] if isinstance(
            gm(*inputs), (tuple, list)) else gm(*inputs)["logits"])
    if auto is transformers.AutoModelForCausalLM:
        gen = loaded.generate(_ids(1, 4), max_new_tokens=3, do_sample=False,
                              pad_token_id=0)
        assert gen.shape == (1, 7)


@pytest.mark.parametrize("make", [gpt2, llama], ids=lambda f: f.__name__)
def test_pruned_head_dim_with_the_original_scale_is_not_saved_as_another_model(make, tmp_path):
    """head_dim 8 -> 6 with attention_scale="original": from_pretrained would recompute
    1/sqrt(6) and silently compute another model (GPT-2 reloaded 7e-5 away); refused,
    nothing written. With "recompute" the reload equals the module; LLaMA's rotary
    inv_freq keeps original frequencies that a config recomputes (1.3e-3 away): refused."""
    torch.manual_seed(0)
    model, inputs, auto = make()
    analysis = fxprune.analyze(model, inputs, frontend="export")  # head_dim units
    plan = fxprune.Plan.from_ratio(analysis, 0.25)
    small = fxprune.compile(model, plan, output="module")
    with pytest.raises(NonUniformPlanError, match=r"1/sqrt\(8\).*attention_scale=\"recompute\""):
        small.save_pretrained(tmp_path / "kept")
    assert not (tmp_path / "kept").exists()
    small = fxprune.compile(model, plan, output="module", attention_scale="recompute")
    if make is llama:  # rotary pairs kept at their original frequencies: refused too
        with pytest.raises(NonUniformPlanError, match=r"rotary frequencies keep 3 of 4"):
            small.save_pretrained(tmp_path / "ok")
        assert not (tmp_path / "ok").exists()
        return
    small.save_pretrained(tmp_path / "ok")
    loaded = getattr(transformers, auto).from_pretrained(tmp_path / "ok").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs).logits, small(*inputs).logits,
                                   rtol=0, atol=1e-6)
