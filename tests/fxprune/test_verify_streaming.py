"""verify converts weights to float64 per op (no float64 model copy): same verdicts and
numbers as running a float64 copy, corrupted slices still caught, model untouched."""
import pytest
import torch

import fxprune
import fxprune.api as api
from fxprune.core.errors import VerificationError


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.c1 = torch.nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.c2 = torch.nn.Conv2d(16, 8, 1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = y + self.c2(torch.relu(self.c1(y)))
        return self.head(y.mean((2, 3)))


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 16)
        self.mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.mha(h, h, h, need_weights=False)[0] + h)


def _bn_stats(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)


CASES = [(ConvNet, (2, 3, 8, 8)), (Attn, (2, 5, 6))]


def _report(model, small, plan, x, monkeypatch=None):
    return fxprune.verify(model, small, plan, (x,), raise_on_failure=False)


@pytest.mark.parametrize("make, shape", CASES)
def test_same_report_as_float64_copy(make, shape, monkeypatch):
    torch.manual_seed(0)
    model = make().eval()
    _bn_stats(model)
    x = torch.randn(shape)
    plan = fxprune.Plan.from_ratio(fxprune.analyze(model, (x,)), 0.5, criterion="random")
    small = fxprune.compile(model, plan)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    streamed = _report(model, small, plan, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(v.dtype == before[k].dtype for k, v in model.state_dict().items())
    monkeypatch.setattr(api, "_graph_copy", api._double_copy)  # the float64 copy, as before
    copied = _report(model, small, plan, x)
    assert streamed.ok and copied.ok
    assert streamed == copied


@pytest.mark.parametrize("make, shape", CASES)
def test_corrupted_slice_is_caught(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    _bn_stats(model)
    x = torch.randn(shape)
    plan = fxprune.Plan.from_ratio(fxprune.analyze(model, (x,)), 0.5, criterion="random")
    small = fxprune.compile(model, plan)
    weight = small.get_parameter("inp.weight" if make is Attn else "c2.weight")
    with torch.no_grad():
        weight[0].add_(1e-3)  # one output row off: a slicing bug would look like this
    assert not _report(model, small, plan, x).ok
    with pytest.raises(VerificationError):
        fxprune.verify(model, small, plan, (x,))
