"""compile(memory_format="channels_last"): conv weights channels-last, values proven equal."""
import pytest
import torch
import torchvision

import fxprune
from fxprune.core.errors import VerificationError
from passes.memory_format import check_memory_format, describe_formats, to_channels_last


def _small_resnet():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    return m, (torch.randn(2, 3, 64, 64),)


@pytest.mark.parametrize("output", ["graph", "module"])
def test_channels_last_compile_equals_contiguous(output):
    model, x = _small_resnet()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    plan = fxprune.Plan.from_ratio(fxprune.analyze(model, x), 0.5)
    plain = fxprune.compile(model, plan, output=output).eval()
    cl = fxprune.compile(model, plan, output=output, memory_format="channels_last").eval()
    fmt = describe_formats(cl)
    assert fmt["channels_last"] == 20 and fmt["contiguous"] == 0, fmt
    assert describe_formats(plain)["channels_last"] == 0
    with torch.no_grad():
        y = cl(*x)
        assert torch.allclose(y, plain(*x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert all(p.is_contiguous() for p in model.parameters())  # the user's model untouched
    if output == "module":
        assert isinstance(cl, torchvision.models.ResNet)
        cl.train()(*x).sum().backward()  # trains in channels-last too


def test_bad_memory_format_is_refused():
    model, x = _small_resnet()
    plan = fxprune.Plan.keep_all(fxprune.analyze(model, x))
    with pytest.raises(ValueError, match="memory_format must be"):
        fxprune.compile(model, plan, memory_format="nhwc")


class _Views(torch.nn.Module):
    """A .view of a conv output that only contiguous strides allow."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y.view(y.shape[0], -1)


def test_a_view_that_rejects_channels_last_is_named():
    m = _Views().eval()
    x = (torch.randn(2, 3, 8, 8),)
    with pytest.raises(VerificationError, match="does not run.*test_memory_format.py"):
        check_memory_format(m, to_channels_last(m), x)
    with pytest.raises(Exception, match="memory_format=None"):
        fxprune.compile(m, fxprune.Plan.keep_all(fxprune.analyze(m, x)), output="module",
                        memory_format="channels_last")


def test_export_graph_conv_weights_are_converted():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1)).eval()
    x = (torch.randn(1, 3, 8, 8),)
    a = fxprune.analyze(model, x, frontend="export")
    cl = fxprune.compile(model, fxprune.Plan.from_ratio(a, 0.5), memory_format="channels_last")
    convs = [t for t in cl.parameters() if t.dim() == 4]
    assert len(convs) == 2 and all(
        t.stride() == torch.empty_like(t, memory_format=torch.channels_last).stride() for t in convs)


def test_nothing_to_convert_is_announced():
    model = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3), torch.nn.ReLU()).eval()
    with pytest.warns(UserWarning, match="changed nothing"):
        to_channels_last(model)


class _ViewsBatchTimesChannels(torch.nn.Module):
    """``view(n * c, h * w)`` of a conv output: NHWC strides allow it at batch 1 only."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        n, c, h, w = y.shape
        return self.fc(y.view(n * c, h * w).amax(1).view(n, c))


def test_channels_last_is_checked_beyond_batch_one():
    """(trial19) accepted at batch 1 it failed at batch 2: now refused at compile."""
    from fxprune.core.errors import FxpruneError

    torch.manual_seed(0)
    model, x = _ViewsBatchTimesChannels().eval(), torch.randn(1, 3, 8, 8)
    plan = fxprune.Plan.from_ratio(fxprune.analyze(model, (x,)), 0.5, criterion="l1")
    with pytest.raises(FxpruneError, match="channels_last"):
        fxprune.compile(model, plan, output="module", memory_format="channels_last")
    fxprune.compile(model, plan, output="module")(torch.randn(2, 3, 8, 8))  # contiguous runs


class _FunctionalConvs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
        self.w2 = torch.nn.Parameter(torch.randn(8, 8, 3, 3))

    def forward(self, x):
        y = torch.relu(torch.nn.functional.conv2d(x, self.w1, padding=1))
        return torch.nn.functional.conv2d(y, self.w2, padding=1).mean((2, 3))


def test_functional_conv_weights_of_a_graph_are_converted():
    """(trial19) F.conv2d on parameters: the traced conv nodes' weights go NHWC too."""
    torch.manual_seed(0)
    model, x = _FunctionalConvs().eval(), torch.randn(1, 3, 8, 8)
    plan = fxprune.Plan.from_ratio(fxprune.analyze(model, (x,)), 0.5, criterion="l1")
    small = fxprune.compile(model, plan, memory_format="channels_last")
    assert describe_formats(small)["channels_last"] == 0  # no conv modules: the graph's
    assert small.w1.stride() == torch.empty_like(small.w1, memory_format=torch.channels_last) \
        .stride() and not small.w1.is_contiguous()
