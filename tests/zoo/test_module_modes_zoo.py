"""compile(output="module") on torchvision models whose module and graph differ:
ShuffleNetV2's chunk(2) kept unevenly by a hand-made plan (refused), GoogLeNet's /
Inception-v3's train-only heads (followed where the train path can be analysed)."""
import pytest
import torch
import torchvision

import fxprune
from fxprune.core.errors import LiteralSizeError, ModuleOutputError
from fxprune.core.plan import Plan


def _compile(name: str, size: int, **kwargs):
    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    a = fxprune.analyze(m, (x,))
    return m, a, Plan.from_ratio(a, 0.3, criterion="random", seed=0)


def test_shufflenet_uneven_chunk_names_the_line():
    """Default plans keep chunk(2)'s pieces equal (analysis.split_ties); a hand-made plan
    that does not is refused, naming the line."""
    m, a, plan = _compile("shufflenet_v2_x0_5", 64)
    assert plan.meta["split_ties"]
    fxprune.compile(m, plan, output="module")
    tied = a.group(a.split_ties[0].groups[0])
    uneven = Plan.from_indices(a, {tied.name: list(range(1, tied.size))})
    with pytest.raises(LiteralSizeError, match=r"chunk\(2\) of \d+ kept channels: the plan "
                       r"keeps \[\d+, \d+\], chunk cuts") as err:
        fxprune.compile(m, uneven, output="module")
    assert "shufflenetv2.py, line" in str(err.value) and "x.chunk(2, dim=1)" in str(err.value)
    fxprune.compile(m, uneven)  # the GraphModule takes the plan


def test_googlenet_train_only_heads_follow():
    """aux1 / aux2 run only in training: the train-mode path is analysed too, their input
    convs follow the plan, train mode returns the aux outputs (slice == mask on that path
    is checked inside compile)."""
    with pytest.warns(UserWarning, match="aux1, aux2 run only in train mode"):
        m, a, plan = _compile("googlenet", 64, aux_logits=True, init_weights=False)
    small = fxprune.compile(m, plan, output="module")
    assert small.aux1.conv.conv.in_channels < 512 and small.aux2.conv.conv.in_channels < 528
    x = torch.randn(2, 3, 64, 64)
    out = small.train()(x)
    assert [tuple(t.shape) for t in out] == [(2, 1000)] * 3
    sum(t.sum() for t in out).backward()
    assert all(torch.isfinite(p.grad).all() for p in small.parameters())


def test_inception_train_head_on_inputs_too_small_for_train_mode_refused():
    """At 75x75 the AuxLogits head cannot run (avg_pool2d(5, stride 3) of a 3x3 map), so its
    path is not analysed and the module is refused (analysed at 299x299 it follows:
    benchmarks/module_sweep.py)."""
    with pytest.warns(UserWarning, match="could not be analysed"):
        m, _, plan = _compile("inception_v3", 75, aux_logits=True, init_weights=False)
    with pytest.raises(ModuleOutputError, match="never ran") as err:
        fxprune.compile(m, plan, output="module")
    assert "AuxLogits; its input width" in str(err.value) and "aux_logits=False" in str(err.value)
    assert "train-mode path could not be analysed" in str(err.value)


def test_googlenet_without_aux_heads_trains():
    m, a, plan = _compile("googlenet", 64, aux_logits=False, init_weights=False)
    small = fxprune.compile(m, plan, output="module")
    x = torch.randn(3, 3, 64, 64)
    gm = fxprune.compile(m, plan)
    torch.testing.assert_close(small.double()(x.double()), gm.double()(x.double()))
    out = small.float().train()(x)
    out.logits.sum().backward() if hasattr(out, "logits") else out.sum().backward()
    assert all(p.grad is not None for p in small.parameters() if p.requires_grad)


@pytest.mark.parametrize("name,size,attr,kw", [
    ("inception_next_atto", 32, "split_indexes", {"depths": (1, 1, 1, 1)}),
    pytest.param("focalnet_tiny_srf", 32, "input_split", {}, marks=pytest.mark.slow),  # 6-10 s
    ("poolformer_s12", 32, "shape", {})])
def test_timm_size_tuple_attributes_follow(name, size, attr, kw):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    x = torch.randn(2, 3, size, size)
    a = fxprune.analyze(m, (x,))
    plan = Plan.from_ratio(a, 0.3, criterion="random", seed=0)
    gm = fxprune.compile(m, plan)
    small = fxprune.compile(m, plan, output="module")
    old = [v for mod in m.modules() for k, v in vars(mod).items() if k == attr]
    new = [v for mod in small.modules() for k, v in vars(mod).items() if k == attr]
    assert old and old != new and type(old[0]) is type(new[0])  # the attribute followed
    x3 = torch.randn(3, 3, size, size, dtype=torch.float64)
    torch.testing.assert_close(small.double()(x3), gm.double()(x3))
    small.float().train()(x).sum().backward()
    assert all(p.grad is not None for p in small.parameters() if p.requires_grad)
