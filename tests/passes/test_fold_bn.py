"""fold_bn: BatchNorm folded into conv/linear equals the unfolded model in float64."""
import pytest
import torch
import torch.fx
from torch import nn

from fxprune.core.errors import RewriteError, VerificationError
from passes.fold_bn import check_fold, find_bn_folds, fold_bn
from passes.shape_prop import propagate_shapes


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    return model.eval()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)        # depthwise, with bias
        self.bn_dw = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 16, 1, groups=4, bias=False)
        self.bn_g = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)
        self.bn_fc = nn.BatchNorm1d(10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.bn_dw(self.dw(x)) + x
        x = self.bn_g(self.grouped(x)).mean((2, 3))
        return self.bn_fc(self.fc(x))


def test_fold_bn_exact_in_float64_with_grouped_depthwise_and_no_bias():
    model = _randomise_bn(Net())
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 8, 8)
    propagate_shapes(gm, (x,))
    assert len(find_bn_folds(gm)) == 4
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    folded = fold_bn(gm)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert check_fold(gm, folded, (x,)) < 1e-9
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())  # untouched
    torch.testing.assert_close(folded(x), gm(x), rtol=1e-4, atol=1e-5)


def test_fold_bn_leaves_shared_and_training_bn():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.bn2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y, self.bn2(self.conv(x))   # conv output reused; conv called twice

    gm = torch.fx.symbolic_trace(_randomise_bn(Shared()))
    assert find_bn_folds(gm) == []
    train = torch.fx.symbolic_trace(Net().train())
    assert find_bn_folds(train) == []


def test_fold_bn_on_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    model = _randomise_bn(torchvision.models.resnet18(num_classes=10))
    gm = torch.fx.symbolic_trace(model)
    folded = fold_bn(gm)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert check_fold(gm, folded, (torch.randn(1, 3, 32, 32),)) < 1e-9


def test_check_fold_catches_a_wrong_fold():
    gm = torch.fx.symbolic_trace(_randomise_bn(Net()))
    folded = fold_bn(gm)
    with torch.no_grad():
        folded.conv.bias.add_(1e-3)  # no longer the fold
    with pytest.raises(VerificationError, match="differs"):
        check_fold(gm, folded, (torch.randn(2, 3, 8, 8),))


def test_fold_bn_requires_a_graph_module():
    with pytest.raises(RewriteError, match="GraphModule"):
        fold_bn(Net().eval())


def test_compile_fold_bn_option_prunes_then_folds():
    import fxprune

    model = _randomise_bn(Net())
    x = torch.randn(2, 3, 8, 8)
    analysis = fxprune.analyze(model, (x,))
    plan = fxprune.Plan.from_ratio(analysis, 0.5, criterion="l1")
    sliced = fxprune.compile(model, plan)
    folded = fxprune.compile(model, plan, fold_bn=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert check_fold(sliced, folded, (x,)) < 1e-9
