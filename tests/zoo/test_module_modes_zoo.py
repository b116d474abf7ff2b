"""compile(output="module") on torchvision models whose module cannot follow a plan:
ShuffleNetV2's chunk(2) kept unevenly by a hand-made plan, GoogLeNet's / Inception-v3's train-only heads."""
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


@pytest.mark.parametrize("name,size,head", [("googlenet", 64, "aux1, aux2; the sliced model "
                                             "crashes in train mode"),
                                            ("inception_v3", 75, "AuxLogits; its input width")])
def test_train_only_heads_refused(name, size, head):
    m, _, plan = _compile(name, size, aux_logits=True, init_weights=False)
    with pytest.raises(ModuleOutputError, match="never ran") as err:
        fxprune.compile(m, plan, output="module")
    assert head in str(err.value) and "aux_logits=False" in str(err.value)


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
