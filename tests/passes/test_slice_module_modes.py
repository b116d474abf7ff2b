"""compile(output="module") where the module's forward and the captured graph differ:
chunks whose pieces a plan keeps unevenly, and heads the eval graph never ran."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.core.errors import LiteralSizeError, ModuleOutputError
from fxprune.core.plan import Plan


class AuxNet(nn.Module):
    """A trunk whose auxiliary head runs only in training (as GoogLeNet's)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.aux = nn.Sequential(nn.Conv2d(16, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        out = self.conv3(torch.relu(self.conv2(h))).mean((2, 3))
        if self.training:
            return out, self.aux(h)
        return out


class ChunkNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x1, x2 = self.conv(x).chunk(2, dim=1)
        return torch.cat([self.a(x1), self.b(x2)], 1)


def _group(analysis, name):
    return next(g for g in analysis.groups if g.name == name)


def test_unrun_head_sliced_from_the_train_graph():
    """The train-mode path is analysed too (tests/fxprune/test_module_train_heads.py):
    the head's input follows the plan; refused where that path cannot be analysed."""
    torch.manual_seed(0)
    m, x = AuxNet().eval(), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="run only in train mode"):
        a = fxprune.analyze(m, (x,))
    plan = Plan.from_indices(a, {"conv1.weight[0]": range(12)})
    small = fxprune.compile(m, plan, output="module")
    assert small.aux[0].in_channels == 12 and m.conv1.out_channels == 16  # m untouched
    out, aux = small.train()(x)
    (out.sum() + aux.sum()).backward()
    with pytest.warns(UserWarning, match="could not be analysed"):
        a = fxprune.analyze(m, (torch.randn(2, 3, 4, 4),))  # Linear(4 * 8 * 8) in train
    plan = Plan.from_indices(a, {"conv1.weight[0]": range(12)})
    with pytest.raises(ModuleOutputError, match=r"never ran.*: aux;.*train mode"):
        fxprune.compile(m, plan, output="module")


def test_unrun_head_fine_when_its_input_is_whole():
    torch.manual_seed(0)
    m, x = AuxNet().eval(), torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(m, (x,))
    plan = Plan.from_indices(a, {"conv2.weight[0]": range(6)})
    small = fxprune.compile(m, plan, output="module")
    out, aux = small.train()(x)
    (out.sum() + aux.sum()).backward()


def test_uneven_chunk_refused_with_line():
    torch.manual_seed(0)
    m, x = ChunkNet().eval(), torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(m, (x,))
    plan = Plan.from_indices(a, {"conv.weight[0]": [0, 1, 4, 5, 6]})  # pieces keep 2 / 3
    with pytest.raises(LiteralSizeError, match=r"plan keeps \[2, 3\], chunk cuts \[3, 2\]") as err:
        fxprune.compile(m, plan, output="module")
    assert "test_slice_module_modes.py" in str(err.value) and "chunk(2" in str(err.value)


def test_even_chunk_follows():
    torch.manual_seed(0)
    m, x = ChunkNet().eval(), torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(m, (x,))
    plan = Plan.from_indices(a, {"conv.weight[0]": [0, 2, 5, 7]})  # 2 / 2
    gm = fxprune.compile(m, plan)
    small = fxprune.compile(m, plan, output="module")
    x2 = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(small(x2), gm(x2))


class SplitNet(nn.Module):
    """Sections held in an attribute (as timm InceptionNeXt's split_indexes)."""

    def __init__(self, literal=False):
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(5, 4, 1), nn.Conv2d(3, 4, 1)
        self.sections, self.literal = (5, 3), literal

    def forward(self, x):
        x1, x2 = torch.split(self.conv(x), [5, 3] if self.literal else self.sections, dim=1)
        return torch.cat([self.a(x1), self.b(x2)], 1)


def test_split_sections_attribute_follows():
    m, x = SplitNet().eval(), torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(m, (x,))
    plan = Plan.from_indices(a, {"conv.weight[0]": [0, 2, 3, 6]})  # 3 / 1
    small = fxprune.compile(m, plan, output="module")
    assert small.sections == (3, 1) and m.sections == (5, 3)
    x2 = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(small(x2), fxprune.compile(m, plan)(x2))


def test_split_sections_literal_refused_with_line():
    m, x = SplitNet(literal=True).eval(), torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(m, (x,))
    plan = Plan.from_indices(a, {"conv.weight[0]": [0, 2, 3, 6]})
    with pytest.raises(LiteralSizeError, match=r"test_slice_module_modes.py.*\[5, 3\] if self"):
        fxprune.compile(m, plan, output="module")


class SplitIntNet(ChunkNet):
    def forward(self, x):
        x1, x2 = self.conv(x).split(4, dim=1)
        return torch.cat([self.a(x1), self.b(x2)], 1)


def test_uneven_split_int_refused_with_line():
    m, x = SplitIntNet().eval(), torch.randn(2, 3, 8, 8)
    a = fxprune.analyze(m, (x,))
    plan = Plan.from_indices(a, {"conv.weight[0]": [0, 1, 4, 5, 6]})  # pieces keep 2 / 3
    with pytest.raises(LiteralSizeError, match=r"split\(4\) of 5 kept channels: the plan keeps "
                       r"\[2, 3\].*test_slice_module_modes.py"):
        fxprune.compile(m, plan, output="module")


class StridedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_export_module_output_keeps_conv_stride_and_padding(ratio):
    """_changed_sequences pairs int lists by argument: aten.conv2d's stride [2, 2] is not
    'changed' into its padding [1, 1] (trial19)."""
    torch.manual_seed(0)
    model, x = StridedConvs().eval(), torch.randn(1, 3, 16, 16)
    analysis = fxprune.analyze(model, (x,), frontend="export")
    small = fxprune.compile(model, Plan.from_ratio(analysis, ratio), output="module")
    assert (small.c1.stride, small.c1.padding) == ((2, 2), (1, 1))
    assert (small.c2.stride, small.c2.padding) == ((1, 1), (1, 1))


def test_export_module_output_of_resnet18_keeps_its_convs():
    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    analysis = fxprune.analyze(model, (x,), frontend="export")
    small = fxprune.compile(model, Plan.from_ratio(analysis, 0.0), output="module")
    convs = [(n, m.stride, m.padding, m.dilation) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d)]
    assert [(n, m.stride, m.padding, m.dilation) for n, m in small.named_modules()
            if isinstance(m, nn.Conv2d)] == convs
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))
