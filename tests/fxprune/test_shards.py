"""compile on meta + load_sliced_state_dict from safetensors shards == compile on the real model."""
import pytest
import torch

import fxprune
from fxprune.core.errors import RewriteError

safetensors = pytest.importorskip("safetensors.torch")


class Net(torch.nn.Module):
    """Residual conv net with a BatchNorm (buffers) and a head tied to nothing."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.c1 = torch.nn.Conv2d(8, 12, 3, padding=1)
        self.c2 = torch.nn.Conv2d(12, 8, 1)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = y + self.c2(torch.relu(self.c1(y)))
        return self.head(y.mean((2, 3)))


def _real_and_meta():
    torch.manual_seed(0)
    real = Net().eval()
    with torch.no_grad():
        real.bn.running_mean.normal_()
        real.bn.running_var.uniform_(0.5, 2)
    with torch.device("meta"):
        meta = Net().eval()
    return real, meta


def _shards(real, tmp_path):
    """The dense state dict in two files, as checkpoints are sharded."""
    sd = real.state_dict()
    keys = sorted(sd)
    half = len(keys) // 2
    files = []
    for i, part in enumerate((keys[:half], keys[half:])):
        path = tmp_path / f"model-{i:05d}.safetensors"
        safetensors.save_file({k: sd[k].contiguous() for k in part}, str(path))
        files.append(path)
    return files


def test_meta_compile_plus_shards_equals_real_compile(tmp_path):
    real, meta = _real_and_meta()
    x = torch.randn(2, 3, 8, 8)
    plan = fxprune.Plan.from_ratio(fxprune.analyze(real, (x,)), 0.5, criterion="random", seed=3)
    small_real = fxprune.compile(real, plan)
    meta_analysis = fxprune.analyze(meta, (x,))
    plan_m = fxprune.Plan.from_json(plan.to_json())
    small_meta = fxprune.compile(meta_analysis, plan_m)
    assert all(p.device.type == "meta" for p in small_meta.parameters())
    loaded = fxprune.load_sliced_state_dict(small_meta, plan_m, _shards(real, tmp_path),
                                            analysis=meta_analysis)
    assert all(p.device.type == "meta" for p in small_meta.parameters())  # copy, not in place
    want, got = small_real.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert any(want[k].shape != real.state_dict()[k].shape for k in want)  # something was cut
    torch.testing.assert_close(loaded(x), small_real(x), rtol=0, atol=0)


def test_wrong_or_missing_shards_fail_closed(tmp_path):
    real, meta = _real_and_meta()
    x = torch.randn(1, 3, 8, 8)
    analysis = fxprune.analyze(meta, (x,))
    plan = fxprune.Plan.from_ratio(analysis, 0.5)
    small = fxprune.compile(analysis, plan)
    files = _shards(real, tmp_path)
    with pytest.raises(RewriteError, match="in none of the"):
        fxprune.load_sliced_state_dict(small, plan, files[:1], analysis=analysis)
    sd = real.state_dict()
    sd["c1.weight"] = torch.zeros(13, 8, 3, 3)  # a different model's tensor
    bad = tmp_path / "bad.safetensors"
    safetensors.save_file(sd, str(bad))
    with pytest.raises(RewriteError, match="c1.weight"):
        fxprune.load_sliced_state_dict(small, plan, [bad], analysis=analysis)


def test_exported_llama_on_meta_loads_and_runs(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=50, use_cache=False)
    torch.manual_seed(0)
    real = transformers.LlamaForCausalLM(cfg).eval()
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (1, 6))
    a_real = fxprune.analyze(fxprune.trace(real, (ids,), frontend="export"), (ids,))
    plan = fxprune.Plan.from_ratio(a_real, 0.5, criterion="random", seed=1)
    small_real = fxprune.compile(a_real, plan)
    a_meta = fxprune.analyze(fxprune.trace(meta, (ids,), frontend="export"), (ids,))
    # the export graph of a meta model has device=meta literals, so its fingerprint
    # differs: the same units, keyed by group name, re-bound to the meta graph
    assert [g.name for g in a_meta.groups] == [g.name for g in a_real.groups]
    plan_m = fxprune.Plan(a_meta.fingerprint, plan.keep, plan.sizes, plan.meta, a_meta)
    small_meta = fxprune.compile(a_meta, plan_m)
    path = tmp_path / "model.safetensors"
    sd = {k: v.contiguous() for k, v in small_real.state_dict().items()}
    # the dense checkpoint, plus the non-persistent rotary buffers a loader would compute
    dense = {**a_real.gm.state_dict(), **dict(a_real.gm.named_buffers())}
    safetensors.save_file({k: v.contiguous() for k, v in dense.items()}, str(path))
    loaded = fxprune.load_sliced_state_dict(small_meta, plan_m, [path], analysis=a_meta)
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.testing.assert_close(loaded(ids), small_real(ids), rtol=0, atol=0)
